import Glibc
import NBDWire
import PmemSystem

extension Connection {
    /// Runs fixed-newstyle negotiation. Returns the settled session, or nil when the client
    /// aborted, disconnected or must be dropped.
    func negotiate() throws(Errno) -> NegotiatedSession? {
        var negotiator = Negotiator(catalog: server.exports)
        try sendHandshake(Negotiator.greeting)
        guard let flagBytes = try receive.take(4) else { return nil }
        let clientFlags = loadBigEndian(UInt32.self, from: flagBytes.withUnsafeBytes { $0.baseAddress! })
        guard negotiator.receiveClientFlags(clientFlags) else {
            Log.info("connection \(id): unknown client flags 0x\(String(clientFlags, radix: 16)); dropping")
            return nil
        }
        while true {
            guard let headerBytes = try receive.take(Negotiator.optionHeaderSize) else { return nil }
            guard case .option(let code, let length) = Negotiator.decodeOptionHeader(headerBytes) else {
                Log.info("connection \(id): bad option magic; dropping")
                return nil
            }
            let outcome: Negotiator.Outcome
            if Int(length) > NBDLimits.maxOptionPayload {
                guard Int(length) <= NBDLimits.maxSkippableOptionPayload else {
                    Log.info("connection \(id): option of \(length) bytes; dropping")
                    return nil
                }
                guard try receive.discard(UInt64(length)) else { return nil }
                outcome = negotiator.optionTooBig(code: code)
            } else {
                guard let payload = try receive.take(Int(length)) else { return nil }
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
            case .transmission(let bytes, let session):
                try sendHandshake(bytes)
                Log.debug("connection \(id): export '\(session.export.name)', structured=\(session.structuredReplies), extended=\(session.extendedHeaders), contexts=\(session.metaContexts.map(\.name))")
                return session
            }
        }
    }
}
