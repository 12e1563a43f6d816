import NBDWire
import Testing

/// NBD_OPT_EXTENDED_HEADERS in the negotiator: acknowledgement, orderings with
/// NBD_OPT_STRUCTURED_REPLY, repeats, EXPORT_NAME, and what GO then settles.
@Suite(.timeLimit(.minutes(5))) struct ExtendedNegotiationTests {
    func types(_ o: Negotiator.Outcome) -> [UInt32] {
        guard case .reply(let bytes) = o else { return [] }
        return replies(bytes).map(\.1)
    }

    func go(_ n: inout Negotiator, _ name: String = "vol") -> (flags: TransmissionFlags, session: NegotiatedSession)? {
        guard case .transmission(let bytes, let session) = n.handle(code: OptionCode.go, payload: goPayload(name, infos: [InfoType.blockSize])) else {
            return nil
        }
        let export = replies(bytes).first { $0.1 == OptionReplyType.info && $0.2.prefix(2) == [0, 0] }!.2
        return (TransmissionFlags(rawValue: UInt16(export[10]) << 8 | UInt16(export[11])), session)
    }

    @Test func acknowledgedAndImpliesStructuredReplies() {
        var n = Negotiator(catalog: catalog)
        #expect(types(n.handle(code: OptionCode.extendedHeaders, payload: [])) == [OptionReplyType.ack])
        #expect(n.extendedHeaders && n.structuredReplies)
        guard let (flags, session) = go(&n) else { Issue.record("GO failed"); return }
        #expect(session.extendedHeaders && session.structuredReplies)
        #expect(flags.contains(.sendDF), "DF: replies are chunks")
        #expect(!flags.contains(.blockStatusPayload), "the BLOCK_STATUS payload form is not implemented, so not advertised")
    }

    @Test func afterStructuredRepliesItIsStillAcknowledged() {
        var n = Negotiator(catalog: catalog)
        #expect(types(n.handle(code: OptionCode.structuredReply, payload: [])) == [OptionReplyType.ack])
        #expect(types(n.handle(code: OptionCode.extendedHeaders, payload: [])) == [OptionReplyType.ack])
        #expect(go(&n)?.session.extendedHeaders == true)
    }

    @Test func structuredRepliesAfterwardsAreRefusedWithExtHeaderRequired() {
        var n = Negotiator(catalog: catalog)
        _ = n.handle(code: OptionCode.extendedHeaders, payload: [])
        #expect(types(n.handle(code: OptionCode.structuredReply, payload: [])) == [OptionReplyType.errExtendedHeaderRequired])
        #expect(types(n.handle(code: OptionCode.structuredReply, payload: [1])) == [OptionReplyType.errInvalid], "data is still invalid")
        #expect(go(&n)?.session.extendedHeaders == true, "no downgrade")
    }

    @Test func repeatsAndDataAreInvalidAndChangeNothing() {
        var n = Negotiator(catalog: catalog)
        #expect(types(n.handle(code: OptionCode.extendedHeaders, payload: [0])) == [OptionReplyType.errInvalid])
        #expect(!n.extendedHeaders && !n.structuredReplies)
        _ = n.handle(code: OptionCode.extendedHeaders, payload: [])
        #expect(types(n.handle(code: OptionCode.extendedHeaders, payload: [])) == [OptionReplyType.errInvalid])
        #expect(n.extendedHeaders)
        #expect(go(&n)?.session.extendedHeaders == true)
    }

    @Test func exportNameAfterwardsEndsTheSession() {
        var n = Negotiator(catalog: catalog)
        _ = n.receiveClientFlags(3)
        _ = n.handle(code: OptionCode.extendedHeaders, payload: [])
        guard case .close(let bytes, _) = n.handle(code: OptionCode.exportName, payload: Array("vol".utf8)) else {
            Issue.record("EXPORT_NAME after extended headers must end the session"); return
        }
        #expect(bytes.isEmpty)
    }

    @Test func metaContextsWorkWithoutStructuredReplies() {
        var n = Negotiator(catalog: catalog)
        _ = n.handle(code: OptionCode.extendedHeaders, payload: [])
        #expect(types(n.handle(code: OptionCode.listMetaContext, payload: metaPayload("vol", ["base:"]))) == [OptionReplyType.metaContext, OptionReplyType.ack])
        #expect(types(n.handle(code: OptionCode.setMetaContext, payload: metaPayload("vol", ["base:allocation"]))) == [OptionReplyType.metaContext, OptionReplyType.ack])
        #expect(go(&n)?.session.metaContexts.map(\.name) == ["base:allocation"])
    }

    @Test func infoAndListAreUnchanged() {
        var n = Negotiator(catalog: catalog)
        _ = n.handle(code: OptionCode.extendedHeaders, payload: [])
        #expect(types(n.handle(code: OptionCode.list, payload: [])) == [OptionReplyType.server, OptionReplyType.server, OptionReplyType.ack])
        let info = types(n.handle(code: OptionCode.info, payload: goPayload("vol@s1", infos: [InfoType.blockSize])))
        #expect(info.first == OptionReplyType.info && info.last == OptionReplyType.ack)
    }

    @Test func blockStatusPayloadIsNeverAdvertised() {
        let odd = FakeCatalog(exports: [ExportDescriptor(name: "vol", size: 1 << 20, flags: baseFlags.union(.blockStatusPayload))])
        for extended in [false, true] {
            var n = Negotiator(catalog: odd)
            _ = n.handle(code: extended ? OptionCode.extendedHeaders : OptionCode.structuredReply, payload: [])
            #expect(go(&n).map { !$0.flags.contains(.blockStatusPayload) && !$0.session.flags.contains(.blockStatusPayload) } == true)
        }
    }

    @Test func withoutTheOptionNothingIsExtended() {
        var n = Negotiator(catalog: catalog)
        _ = n.handle(code: OptionCode.structuredReply, payload: [])
        #expect(go(&n)?.session.extendedHeaders == false)
    }
}
