// nbd-fuzz: plays arbitrary bytes as a client's side of an NBD conversation through the pure
// wire codec — client flags, options through the negotiation state machine, then transmission
// requests through the decoder and the request checks — exactly in the order the server
// reads them, and checks what the codec answers. Once NBD_OPT_EXTENDED_HEADERS is acknowledged
// the requests are 32-byte extended headers whose payloads follow PAYLOAD_LEN, as on the server.
//
// Built normally it replays files (a corpus, or crashes found) and exits non-zero on a failed
// check:   swift run nbd-fuzz Fuzz/corpus/*
// Built with libFuzzer (scripts/fuzz) the same function is the fuzz target.
#if !SINGLE_MODULE
import NBDWire
#endif

struct FuzzCatalog: ExportCatalog {
    static let flags: TransmissionFlags = [.hasFlags, .sendFlush, .sendFUA, .sendTrim, .sendWriteZeroes, .sendCache,
                                           .sendFastZero, .canMultiConn]
    let exports = [
        ExportDescriptor(name: "vol", description: "a volume", size: 1 << 30, flags: flags,
                         metaContexts: ["base:allocation", "pmem-nbd:sharing", "qemu:dirty-bitmap:s1"]),
        ExportDescriptor(name: "vol@s1", description: "a snapshot", size: 1 << 30, flags: flags.union(.readOnly)),
    ]
    func lookup(_ name: String) -> ExportDescriptor? { name.isEmpty ? exports[0] : exports.first { $0.name == name } }
    func list() -> [ExportDescriptor] { exports }
}

/// A failed check: the codec answered something the protocol does not allow.
struct FuzzFailure: Error, CustomStringConvertible {
    let description: String
}

func u32(_ b: ArraySlice<UInt8>) -> UInt32 { b.prefix(4).reduce(0) { $0 << 8 | UInt32($1) } }
func u64(_ b: ArraySlice<UInt8>) -> UInt64 { b.prefix(8).reduce(0) { $0 << 8 | UInt64($1) } }

/// Every option reply the negotiator produces must be well framed: magic, the option it
/// answers, a type, and a length that matches what follows (several replies may be chained).
func checkOptionReplies(_ bytes: [UInt8], option: UInt32) throws(FuzzFailure) {
    var rest = bytes[...]
    while !rest.isEmpty {
        guard rest.count >= 20 else { throw FuzzFailure(description: "option reply shorter than its header") }
        guard u64(rest) == NBDMagic.optionReply else { throw FuzzFailure(description: "option reply with a bad magic") }
        guard u32(rest.dropFirst(8)) == option else { throw FuzzFailure(description: "reply names option \(u32(rest.dropFirst(8))), not \(option)") }
        let length = Int(u32(rest.dropFirst(16)))
        guard rest.count >= 20 + length else { throw FuzzFailure(description: "option reply length \(length) past its end") }
        rest = rest.dropFirst(20 + length)
    }
}

/// Runs one conversation. Returns normally for every outcome the protocol allows.
func converse(_ data: UnsafeRawBufferPointer) throws(FuzzFailure) {
    let bytes = Array(data)
    var pos = 0
    func take(_ n: Int) -> ArraySlice<UInt8>? {
        guard n >= 0, bytes.count - pos >= n else { return nil }
        defer { pos += n }
        return bytes[pos..<(pos + n)]
    }
    // The TLS policy follows the input's length, so every corpus entry keeps its meaning.
    var negotiator = Negotiator(catalog: FuzzCatalog(), tls: Negotiator.TLSMode.allCases[bytes.count % 3])
    guard let flags = take(4) else { return }
    guard negotiator.checkClientFlags(u32(flags)) == nil else { return }
    var session: NegotiatedSession?
    while session == nil {
        // The server's framing (OptionFrame): read, skip with ERR_TOO_BIG, or drop.
        guard let header = take(Negotiator.optionHeaderSize) else { return }
        let code: UInt32
        let outcome: Negotiator.Outcome
        switch OptionFrame.decode(Array(header)) {
        case .drop:
            return
        case .skip(let c, let length):
            code = c
            guard take(length) != nil else { return }
            outcome = negotiator.optionTooBig(code: code)
        case .read(let c, let length):
            code = c
            guard let payload = take(length) else { return }
            outcome = negotiator.handle(code: code, payload: Array(payload))
        }
        switch outcome {
        case .reply(let r):
            try checkOptionReplies(r, option: code)
        case .close:
            return
        case .startTLS(let r):
            // The rest of the input stands for what the client sends over TLS.
            try checkOptionReplies(r, option: code)
        case .transmission(let r, let s):
            if code != OptionCode.exportName { try checkOptionReplies(r, option: code) }
            session = s
        }
    }
    guard let session else { return }
    guard session.export.size > 0, !session.flags.contains(.readOnly) || session.export.flags.contains(.readOnly) else {
        throw FuzzFailure(description: "negotiated flags do not match the export")
    }
    let extended = session.extendedHeaders
    try checkExtendedSession(session, negotiator)
    // Transmission: requests until the input ends or the magic is wrong (a hard disconnect).
    while let header = take(Request.headerSize(extended: extended)) {
        let decoded = header.withUnsafeBytes { Request.decode($0.baseAddress!, extended: extended) }
        guard case .request(let r) = decoded else { return }
        let verdict = RequestCheck.check(r, session: session)
        if case .accept = verdict {
            let ranged: [CommandType] = [.read, .write, .trim, .writeZeroes, .cache, .blockStatus]
            if ranged.contains(where: { $0.rawValue == r.typeCode }),
               r.offset > session.export.size || r.length > session.export.size - r.offset {
                throw FuzzFailure(description: "accepted \(r) beyond the end of the export")
            }
            try checkAcceptedPayload(r, session)
        }
        // The server's framing of what follows (RequestCheck.payload): a payload too long to
        // skip ends the connection, and must never be one accepted; any other follows,
        // accepted or not (the server consumes it either way).
        switch RequestCheck.payload(of: r, session: session) {
        case .disconnect:
            if case .accept = verdict { throw FuzzFailure(description: "accepted \(r) with an oversized payload") }
            return
        case .consume(let payload):
            guard payload <= UInt64(bytes.count - pos), take(Int(payload)) != nil else { return }
        }
    }
}

/// Extended headers are only in force if acknowledged, imply chunked replies and DF, and
/// never come with EXPORT_NAME.
func checkExtendedSession(_ session: NegotiatedSession, _ negotiator: Negotiator) throws(FuzzFailure) {
    guard session.extendedHeaders == negotiator.extendedHeaders else {
        throw FuzzFailure(description: "session and negotiator disagree on extended headers")
    }
    guard session.extendedHeaders else { return }
    guard session.structuredReplies, session.flags.contains(.sendDF), !session.viaExportName else {
        throw FuzzFailure(description: "extended headers without structured replies or DF, or via EXPORT_NAME")
    }
}

/// An accepted request's payload is exactly its data: WRITE's, within the maximum payload.
func checkAcceptedPayload(_ r: Request, _ session: NegotiatedSession) throws(FuzzFailure) {
    let payload = RequestCheck.payloadLength(of: r, extended: session.extendedHeaders)
    let isWrite = r.typeCode == CommandType.write.rawValue
    if isWrite ? payload != r.length : payload != 0 {
        throw FuzzFailure(description: "accepted \(r) with a payload of \(payload) bytes")
    }
    if isWrite && r.length > UInt64(session.maximumRequestPayload) {
        throw FuzzFailure(description: "accepted a write of \(r.length) bytes over the maximum payload")
    }
}
