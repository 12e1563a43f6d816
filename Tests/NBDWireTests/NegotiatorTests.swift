import NBDWire
import Testing

struct FakeCatalog: ExportCatalog {
    var exports: [ExportDescriptor]
    func lookup(_ name: String) -> ExportDescriptor? { name.isEmpty ? exports.first : exports.first { $0.name == name } }
    func list() -> [ExportDescriptor] { exports }
}

let baseFlags: TransmissionFlags = [.hasFlags, .sendFlush, .sendFUA, .sendTrim, .sendWriteZeroes, .sendFastZero, .sendCache, .canMultiConn]
let catalog = FakeCatalog(exports: [
    ExportDescriptor(name: "vol", description: "the volume", size: 1 << 30, flags: baseFlags, metaContexts: ["base:allocation", "qemu:dirty-bitmap:s1", "qemu:dirty-bitmap:s2"]),
    ExportDescriptor(name: "vol@s1", description: "a snapshot", size: 1 << 30, flags: baseFlags.union(.readOnly)),
])

/// Parses concatenated option replies: (option, type, data).
func replies(_ bytes: [UInt8]) -> [(UInt32, UInt32, [UInt8])] {
    var out: [(UInt32, UInt32, [UInt8])] = []
    var r = ByteReader(bytes)
    while r.remaining > 0 {
        let magic = try! r.get(UInt64.self)
        precondition(magic == 0x0003_e889_0455_65a9)
        let opt = try! r.get(UInt32.self), type = try! r.get(UInt32.self), len = try! r.get(UInt32.self)
        out.append((opt, type, Array(try! r.get(count: Int(len)))))
    }
    return out
}

func goPayload(_ name: String, infos: [UInt16] = []) -> [UInt8] {
    be(UInt32(name.utf8.count)) + Array(name.utf8) + be(UInt16(infos.count)) + infos.flatMap { be($0) }
}

func metaPayload(_ name: String, _ queries: [String]) -> [UInt8] {
    var p = be(UInt32(name.utf8.count)) + Array(name.utf8) + be(UInt32(queries.count))
    for q in queries { p += be(UInt32(q.utf8.count)) + Array(q.utf8) }
    return p
}

@Suite(.timeLimit(.minutes(5))) struct NegotiatorTests {
    @Test func greeting() {
        #expect(Negotiator.greeting == be(UInt64(0x4e42_444d_4147_4943)) + be(UInt64(0x4948_4156_454F_5054)) + be(UInt16(3)))
    }

    @Test func unknownClientFlagsDropTheConnection() {
        var n = Negotiator(catalog: catalog)
        let known = n.receiveClientFlags(3)
        let unknown = n.receiveClientFlags(4)
        #expect(known)
        #expect(!unknown)
    }

    @Test func listsExportsWithDescriptions() {
        var n = Negotiator(catalog: catalog)
        guard case .reply(let bytes) = n.handle(code: OptionCode.list, payload: []) else { Issue.record("no reply"); return }
        let r = replies(bytes)
        #expect(r.count == 3)
        #expect(r[0].1 == OptionReplyType.server)
        #expect(r[0].2 == be(UInt32(3)) + Array("vol".utf8) + Array("the volume".utf8))
        #expect(r[2].1 == OptionReplyType.ack)
        guard case .reply(let bad) = n.handle(code: OptionCode.list, payload: [1]) else { return }
        #expect(replies(bad)[0].1 == OptionReplyType.errInvalid)
    }

    @Test func goEntersTransmissionWithInfo() {
        var n = Negotiator(catalog: catalog)
        _ = n.handle(code: OptionCode.structuredReply, payload: [])
        guard case .transmission(let bytes, let session) = n.handle(code: OptionCode.go, payload: goPayload("", infos: [InfoType.name, InfoType.blockSize, InfoType.description])) else {
            Issue.record("GO did not enter transmission"); return
        }
        let r = replies(bytes)
        #expect(r.last?.1 == OptionReplyType.ack)
        let infos = r.filter { $0.1 == OptionReplyType.info }.map { $0.2 }
        let export = infos.first { $0[0] == 0 && $0[1] == 0 }!
        #expect(export == be(UInt16(0)) + be(UInt64(1 << 30)) + be(baseFlags.union(.sendDF).rawValue))
        #expect(infos.contains(be(UInt16(1)) + Array("vol".utf8)))
        #expect(infos.contains(be(UInt16(2)) + Array("the volume".utf8)))
        #expect(infos.contains(be(UInt16(3)) + be(UInt32(1)) + be(UInt32(4096)) + be(UInt32(32 << 20))))
        #expect(session.export.name == "vol")
        #expect(session.structuredReplies)
        #expect(session.clientHonoursBlockSize)
    }

    @Test func infoDoesNotEnterTransmission() {
        var n = Negotiator(catalog: catalog)
        guard case .reply(let bytes) = n.handle(code: OptionCode.info, payload: goPayload("vol@s1")) else { Issue.record("INFO"); return }
        let export = replies(bytes).first { $0.1 == OptionReplyType.info }!.2
        // Without structured replies DF is not advertised; the snapshot is read-only.
        let flags = TransmissionFlags(rawValue: UInt16(export[10]) << 8 | UInt16(export[11]))
        #expect(flags.contains(.readOnly))
        #expect(!flags.contains(.sendDF))
    }

    @Test func unknownExportAndMalformedRequests() {
        var n = Negotiator(catalog: catalog)
        guard case .reply(let unknown) = n.handle(code: OptionCode.go, payload: goPayload("nope")) else { return }
        #expect(replies(unknown).map(\.1) == [OptionReplyType.errUnknown])
        guard case .reply(let short) = n.handle(code: OptionCode.go, payload: [0, 0, 0, 9, 65]) else { return }
        #expect(replies(short).map(\.1) == [OptionReplyType.errInvalid])
        guard case .reply(let odd) = n.handle(code: OptionCode.go, payload: goPayload("vol") + [7]) else { return }
        #expect(replies(odd).map(\.1) == [OptionReplyType.errInvalid])
        let long = String(repeating: "x", count: 5000)
        guard case .reply(let tooLong) = n.handle(code: OptionCode.info, payload: goPayload(long)) else { return }
        #expect(replies(tooLong).map(\.1) == [OptionReplyType.errInvalid])
        guard case .reply(let nul) = n.handle(code: OptionCode.info, payload: be(UInt32(3)) + [0x76, 0, 0x6c] + be(UInt16(0))) else { return }
        #expect(replies(nul).map(\.1) == [OptionReplyType.errInvalid])
    }

    @Test func unsupportedAndPolicyOptions() {
        var n = Negotiator(catalog: catalog)
        guard case .reply(let tls) = n.handle(code: OptionCode.startTLS, payload: []) else { return }
        #expect(replies(tls).map(\.1) == [OptionReplyType.errPolicy])
        guard case .reply(let unknown) = n.handle(code: 999, payload: [1, 2, 3]) else { return }
        #expect(replies(unknown).map(\.1) == [OptionReplyType.errUnsupported])
        guard case .reply(let peek) = n.handle(code: OptionCode.peekExport, payload: []) else { return }
        #expect(replies(peek).map(\.1) == [OptionReplyType.errUnsupported])
        guard case .reply(let big) = n.optionTooBig(code: OptionCode.list) else { return }
        #expect(replies(big).map(\.1) == [OptionReplyType.errTooBig])
    }

    @Test func structuredRepliesOnce() {
        var n = Negotiator(catalog: catalog)
        guard case .reply(let a) = n.handle(code: OptionCode.structuredReply, payload: []) else { return }
        #expect(replies(a).map(\.1) == [OptionReplyType.ack])
        guard case .reply(let b) = n.handle(code: OptionCode.structuredReply, payload: []) else { return }
        #expect(replies(b).map(\.1) == [OptionReplyType.errInvalid])
    }

    @Test func metaContextsNeedStructuredReplies() {
        var n = Negotiator(catalog: catalog)
        guard case .reply(let r) = n.handle(code: OptionCode.setMetaContext, payload: metaPayload("vol", ["base:allocation"])) else { return }
        #expect(replies(r).map(\.1) == [OptionReplyType.errInvalid])
    }

    @Test func listAndSetMetaContexts() {
        var n = Negotiator(catalog: catalog)
        _ = n.handle(code: OptionCode.structuredReply, payload: [])
        func names(_ o: Negotiator.Outcome) -> [String] {
            guard case .reply(let bytes) = o else { return ["<not a reply>"] }
            return replies(bytes).filter { $0.1 == OptionReplyType.metaContext }.map { String(decoding: $0.2.dropFirst(4), as: UTF8.self) }
        }
        #expect(names(n.handle(code: OptionCode.listMetaContext, payload: metaPayload("vol", []))) == ["base:allocation", "qemu:dirty-bitmap:s1", "qemu:dirty-bitmap:s2"])
        #expect(names(n.handle(code: OptionCode.listMetaContext, payload: metaPayload("vol", ["base:"]))) == ["base:allocation"])
        #expect(names(n.handle(code: OptionCode.listMetaContext, payload: metaPayload("vol", ["qemu:dirty-bitmap:"]))) == ["qemu:dirty-bitmap:s1", "qemu:dirty-bitmap:s2"])
        #expect(names(n.handle(code: OptionCode.listMetaContext, payload: metaPayload("vol", ["other:thing"]))) == [])
        // SET ignores the bare namespace and unknown leaves.
        #expect(names(n.handle(code: OptionCode.setMetaContext, payload: metaPayload("vol", ["base:", "base:nothing"]))) == [])
        #expect(names(n.handle(code: OptionCode.setMetaContext, payload: metaPayload("vol", ["base:allocation", "qemu:dirty-bitmap:s2"]))) == ["base:allocation", "qemu:dirty-bitmap:s2"])
        guard case .reply(let bad) = n.handle(code: OptionCode.setMetaContext, payload: metaPayload("vol", ["nocolon"])) else { return }
        #expect(replies(bad).map(\.1) == [OptionReplyType.errInvalid])
        // The failed SET cleared the selection.
        #expect(n.selectedContexts.isEmpty)
        _ = n.handle(code: OptionCode.setMetaContext, payload: metaPayload("vol", ["base:allocation"]))
        guard case .transmission(_, let session) = n.handle(code: OptionCode.go, payload: goPayload("vol")) else { return }
        #expect(session.metaContexts.map(\.name) == ["base:allocation"])
        #expect(session.metaContexts[0].id != 0)
    }

    @Test func contextsForAnotherExportAreDropped() {
        var n = Negotiator(catalog: catalog)
        _ = n.handle(code: OptionCode.structuredReply, payload: [])
        _ = n.handle(code: OptionCode.setMetaContext, payload: metaPayload("vol", ["base:allocation"]))
        guard case .transmission(_, let session) = n.handle(code: OptionCode.go, payload: goPayload("vol@s1")) else { return }
        #expect(session.metaContexts.isEmpty)
    }

    @Test func exportNameOption() {
        var n = Negotiator(catalog: catalog)
        let ok = n.receiveClientFlags(1)
        #expect(ok)
        guard case .transmission(let bytes, let session) = n.handle(code: OptionCode.exportName, payload: Array("vol".utf8)) else {
            Issue.record("EXPORT_NAME"); return
        }
        #expect(bytes.count == 8 + 2 + 124)
        #expect(session.viaExportName)
        var z = Negotiator(catalog: catalog)
        let ok3 = z.receiveClientFlags(3)
        #expect(ok3)
        guard case .transmission(let short, _) = z.handle(code: OptionCode.exportName, payload: []) else { return }
        #expect(short.count == 10)
        guard case .close = z.handle(code: OptionCode.exportName, payload: Array("missing".utf8)) else {
            Issue.record("unknown EXPORT_NAME must close"); return
        }
    }

    @Test func abortAcknowledgesAndCloses() {
        var n = Negotiator(catalog: catalog)
        guard case .close(let bytes, _) = n.handle(code: OptionCode.abort, payload: [1, 2]) else { Issue.record("ABORT"); return }
        #expect(replies(bytes).map(\.1) == [OptionReplyType.ack])
    }

    @Test func optionFloodIsCut() {
        var n = Negotiator(catalog: catalog)
        for _ in 0..<NBDLimits.maxOptionsPerHandshake { _ = n.handle(code: 1000, payload: []) }
        guard case .close = n.handle(code: 1000, payload: []) else { Issue.record("flood not cut"); return }
    }

    @Test func randomInputNeverTraps() {
        // Property: any option code and payload yields an outcome (no trap, no crash).
        var rng = SplitMix(seed: 42)
        for _ in 0..<20_000 {
            var n = Negotiator(catalog: catalog, tls: Negotiator.TLSMode.allCases[Int(rng.next() % 3)])
            _ = n.receiveClientFlags(UInt32(rng.next() % 4))
            if rng.next() & 1 == 0 { _ = n.handle(code: OptionCode.structuredReply, payload: []) }
            let code = UInt32(rng.next() % 14)
            let len = Int(rng.next() % 64)
            var payload = (0..<len).map { _ in UInt8(truncatingIfNeeded: rng.next()) }
            if rng.next() % 3 == 0, len >= 4 { payload.replaceSubrange(0..<4, with: be(UInt32(rng.next() % 8))) }
            _ = n.handle(code: code, payload: payload)
        }
    }
}

// MARK: TLS policy (STARTTLS, ERR_TLS_REQD)

extension NegotiatorTests {
    /// A negotiator whose client sent FIXED_NEWSTYLE | NO_ZEROES.
    func fixedClient(_ tls: Negotiator.TLSMode) -> Negotiator {
        var n = Negotiator(catalog: catalog, tls: tls)
        let accepted = n.receiveClientFlags(3)
        precondition(accepted)
        return n
    }

    /// The single reply type of an outcome that must be `.reply` with one option reply.
    func replyType(_ outcome: Negotiator.Outcome, option: UInt32, sourceLocation: SourceLocation = #_sourceLocation) -> UInt32? {
        guard case .reply(let bytes) = outcome else {
            Issue.record("expected a reply, got \(outcome)", sourceLocation: sourceLocation)
            return nil
        }
        let r = replies(bytes)
        #expect(r.count == 1, sourceLocation: sourceLocation)
        #expect(r.first?.0 == option, sourceLocation: sourceLocation)
        return r.first?.1
    }

    @Test func tlsOffAnswersStartTLSWithPolicy() {
        var n = fixedClient(.off)
        #expect(replyType(n.handle(code: OptionCode.startTLS, payload: []), option: OptionCode.startTLS) == OptionReplyType.errPolicy)
        #expect(!n.tlsActive)
        #expect(replyType(n.handle(code: OptionCode.startTLS, payload: [0]), option: OptionCode.startTLS) == OptionReplyType.errInvalid)
        guard case .transmission = n.handle(code: OptionCode.go, payload: goPayload("vol")) else { Issue.record("GO without TLS"); return }
    }

    @Test func startTLSAcknowledgesOnceThenIsInvalid() {
        for mode in [Negotiator.TLSMode.on, .require] {
            var n = fixedClient(mode)
            guard case .startTLS(let ack) = n.handle(code: OptionCode.startTLS, payload: []) else {
                Issue.record("STARTTLS not accepted with --tls \(mode)"); continue
            }
            #expect(replies(ack).map(\.0) == [OptionCode.startTLS])
            #expect(replies(ack).map(\.1) == [OptionReplyType.ack])
            #expect(n.tlsActive)
            // A second STARTTLS once TLS is active: ERR_INVALID (never TLS_REQD, never a second handshake).
            #expect(replyType(n.handle(code: OptionCode.startTLS, payload: []), option: OptionCode.startTLS) == OptionReplyType.errInvalid)
            #expect(n.tlsActive)
            // Negotiation goes on over TLS.
            #expect(replyType(n.handle(code: OptionCode.structuredReply, payload: []), option: OptionCode.structuredReply) == OptionReplyType.ack)
            guard case .transmission(_, let session) = n.handle(code: OptionCode.go, payload: goPayload("vol")) else {
                Issue.record("GO after STARTTLS with --tls \(mode)"); continue
            }
            #expect(session.structuredReplies)
        }
    }

    @Test func startTLSForgetsHeadersNegotiatedInTheClear() {
        var n = fixedClient(.on)
        #expect(replyType(n.handle(code: OptionCode.extendedHeaders, payload: []), option: OptionCode.extendedHeaders) == OptionReplyType.ack)
        #expect(n.extendedHeaders && n.structuredReplies)
        guard case .startTLS = n.handle(code: OptionCode.startTLS, payload: []) else { Issue.record("STARTTLS refused"); return }
        #expect(!n.extendedHeaders && !n.structuredReplies)
        guard case .transmission(_, let session) = n.handle(code: OptionCode.go, payload: goPayload("vol")) else {
            Issue.record("GO after STARTTLS"); return
        }
        #expect(!session.extendedHeaders && !session.structuredReplies)
    }

    @Test func startTLSWithDataIsInvalid() {
        var n = fixedClient(.require)
        #expect(replyType(n.handle(code: OptionCode.startTLS, payload: [1, 2]), option: OptionCode.startTLS) == OptionReplyType.errInvalid)
        #expect(!n.tlsActive)
    }

    @Test func tlsRequiredRefusesEveryOptionButStartTLSAndAbort() {
        var n = fixedClient(.require)
        let refused: [(UInt32, [UInt8])] = [
            (OptionCode.list, []), (OptionCode.info, goPayload("vol")), (OptionCode.go, goPayload("vol")),
            (OptionCode.go, goPayload("missing")), (OptionCode.structuredReply, []),
            (OptionCode.listMetaContext, metaPayload("vol", [])), (OptionCode.setMetaContext, metaPayload("vol", ["base:allocation"])),
            (OptionCode.peekExport, []), (OptionCode.extendedHeaders, []), (1000, [9, 9]),
        ]
        for (code, payload) in refused {
            #expect(replyType(n.handle(code: code, payload: payload), option: code) == OptionReplyType.errTLSRequired, "option \(code)")
        }
        // Nothing was negotiated meanwhile.
        #expect(!n.structuredReplies)
        #expect(!n.tlsActive)
        // An oversized option (payload skipped) is refused the same way.
        #expect(replyType(n.optionTooBig(code: OptionCode.info), option: OptionCode.info) == OptionReplyType.errTLSRequired)
        // EXPORT_NAME cannot carry an error: the session ends, with nothing sent.
        guard case .close(let bytes, _) = n.handle(code: OptionCode.exportName, payload: Array("vol".utf8)) else {
            Issue.record("EXPORT_NAME before STARTTLS must close"); return
        }
        #expect(bytes.isEmpty)
        guard case .close = n.optionTooBig(code: OptionCode.exportName) else { Issue.record("oversized EXPORT_NAME must close"); return }
        // ABORT is still acknowledged.
        var a = fixedClient(.require)
        guard case .close(let ack, _) = a.handle(code: OptionCode.abort, payload: []) else { Issue.record("ABORT"); return }
        #expect(replies(ack).map(\.1) == [OptionReplyType.ack])
    }

    @Test func tlsOnNeverAnswersTLSRequired() {
        var n = fixedClient(.on)
        guard case .reply(let info) = n.handle(code: OptionCode.info, payload: goPayload("vol")) else { Issue.record("INFO"); return }
        #expect(replies(info).last?.1 == OptionReplyType.ack)
        guard case .reply(let list) = n.handle(code: OptionCode.list, payload: []) else { Issue.record("LIST"); return }
        #expect(!replies(list).contains { $0.1 == OptionReplyType.errTLSRequired })
        guard case .transmission = n.handle(code: OptionCode.exportName, payload: Array("vol".utf8)) else {
            Issue.record("EXPORT_NAME without TLS under --tls on"); return
        }
    }

    @Test func startTLSForgetsEarlierNegotiation() {
        var n = fixedClient(.on)
        _ = n.handle(code: OptionCode.structuredReply, payload: [])
        _ = n.handle(code: OptionCode.setMetaContext, payload: metaPayload("vol", ["base:allocation"]))
        #expect(n.structuredReplies && n.selectedContexts.count == 1)
        guard case .startTLS = n.handle(code: OptionCode.startTLS, payload: []) else { Issue.record("STARTTLS"); return }
        #expect(!n.structuredReplies)
        #expect(n.selectedContexts.isEmpty && n.contextsExportName == nil)
        guard case .transmission(_, let session) = n.handle(code: OptionCode.go, payload: goPayload("vol")) else { Issue.record("GO"); return }
        #expect(!session.structuredReplies)
        #expect(session.metaContexts.isEmpty)
    }

    @Test func tlsNeedsFixedNewstyle() {
        // Required TLS: a client without FIXED_NEWSTYLE can never be served, so it is dropped.
        var r = Negotiator(catalog: catalog, tls: .require)
        #expect(r.checkClientFlags(0) != nil)
        #expect(r.checkClientFlags(2) != nil)
        #expect(r.checkClientFlags(1) == nil)
        // Optional TLS: served without it; STARTTLS gets ERR_POLICY (spec: NOTLS mode).
        var o = Negotiator(catalog: catalog, tls: .on)
        #expect(o.checkClientFlags(0) == nil)
        #expect(replyType(o.handle(code: OptionCode.startTLS, payload: []), option: OptionCode.startTLS) == OptionReplyType.errPolicy)
        #expect(!o.tlsActive)
    }
}

struct SplitMix: RandomNumberGenerator {
    var state: UInt64
    init(seed: UInt64) { state = seed }
    mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
}
