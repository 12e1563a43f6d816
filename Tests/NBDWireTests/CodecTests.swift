import NBDWire
import Testing

/// Big-endian bytes built by hand, independent of the codec under test.
func be<T: FixedWidthInteger>(_ v: T) -> [UInt8] { withUnsafeBytes(of: v.bigEndian) { Array($0) } }

@Suite(.timeLimit(.minutes(5))) struct RequestCodecTests {
    @Test func decodesCompactRequest() {
        let bytes = be(UInt32(0x2560_9513)) + be(UInt16(1)) + be(UInt16(1)) + be(UInt64(0xDEAD_BEEF_0102_0304)) + be(UInt64(4096)) + be(UInt32(512))
        let decoded = bytes.withUnsafeBytes { Request.decode($0.baseAddress!) }
        #expect(decoded == .request(Request(flags: .fua, typeCode: 1, cookie: 0xDEAD_BEEF_0102_0304, offset: 4096, length: 512)))
    }

    @Test func rejectsBadMagic() {
        let bytes = be(UInt32(0x1256_0953)) + [UInt8](repeating: 0, count: 24)
        #expect(bytes.withUnsafeBytes { Request.decode($0.baseAddress!) } == .badMagic(0x1256_0953))
    }

    @Test func encodeDecodeRoundTrip() {
        let r = Request(flags: [.noHole, .fua], typeCode: 6, cookie: 7, offset: 1 << 40, length: 0xFFFF_FFFF)
        let bytes = r.encoded()
        #expect(bytes.count == 28)
        #expect(bytes.withUnsafeBytes { Request.decode($0.baseAddress!) } == .request(r))
    }

    @Test func simpleReplyLayout() {
        var buf = [UInt8](repeating: 0, count: 16)
        let n = buf.withUnsafeMutableBytes { Reply.simple(error: .noSpace, cookie: 0x0102_0304_0506_0708, into: $0.baseAddress!) }
        #expect(n == 16)
        #expect(buf == be(UInt32(0x6744_6698)) + be(UInt32(28)) + be(UInt64(0x0102_0304_0506_0708)))
    }

    @Test func structuredChunkLayouts() {
        var buf = [UInt8](repeating: 0, count: 32)
        _ = buf.withUnsafeMutableBytes { Reply.offsetHole(cookie: 9, offset: 4096, length: 8192, done: true, into: $0.baseAddress!) }
        #expect(buf == be(UInt32(0x668e_33ef)) + be(UInt16(1)) + be(UInt16(2)) + be(UInt64(9)) + be(UInt32(12)) + be(UInt64(4096)) + be(UInt32(8192)))
        var d = [UInt8](repeating: 0, count: 28)
        _ = d.withUnsafeMutableBytes { Reply.offsetDataHeader(cookie: 3, offset: 0, dataLength: 100, done: false, into: $0.baseAddress!) }
        #expect(d == be(UInt32(0x668e_33ef)) + be(UInt16(0)) + be(UInt16(1)) + be(UInt64(3)) + be(UInt32(108)) + be(UInt64(0)))
        let e = Reply.errorChunk(cookie: 5, error: .invalid, message: "bad")
        #expect(e == be(UInt32(0x668e_33ef)) + be(UInt16(1)) + be(UInt16(0x8001)) + be(UInt64(5)) + be(UInt32(9)) + be(UInt32(22)) + be(UInt16(3)) + Array("bad".utf8))
    }

    @Test func blockStatusLayout() {
        var buf = [UInt8](repeating: 0, count: 40)
        buf.withUnsafeMutableBytes { p in
            _ = Reply.blockStatusHeader(cookie: 1, contextID: 2, extentCount: 2, done: true, into: p.baseAddress!)
            _ = Reply.extent(length: 4096, flags: 3, into: p.baseAddress! + 24)
            _ = Reply.extent(length: 8192, flags: 0, into: p.baseAddress! + 32)
        }
        #expect(buf == be(UInt32(0x668e_33ef)) + be(UInt16(1)) + be(UInt16(5)) + be(UInt64(1)) + be(UInt32(20)) + be(UInt32(2))
                + be(UInt32(4096)) + be(UInt32(3)) + be(UInt32(8192)) + be(UInt32(0)))
    }

    @Test func protocolStrings() {
        #expect(decodeProtocolString(Array("vol@snap".utf8)) == "vol@snap")
        #expect(decodeProtocolString([0x61, 0x00, 0x62]) == nil)
        #expect(decodeProtocolString([0xC3, 0x28]) == nil)
        #expect(decodeProtocolString(Array("é".utf8)) == "é")
    }
}
