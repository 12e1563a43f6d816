import Glibc
import NBDTLS
import NBDWire
import PmemSystem

extension Connection {
    /// Runs fixed-newstyle negotiation. Returns the settled session, or nil when the client
    /// aborted, disconnected or must be dropped.
    func negotiate() throws(Errno) -> NegotiatedSession? {
        var negotiator = Negotiator(catalog: server.exports, tls: server.tlsCredentials == nil ? .off : server.tlsMode)
        try sendHandshake(Negotiator.greeting)
        guard let flagBytes = try receive.take(4) else { return nil }
        // Decoded inside the closure: the pointer is only valid there.
        let clientFlags = flagBytes.withUnsafeBytes { loadBigEndian(UInt32.self, from: $0.baseAddress!) }
        if let refusal = negotiator.checkClientFlags(clientFlags) {
            Log.info("connection \(id): \(refusal); dropping")
            return nil
        }
        while true {
            guard let headerBytes = try receive.take(Negotiator.optionHeaderSize) else { return nil }
            let code: UInt32, length: Int
            let outcome: Negotiator.Outcome
            switch OptionFrame.decode(headerBytes) {
            case .drop(let reason):
                Log.info("connection \(id): \(reason); dropping")
                return nil
            case .skip(let c, let n):
                (code, length) = (c, n)
                guard try receive.discard(UInt64(length)) else { return nil }
                outcome = negotiator.optionTooBig(code: code)
            case .read(let c, let n):
                (code, length) = (c, n)
                guard let payload = try receive.take(length) else { return nil }
                if server.isShuttingDown && code != OptionCode.abort {
                    try sendHandshake(Negotiator.optionReply(code, OptionReplyType.errShutdown, message: "server is shutting down"))
                    continue
                }
                outcome = negotiator.handle(code: code, payload: payload)
            }
            Log.trace("connection \(id): option \(OptionCode.name(code)) (\(length) bytes)")
            switch outcome {
            case .reply(let bytes):
                try sendHandshake(bytes)
            case .close(let bytes, let reason):
                if !bytes.isEmpty { try? sendHandshake(bytes) }
                Log.debug("connection \(id): \(reason)")
                return nil
            case .startTLS(let ack):
                guard try startTLS(ack: ack) else { return nil }
            case .transmission(let bytes, let session):
                try sendHandshake(bytes)
                Log.debug("connection \(id): export '\(session.export.name)', structured=\(session.structuredReplies), extended=\(session.extendedHeaders), contexts=\(session.metaContexts.map(\.name))")
                return session
            }
        }
    }

    /// Sends the ACK to STARTTLS and runs the TLS handshake; from then on the receive buffer,
    /// the reply writer and handshake replies go through the session. False drops the
    /// connection: TLS cannot be undone once acknowledged.
    private func startTLS(ack: [UInt8]) throws(Errno) -> Bool {
        guard let credentials = server.tlsCredentials else { return false }
        // The client must wait for the ACK before its ClientHello; bytes already here would be
        // plaintext smuggled in front of the TLS stream.
        if receive.available > 0 {
            Log.info("connection \(id): data after STARTTLS before its reply; dropping")
            return false
        }
        try sendHandshake(ack)
        let session: TLSSession
        do {
            session = try TLSSession.handshake(credentials: credentials, input: input, output: output,
                                               timeoutSeconds: server.handshakeTimeoutSeconds)
        } catch {
            Log.info("connection \(id) from \(peer): \(error); dropping")
            return false
        }
        transport.startTLS(session)
        Log.debug("connection \(id): \(session.details)")
        return true
    }
}
