import NBDWire
import Testing

@Suite(.timeLimit(.minutes(5))) struct RequestCheckTests {
    func session(structured: Bool = true, readOnly: Bool = false, contexts: [MetaContext] = [MetaContext(id: 1, name: "base:allocation")]) -> NegotiatedSession {
        var flags = baseFlags
        if readOnly { flags.insert(.readOnly) }
        if structured { flags.insert(.sendDF) }
        let export = ExportDescriptor(name: "vol", size: 1 << 20, flags: flags)
        return NegotiatedSession(export: export, flags: flags, structuredReplies: structured, metaContexts: structured ? contexts : [],
                                 clientHonoursBlockSize: true, viaExportName: false)
    }

    func req(_ t: CommandType, _ flags: CommandFlags = [], offset: UInt64 = 0, length: UInt64 = 4096) -> Request {
        Request(flags: flags, typeCode: t.rawValue, cookie: 1, offset: offset, length: length)
    }

    @Test func acceptsOrdinaryRequests() {
        let s = session()
        for t in [CommandType.read, .write, .trim, .cache, .writeZeroes, .blockStatus] {
            #expect(RequestCheck.check(req(t), session: s) == .accept)
        }
        #expect(RequestCheck.check(req(.flush, length: 0), session: s) == .accept)
        #expect(RequestCheck.check(req(.write, .fua), session: s) == .accept)
        #expect(RequestCheck.check(req(.read, .fua), session: s) == .accept, "FUA is valid on every command once negotiated")
        #expect(RequestCheck.check(req(.writeZeroes, [.noHole, .fastZero]), session: s) == .accept)
        #expect(RequestCheck.check(req(.blockStatus, .requestOne), session: s) == .accept)
        #expect(RequestCheck.check(req(.read, .dontFragment), session: s) == .accept)
    }

    func code(_ v: RequestCheck.Verdict) -> NBDErrno? {
        if case .reject(let e, _) = v { return e }
        return nil
    }

    @Test func rejectsPerSpec() {
        let s = session()
        #expect(code(RequestCheck.check(Request(flags: [], typeCode: 99, cookie: 1, offset: 0, length: 0), session: s)) == .invalid)
        #expect(code(RequestCheck.check(req(.read, .noHole), session: s)) == .invalid)
        #expect(code(RequestCheck.check(req(.write, CommandFlags(rawValue: 0x100)), session: s)) == .invalid)
        #expect(code(RequestCheck.check(req(.read, offset: 1 << 20), session: s)) == .invalid)
        #expect(code(RequestCheck.check(req(.write, offset: (1 << 20) - 100), session: s)) == .noSpace)
        #expect(code(RequestCheck.check(req(.writeZeroes, offset: 1 << 20), session: s)) == .noSpace)
        #expect(code(RequestCheck.check(req(.trim, offset: UInt64.max - 10, length: 100), session: s)) == .invalid)
        #expect(code(RequestCheck.check(req(.flush, offset: 1, length: 0), session: s)) == .invalid)
        #expect(code(RequestCheck.check(req(.resize), session: s)) == .invalid)
        var big = s
        big.export.size = 1 << 40
        #expect(code(RequestCheck.check(req(.read, length: 64 << 20), session: big)) == .overflow)
        big.structuredReplies = false
        #expect(code(RequestCheck.check(req(.read, length: 64 << 20), session: big)) == .invalid)
        #expect(code(RequestCheck.check(req(.write, length: 64 << 20), session: big)) == .invalid)
        #expect(code(RequestCheck.check(req(.blockStatus), session: session(contexts: []))) == .invalid)
        #expect(code(RequestCheck.check(req(.read, .dontFragment), session: session(structured: false))) == .invalid)
    }

    @Test func readOnlyExports() {
        let s = session(readOnly: true)
        #expect(code(RequestCheck.check(req(.write), session: s)) == .permission)
        #expect(code(RequestCheck.check(req(.trim), session: s)) == .permission, "spec: EPERM for write or trim on a read-only export")
        #expect(RequestCheck.check(req(.read), session: s) == .accept)
    }

    @Test func writePayloadIsAlwaysConsumed() {
        #expect(RequestCheck.payloadLength(of: req(.write, length: 77)) == 77)
        #expect(RequestCheck.payloadLength(of: req(.read, length: 77)) == 0)
        // Compact headers: PAYLOAD_LEN means nothing for framing (and is rejected as a flag).
        #expect(RequestCheck.payloadLength(of: req(.trim, .payloadLength, length: 77)) == 0)
        #expect(code(RequestCheck.check(req(.write, .payloadLength), session: session())) == .invalid)
    }

    /// READ and WRITE up to the advertised 32 MiB for a client that asked for the block sizes
    /// (it promised to keep to them); up to 64 MiB (nbdkit's limit) for one that did not.
    @Test func largestRequestDependsOnWhetherBlockSizesWereNegotiated() {
        var flags = baseFlags
        flags.insert(.sendDF)
        let export = ExportDescriptor(name: "vol", size: 1 << 30, flags: flags)
        for honours in [true, false] {
            let s = NegotiatedSession(export: export, flags: flags, structuredReplies: true, metaContexts: [],
                                      clientHonoursBlockSize: honours, viaExportName: false)
            let limit: UInt64 = honours ? 32 << 20 : 64 << 20
            #expect(s.maximumRequestPayload == UInt32(limit))
            for t in [CommandType.read, .write] {
                #expect(RequestCheck.check(req(t, length: limit), session: s) == .accept, "\(t.name) of \(limit), honours \(honours)")
                #expect(RequestCheck.check(req(t, length: limit + 1), session: s) != .accept, "\(t.name) one byte over, honours \(honours)")
            }
            #expect(RequestCheck.check(req(.trim, length: 512 << 20), session: s) == .accept, "effect lengths are not payloads")
        }
        let extended = NegotiatedSession(export: export, flags: flags, structuredReplies: true, metaContexts: [],
                                         clientHonoursBlockSize: false, viaExportName: false, extendedHeaders: true)
        #expect(!RequestCheck.payloadForcesDisconnect(req(.write, .payloadLength, length: 64 << 20), session: extended))
        #expect(RequestCheck.payloadForcesDisconnect(req(.write, .payloadLength, length: (64 << 20) + 1), session: extended))
    }

    /// An extended-headers session on a 1 TiB export.
    func extendedSession() -> NegotiatedSession {
        var flags = baseFlags
        flags.insert(.sendDF)
        let export = ExportDescriptor(name: "vol", size: 1 << 40, flags: flags)
        return NegotiatedSession(export: export, flags: flags, structuredReplies: false, metaContexts: [MetaContext(id: 1, name: "base:allocation")],
                                 clientHonoursBlockSize: true, viaExportName: false, extendedHeaders: true)
    }

    @Test func extendedHeadersImplyStructuredReplies() {
        #expect(extendedSession().structuredReplies)
    }

    @Test func extendedPayloadFollowsPayloadLenOnly() {
        #expect(RequestCheck.payloadLength(of: req(.write, .payloadLength, length: 77), extended: true) == 77)
        #expect(RequestCheck.payloadLength(of: req(.write, length: 77), extended: true) == 0, "no flag, no payload")
        #expect(RequestCheck.payloadLength(of: req(.blockStatus, .payloadLength, length: 12), extended: true) == 12)
        #expect(RequestCheck.payloadLength(of: req(.trim, length: 1 << 33), extended: true) == 0)
    }

    @Test func extendedRequestsWith64BitEffectLengths() {
        let s = extendedSession()
        let big: UInt64 = 6 << 30
        #expect(RequestCheck.check(req(.write, .payloadLength, length: 4096), session: s) == .accept)
        #expect(RequestCheck.check(req(.write, [.payloadLength, .fua], length: 4096), session: s) == .accept)
        for t in [CommandType.trim, .writeZeroes, .blockStatus, .cache] {
            #expect(RequestCheck.check(req(t, offset: 1 << 32, length: big), session: s) == .accept, "\(t.name) of 6 GiB")
        }
        #expect(code(RequestCheck.check(req(.read, length: big), session: s)) == .overflow, "reads stay within the maximum payload")
        #expect(code(RequestCheck.check(req(.trim, offset: (1 << 40) - 4096, length: big), session: s)) == .invalid)
        #expect(code(RequestCheck.check(req(.writeZeroes, offset: 4096, length: UInt64.max - 100), session: s)) == .noSpace)
    }

    @Test func extendedWriteNeedsPayloadLenAndOthersMustNotHaveIt() {
        let s = extendedSession()
        #expect(code(RequestCheck.check(req(.write), session: s)) == .invalid)
        for t in [CommandType.read, .trim, .writeZeroes, .blockStatus, .cache, .flush, .disconnect] {
            #expect(code(RequestCheck.check(req(t, .payloadLength, length: 0), session: s)) == .invalid, "\(t.name) with PAYLOAD_LEN")
        }
    }

    @Test func oversizedExtendedPayloadsForceADisconnectAndAreNeverAccepted() {
        let s = extendedSession()
        let max = UInt64(s.export.maximumPayload)
        for t in [CommandType.write, .read, .trim, .blockStatus] {
            let over = req(t, .payloadLength, length: max + 1)
            #expect(RequestCheck.payloadForcesDisconnect(over, session: s), "\(t.name)")
            #expect(code(RequestCheck.check(over, session: s)) != nil)
        }
        #expect(!RequestCheck.payloadForcesDisconnect(req(.write, .payloadLength, length: max), session: s))
        #expect(!RequestCheck.payloadForcesDisconnect(req(.trim, length: 1 << 35), session: s), "effect lengths are not payloads")
        #expect(!RequestCheck.payloadForcesDisconnect(req(.write, .payloadLength, length: max + 1), session: session()),
                "compact headers: an oversized write's payload is skipped")
    }
}
