import NBDWire
import Testing

@Suite struct RequestCheckTests {
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
    }
}
