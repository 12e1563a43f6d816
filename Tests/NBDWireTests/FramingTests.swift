import NBDWire
import Testing

/// The framing the server and nbd-fuzz share (NBDWire/Framing.swift): option headers read,
/// skipped or dropped at the limits, request payloads consumed or refused.
@Suite(.timeLimit(.minutes(5))) struct FramingTests {
    func header(magic: UInt64 = NBDMagic.haveOption, code: UInt32 = OptionCode.go, length: UInt32) -> [UInt8] {
        var w = ByteWriter(capacity: 16)
        w.put(magic)
        w.put(code)
        w.put(length)
        return w.bytes
    }

    @Test func optionsAreReadSkippedOrDroppedAtTheLimits() {
        let read = NBDLimits.maxOptionPayload, skip = NBDLimits.maxSkippableOptionPayload
        #expect(OptionFrame.decode(header(length: 0)) == .read(code: OptionCode.go, length: 0))
        #expect(OptionFrame.decode(header(length: UInt32(read))) == .read(code: OptionCode.go, length: read))
        #expect(OptionFrame.decode(header(length: UInt32(read + 1))) == .skip(code: OptionCode.go, length: read + 1))
        #expect(OptionFrame.decode(header(length: UInt32(skip))) == .skip(code: OptionCode.go, length: skip))
        #expect(OptionFrame.decode(header(length: UInt32(skip + 1))) == .drop(reason: "option of \(skip + 1) bytes"))
        #expect(OptionFrame.decode(header(length: UInt32.max)) == .drop(reason: "option of \(UInt32.max) bytes"))
        #expect(OptionFrame.decode(header(magic: NBDMagic.haveOption ^ 1, length: 0)) == .drop(reason: "bad option magic"))
        #expect(OptionFrame.decode(Array(header(length: 0).prefix(15))) == .drop(reason: "bad option magic"), "a short header")
    }

    func session(extended: Bool) -> NegotiatedSession {
        let flags: TransmissionFlags = [.hasFlags, .sendFlush, .sendFUA, .sendTrim, .sendDF]
        let export = ExportDescriptor(name: "vol", size: 1 << 40, flags: flags)
        return NegotiatedSession(export: export, flags: flags, structuredReplies: extended, metaContexts: [],
                                 clientHonoursBlockSize: false, viaExportName: false, extendedHeaders: extended)
    }

    func req(_ t: CommandType, _ flags: CommandFlags = [], length: UInt64) -> Request {
        Request(flags: flags, typeCode: t.rawValue, cookie: 1, offset: 0, length: length)
    }

    @Test func requestPayloadsAreConsumedOrRefused() {
        let compact = session(extended: false), extended = session(extended: true)
        #expect(Request.headerSize(extended: false) == 28)
        #expect(Request.headerSize(extended: true) == 32)
        // Compact: WRITE's length always follows (up to 4 GiB: skipped even when rejected).
        #expect(RequestCheck.payload(of: req(.write, length: 77), session: compact) == .consume(77))
        #expect(RequestCheck.payload(of: req(.write, length: (1 << 32) - 1), session: compact) == .consume((1 << 32) - 1))
        #expect(RequestCheck.payload(of: req(.read, length: 77), session: compact) == .consume(0))
        // Extended: PAYLOAD_LEN's up to the maximum payload; beyond it, a hang-up.
        let max = UInt64(extended.maximumRequestPayload)
        #expect(RequestCheck.payload(of: req(.write, .payloadLength, length: max), session: extended) == .consume(max))
        #expect(RequestCheck.payload(of: req(.write, .payloadLength, length: max + 1), session: extended) == .disconnect)
        #expect(RequestCheck.payload(of: req(.blockStatus, .payloadLength, length: 12), session: extended) == .consume(12))
        #expect(RequestCheck.payload(of: req(.write, length: 77), session: extended) == .consume(0), "no PAYLOAD_LEN, no payload")
        #expect(RequestCheck.payload(of: req(.trim, length: 1 << 35), session: extended) == .consume(0))
    }
}
