import NBDWire
import Testing

/// Extended request headers and extended reply chunks against layouts written out by hand
/// from the spec (extension-ext-header branch of doc/proto.md).
@Suite(.timeLimit(.minutes(5))) struct ExtendedCodecTests {
    @Test func decodesExtendedRequestWith64BitLength() {
        let bytes = be(UInt32(0x21e4_1c71)) + be(UInt16(0x21)) + be(UInt16(1)) + be(UInt64(0xC0FF_EE00_0000_0001))
            + be(UInt64(5 << 30)) + be(UInt64(0x1_0000_0200))
        #expect(bytes.count == Request.extendedSize)
        let decoded = bytes.withUnsafeBytes { Request.decode($0.baseAddress!, extended: true) }
        #expect(decoded == .request(Request(flags: [.fua, .payloadLength], typeCode: 1, cookie: 0xC0FF_EE00_0000_0001,
                                            offset: 5 << 30, length: 0x1_0000_0200)))
    }

    @Test func eachStyleRejectsTheOthersMagic() {
        let compact = be(UInt32(0x2560_9513)) + [UInt8](repeating: 0, count: 28)
        let extended = be(UInt32(0x21e4_1c71)) + [UInt8](repeating: 0, count: 28)
        #expect(compact.withUnsafeBytes { Request.decode($0.baseAddress!, extended: true) } == .badMagic(0x2560_9513))
        #expect(extended.withUnsafeBytes { Request.decode($0.baseAddress!) } == .badMagic(0x21e4_1c71))
    }

    @Test func extendedEncodeRoundTripKeeps64Bits() {
        let r = Request(flags: .payloadLength, typeCode: 4, cookie: 9, offset: 1 << 33, length: 0x2_0000_1000)
        let bytes = r.encoded(extended: true)
        #expect(bytes.count == 32)
        #expect(Array(bytes.prefix(4)) == be(UInt32(0x21e4_1c71)))
        #expect(Array(bytes.suffix(8)) == be(UInt64(0x2_0000_1000)))
        #expect(bytes.withUnsafeBytes { Request.decode($0.baseAddress!, extended: true) } == .request(r))
        // The compact form can only carry the low 32 bits.
        #expect(Array(r.encoded().suffix(4)) == be(UInt32(0x1000)))
    }

    /// magic, flags, type, cookie, offset, 64-bit length.
    func header(_ flags: UInt16, _ type: UInt16, cookie: UInt64, offset: UInt64, length: UInt64) -> [UInt8] {
        be(UInt32(0x6e8a_278c)) + be(flags) + be(type) + be(cookie) + be(offset) + be(length)
    }

    func encode(_ size: Int, _ body: (UnsafeMutableRawPointer) -> Int) -> [UInt8] {
        var buf = [UInt8](repeating: 0xEE, count: size)
        let n = buf.withUnsafeMutableBytes { body($0.baseAddress!) }
        #expect(n == size)
        return buf
    }

    @Test func noneChunk() {
        let b = encode(ExtendedReply.noneSize) { ExtendedReply.none(cookie: 7, offset: 1 << 40, into: $0) }
        #expect(b == header(1, 0, cookie: 7, offset: 1 << 40, length: 0))
    }

    @Test func offsetDataAndHoleCarryTheRequestOffsetInTheHeader() {
        let d = encode(ExtendedReply.offsetDataHeaderSize) {
            ExtendedReply.offsetDataHeader(cookie: 3, offset: 4096, dataOffset: 8192, dataLength: 512, done: false, into: $0)
        }
        #expect(d == header(0, 1, cookie: 3, offset: 4096, length: 520) + be(UInt64(8192)))
        let h = encode(ExtendedReply.offsetHoleSize) {
            ExtendedReply.offsetHole(cookie: 3, offset: 4096, holeOffset: 12288, length: 65536, done: true, into: $0)
        }
        #expect(h == header(1, 2, cookie: 3, offset: 4096, length: 12) + be(UInt64(12288)) + be(UInt32(65536)))
    }

    @Test func blockStatusExtLayout() {
        let b = encode(ExtendedReply.blockStatusHeaderSize + 2 * ExtendedReply.extentSize) { p in
            var n = ExtendedReply.blockStatusHeader(cookie: 5, offset: 0, contextID: 2, extentCount: 2, done: true, into: p)
            n += ExtendedReply.extent(length: 6 << 30, status: 3, into: p + n)
            n += ExtendedReply.extent(length: 4096, status: 0, into: p + n)
            return n
        }
        #expect(b == header(1, 6, cookie: 5, offset: 0, length: 8 + 32) + be(UInt32(2)) + be(UInt32(2))
                + be(UInt64(6 << 30)) + be(UInt64(3)) + be(UInt64(4096)) + be(UInt64(0)))
    }

    @Test func errorChunk() {
        let e = ExtendedReply.errorChunk(cookie: 11, offset: 77, error: .overflow, message: "too big")
        #expect(e == header(1, 0x8001, cookie: 11, offset: 77, length: 13) + be(UInt32(75)) + be(UInt16(7)) + Array("too big".utf8))
        #expect(e.count == ExtendedReply.errorSize(messageLength: 7))
        let long = ExtendedReply.errorChunk(cookie: 1, offset: 0, error: .io, message: String(repeating: "x", count: 5000))
        #expect(long.count == 32 + 6 + 4096, "messages are cut to the spec's 4096 bytes")
    }
}
