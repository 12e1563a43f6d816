// The fixed-newstyle handshake as a pure state machine: bytes in, replies and a verdict out.
// The I/O layer reads option headers and payloads and writes what this returns.

/// The server side of option haggling.
public struct Negotiator {
    /// The server's TLS policy (the spec's NOTLS, SELECTIVETLS with no TLS-only export, and
    /// FORCEDTLS modes).
    public enum TLSMode: String, Sendable, CaseIterable {
        /// No TLS: STARTTLS is answered with ERR_POLICY.
        case off
        /// STARTTLS is accepted; clients may also go on without it.
        case on
        /// Every option but STARTTLS and ABORT is answered ERR_TLS_REQD until TLS is active;
        /// EXPORT_NAME, which cannot be answered with an error, closes the connection.
        case require
    }

    /// What to do after an option.
    public enum Outcome: Equatable {
        /// Send these bytes and read the next option.
        case reply([UInt8])
        /// Send these bytes and enter transmission.
        case transmission([UInt8], NegotiatedSession)
        /// Send these bytes (possibly none) and close the connection.
        case close([UInt8], reason: String)
        /// Send these bytes (the ACK to STARTTLS), then run the TLS handshake as the server;
        /// all later bytes go through TLS. A failed handshake must close the connection.
        case startTLS([UInt8])
    }

    public let catalog: any ExportCatalog
    public let tls: TLSMode
    public private(set) var clientFlags: ClientFlags = []
    public internal(set) var structuredReplies = false
    /// NBD_OPT_EXTENDED_HEADERS was acknowledged (see ExtendedHeadersOption.swift).
    public internal(set) var extendedHeaders = false
    public private(set) var optionsSeen = 0
    /// Whether STARTTLS was accepted: from then on the stream is TLS (the I/O layer drops the
    /// connection if the TLS handshake fails).
    public private(set) var tlsActive = false
    /// Contexts selected by the last SET_META_CONTEXT, and the canonical export name it named.
    public private(set) var selectedContexts: [MetaContext] = []
    public private(set) var contextsExportName: String?

    public init(catalog: any ExportCatalog, tls: TLSMode = .off) {
        self.catalog = catalog
        self.tls = tls
    }

    public static let handshakeFlags: HandshakeFlags = [.fixedNewstyle, .noZeroes]

    /// The server's first 18 bytes: NBDMAGIC, IHAVEOPT, handshake flags.
    public static var greeting: [UInt8] {
        var w = ByteWriter(capacity: 18)
        w.put(NBDMagic.initPassword)
        w.put(NBDMagic.haveOption)
        w.put(handshakeFlags.rawValue)
        return w.bytes
    }

    /// Size of an option header: IHAVEOPT, option, length.
    public static let optionHeaderSize = 16

    public enum Header: Equatable {
        case option(code: UInt32, length: UInt32)
        case badMagic
    }

    public static func decodeOptionHeader(_ bytes: [UInt8]) -> Header {
        var r = ByteReader(bytes)
        guard let magic = try? r.get(UInt64.self), magic == NBDMagic.haveOption,
              let code = try? r.get(UInt32.self), let length = try? r.get(UInt32.self) else { return .badMagic }
        return .option(code: code, length: length)
    }

    /// Accepts the client's 32-bit flags; false means the connection must be dropped (see
    /// `checkClientFlags`).
    public mutating func receiveClientFlags(_ raw: UInt32) -> Bool {
        checkClientFlags(raw) == nil
    }

    /// Accepts the client's 32-bit flags, or says why the connection must be dropped: an
    /// unknown flag (spec: the server MUST drop it), or no FIXED_NEWSTYLE when TLS is
    /// required (TLS needs fixed newstyle, so such a client can never be served).
    public mutating func checkClientFlags(_ raw: UInt32) -> String? {
        let flags = ClientFlags(rawValue: raw)
        guard flags.isSubset(of: .known) else { return "unknown client flags 0x\(String(raw, radix: 16))" }
        if tls == .require && !flags.contains(.fixedNewstyle) {
            return "client does not use fixed newstyle negotiation, which TLS needs, and TLS is required"
        }
        clientFlags = flags
        return nil
    }

    /// Whether options other than STARTTLS and ABORT are refused with ERR_TLS_REQD.
    public var requiresTLSFirst: Bool { tls == .require && !tlsActive }

    /// Answer to an option whose payload was too large to read (it has been skipped).
    public mutating func optionTooBig(code: UInt32) -> Outcome {
        optionsSeen += 1
        if code == OptionCode.exportName { return .close([], reason: "export name option too large") }
        if requiresTLSFirst && code != OptionCode.startTLS && code != OptionCode.abort { return tlsRequired(code) }
        return .reply(Self.optionReply(code, OptionReplyType.errTooBig, message: "option payload too large"))
    }

    /// Handles one option with its payload.
    public mutating func handle(code: UInt32, payload: [UInt8]) -> Outcome {
        optionsSeen += 1
        if optionsSeen > NBDLimits.maxOptionsPerHandshake {
            return .close([], reason: "more than \(NBDLimits.maxOptionsPerHandshake) options")
        }
        if requiresTLSFirst && code != OptionCode.startTLS && code != OptionCode.abort {
            // Spec, FORCEDTLS: EXPORT_NAME cannot be answered with an error, so the session ends.
            if code == OptionCode.exportName { return .close([], reason: "EXPORT_NAME before STARTTLS, and TLS is required") }
            return tlsRequired(code)
        }
        switch code {
        case OptionCode.exportName: return exportName(payload)
        case OptionCode.abort: return .close(Self.optionReply(code, OptionReplyType.ack), reason: "client aborted")
        case OptionCode.list: return list(payload)
        case OptionCode.startTLS: return startTLS(payload)
        case OptionCode.info, OptionCode.go: return infoOrGo(code, payload)
        case OptionCode.structuredReply:
            if !payload.isEmpty { return invalid(code, "STRUCTURED_REPLY takes no data") }
            if extendedHeaders { return Self.extendedHeadersTakePrecedence(code) }
            if structuredReplies { return invalid(code, "structured replies already negotiated") }
            structuredReplies = true
            return .reply(Self.optionReply(code, OptionReplyType.ack))
        case OptionCode.listMetaContext, OptionCode.setMetaContext: return metaContext(code, payload)
        case OptionCode.extendedHeaders: return extendedHeadersOption(payload)
        default:
            return .reply(Self.optionReply(code, OptionReplyType.errUnsupported, message: "\(OptionCode.name(code)) is not supported"))
        }
    }

    // MARK: options

    private mutating func startTLS(_ payload: [UInt8]) -> Outcome {
        let code = OptionCode.startTLS
        if !payload.isEmpty { return invalid(code, "STARTTLS takes no data") }
        // TLS needs fixed newstyle; without it the spec says the server works without TLS.
        if tls == .off || !clientFlags.contains(.fixedNewstyle) {
            return .reply(Self.optionReply(code, OptionReplyType.errPolicy, message: "TLS is not enabled on this server"))
        }
        if tlsActive { return invalid(code, "TLS is already active") }
        // Spec: nothing negotiated before STARTTLS survives it.
        tlsActive = true
        structuredReplies = false
        extendedHeaders = false
        selectedContexts = []
        contextsExportName = nil
        return .startTLS(Self.optionReply(code, OptionReplyType.ack))
    }

    private func tlsRequired(_ code: UInt32) -> Outcome {
        .reply(Self.optionReply(code, OptionReplyType.errTLSRequired,
                                message: "TLS is required: send NBD_OPT_STARTTLS first (an nbds:// URI)"))
    }

    private func exportName(_ payload: [UInt8]) -> Outcome {
        guard payload.count <= NBDLimits.maxString, let name = decodeProtocolString(payload) else {
            return .close([], reason: "invalid export name in EXPORT_NAME")
        }
        guard let export = catalog.lookup(name) else {
            return .close([], reason: "unknown export '\(name)' in EXPORT_NAME")
        }
        if extendedHeaders { return Self.exportNameAfterExtendedHeaders }
        let session = makeSession(export, honoursBlockSize: false, viaExportName: true)
        var w = ByteWriter(capacity: 134)
        w.put(export.size)
        w.put(session.flags.rawValue)
        if !clientFlags.contains(.noZeroes) { w.put(zeroes: 124) }
        return .transmission(w.bytes, session)
    }

    private func list(_ payload: [UInt8]) -> Outcome {
        if !payload.isEmpty { return invalid(OptionCode.list, "LIST takes no data") }
        var out: [UInt8] = []
        for e in catalog.list() {
            var w = ByteWriter()
            let name = Array(e.name.utf8)
            w.put(UInt32(name.count))
            w.put(bytes: name)
            w.put(string: e.description)
            out += Self.optionReply(OptionCode.list, OptionReplyType.server, data: w.bytes)
        }
        out += Self.optionReply(OptionCode.list, OptionReplyType.ack)
        return .reply(out)
    }

    private mutating func infoOrGo(_ code: UInt32, _ payload: [UInt8]) -> Outcome {
        var r = ByteReader(payload)
        guard let nameLength = try? r.get(UInt32.self), Int(nameLength) <= payload.count - 6 else {
            return invalid(code, "malformed \(OptionCode.name(code)) request")
        }
        guard nameLength <= NBDLimits.maxString else { return invalid(code, "export name longer than 4096 bytes") }
        guard let nameBytes = try? r.get(count: Int(nameLength)), let name = decodeProtocolString(nameBytes) else {
            return invalid(code, "export name is not valid UTF-8")
        }
        guard let count = try? r.get(UInt16.self), r.remaining == Int(count) * 2 else {
            return invalid(code, "information request list does not match the option length")
        }
        var requests: [UInt16] = []
        for _ in 0..<count { requests.append((try? r.get(UInt16.self)) ?? 0) }
        guard let export = catalog.lookup(name) else {
            return .reply(Self.optionReply(code, OptionReplyType.errUnknown, message: "unknown export '\(name)'"))
        }
        let honours = requests.contains(InfoType.blockSize)
        let session = makeSession(export, honoursBlockSize: honours, viaExportName: false)
        var out: [UInt8] = []
        var w = ByteWriter(capacity: 12)
        w.put(InfoType.export)
        w.put(export.size)
        w.put(session.flags.rawValue)
        out += Self.optionReply(code, OptionReplyType.info, data: w.bytes)
        if requests.contains(InfoType.name) {
            var n = ByteWriter()
            n.put(InfoType.name)
            n.put(string: export.name)
            out += Self.optionReply(code, OptionReplyType.info, data: n.bytes)
        }
        if requests.contains(InfoType.description), !export.description.isEmpty {
            var d = ByteWriter()
            d.put(InfoType.description)
            d.put(string: export.description)
            out += Self.optionReply(code, OptionReplyType.info, data: d.bytes)
        }
        // Block size is sent whether or not it was asked for; clients ignore what they do not use.
        var b = ByteWriter(capacity: 14)
        b.put(InfoType.blockSize)
        b.put(export.minimumBlock)
        b.put(export.preferredBlock)
        b.put(export.maximumPayload)
        out += Self.optionReply(code, OptionReplyType.info, data: b.bytes)
        out += Self.optionReply(code, OptionReplyType.ack)
        if code == OptionCode.go { return .transmission(out, session) }
        return .reply(out)
    }

    private mutating func metaContext(_ code: UInt32, _ payload: [UInt8]) -> Outcome {
        let isSet = code == OptionCode.setMetaContext
        if isSet {
            // SET replaces the selection even when it fails.
            selectedContexts = []
            contextsExportName = nil
        }
        guard structuredReplies else { return invalid(code, "negotiate structured replies first") }
        var r = ByteReader(payload)
        guard let nameLength = try? r.get(UInt32.self), nameLength <= NBDLimits.maxString,
              let nameBytes = try? r.get(count: Int(nameLength)), let name = decodeProtocolString(nameBytes),
              let queryCount = try? r.get(UInt32.self) else {
            return invalid(code, "malformed \(OptionCode.name(code)) request")
        }
        var queries: [String] = []
        for _ in 0..<queryCount {
            guard let length = try? r.get(UInt32.self), length <= NBDLimits.maxString,
                  let bytes = try? r.get(count: Int(length)), let q = decodeProtocolString(bytes) else {
                return invalid(code, "malformed query in \(OptionCode.name(code))")
            }
            guard let colon = q.firstIndex(of: ":"), colon != q.startIndex else {
                return invalid(code, "query '\(q)' has no namespace")
            }
            queries.append(q)
        }
        guard r.remaining == 0 else { return invalid(code, "trailing bytes in \(OptionCode.name(code))") }
        guard let export = catalog.lookup(name) else {
            return .reply(Self.optionReply(code, OptionReplyType.errUnknown, message: "unknown export '\(name)'"))
        }
        var matched: [MetaContext] = []
        for (index, context) in export.metaContexts.enumerated() {
            let selected: Bool
            if isSet {
                selected = queries.contains(context)
            } else {
                selected = queries.isEmpty || queries.contains { q in q == context || (q.hasSuffix(":") && context.hasPrefix(q)) }
            }
            if selected { matched.append(MetaContext(id: isSet ? UInt32(index + 1) : 0, name: context)) }
        }
        if isSet && matched.count > NBDLimits.maxMetaContexts {
            return .reply(Self.optionReply(code, OptionReplyType.errTooBig, message: "too many meta contexts"))
        }
        var out: [UInt8] = []
        for m in matched {
            var w = ByteWriter()
            w.put(m.id)
            w.put(string: m.name)
            out += Self.optionReply(code, OptionReplyType.metaContext, data: w.bytes)
        }
        out += Self.optionReply(code, OptionReplyType.ack)
        if isSet {
            selectedContexts = matched
            contextsExportName = export.name
        }
        return .reply(out)
    }

    // MARK: helpers

    private func makeSession(_ export: ExportDescriptor, honoursBlockSize: Bool, viaExportName: Bool) -> NegotiatedSession {
        var flags = export.flags.union(.hasFlags)
        if structuredReplies { flags.insert(.sendDF) } else { flags.remove(.sendDF) }
        if !flags.contains(.sendWriteZeroes) { flags.remove(.sendFastZero) }
        // The BLOCK_STATUS payload form (extended headers only) is not implemented.
        flags.remove(.blockStatusPayload)
        let contexts = (structuredReplies && contextsExportName == export.name) ? selectedContexts : []
        return NegotiatedSession(export: export, flags: flags, structuredReplies: structuredReplies,
                                 metaContexts: contexts, clientHonoursBlockSize: honoursBlockSize,
                                 viaExportName: viaExportName, extendedHeaders: extendedHeaders)
    }

    private func invalid(_ code: UInt32, _ message: String) -> Outcome {
        .reply(Self.optionReply(code, OptionReplyType.errInvalid, message: message))
    }

    /// Encodes one option reply: magic, option, type, length, data.
    public static func optionReply(_ code: UInt32, _ type: UInt32, data: [UInt8] = []) -> [UInt8] {
        var w = ByteWriter(capacity: 20 + data.count)
        w.put(NBDMagic.optionReply)
        w.put(code)
        w.put(type)
        w.put(UInt32(data.count))
        w.put(bytes: data)
        return w.bytes
    }

    /// Error reply with a message for people.
    public static func optionReply(_ code: UInt32, _ type: UInt32, message: String) -> [UInt8] {
        optionReply(code, type, data: Array(message.utf8.prefix(NBDLimits.maxString)))
    }
}
