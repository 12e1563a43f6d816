// Extended reply chunks (NBD_OPT_EXTENDED_HEADERS), encoded into caller-owned memory.
//
// Once extended headers are negotiated every reply is one or more of these: the structured
// chunk types under a 32-byte header that also echoes the request's offset and carries a
// 64-bit payload length. There are no simple replies then, not even for success without data.

public enum ExtendedReply {
    /// Magic, flags, type, cookie, request offset, payload length.
    public static let headerSize = 32
    public static let noneSize = 32
    /// Header plus the 8-byte data offset that starts an OFFSET_DATA payload.
    public static let offsetDataHeaderSize = 40
    /// Header plus hole offset and 32-bit hole size.
    public static let offsetHoleSize = 44
    /// Header plus context id and descriptor count of a BLOCK_STATUS_EXT payload.
    public static let blockStatusHeaderSize = 40
    /// One BLOCK_STATUS_EXT descriptor: 64-bit length, 64-bit status.
    public static let extentSize = 16

    /// Extended chunk header. `offset` is the request's offset (the spec requires it to match,
    /// whatever offsets the payload carries).
    @inline(__always)
    public static func header(flags: UInt16, type: UInt16, cookie: UInt64, offset: UInt64, payloadLength: UInt64,
                              into p: UnsafeMutableRawPointer) -> Int {
        storeBigEndian(NBDMagic.extendedReply, to: p)
        storeBigEndian(flags, to: p + 4)
        storeBigEndian(type, to: p + 6)
        storeBigEndian(cookie, to: p + 8)
        storeBigEndian(offset, to: p + 16)
        storeBigEndian(payloadLength, to: p + 24)
        return headerSize
    }

    /// NONE chunk with DONE: success of a request without data.
    @inline(__always)
    public static func none(cookie: UInt64, offset: UInt64, into p: UnsafeMutableRawPointer) -> Int {
        header(flags: ChunkFlags.done, type: ChunkType.none, cookie: cookie, offset: offset, payloadLength: 0, into: p)
    }

    /// OFFSET_DATA header and data offset; `dataLength` bytes of data follow.
    @inline(__always)
    public static func offsetDataHeader(cookie: UInt64, offset: UInt64, dataOffset: UInt64, dataLength: UInt64, done: Bool,
                                        into p: UnsafeMutableRawPointer) -> Int {
        _ = header(flags: done ? ChunkFlags.done : 0, type: ChunkType.offsetData, cookie: cookie, offset: offset,
                   payloadLength: 8 + dataLength, into: p)
        storeBigEndian(dataOffset, to: p + 32)
        return offsetDataHeaderSize
    }

    /// OFFSET_HOLE chunk (the hole size stays 32 bits with extended headers).
    @inline(__always)
    public static func offsetHole(cookie: UInt64, offset: UInt64, holeOffset: UInt64, length: UInt32, done: Bool,
                                  into p: UnsafeMutableRawPointer) -> Int {
        _ = header(flags: done ? ChunkFlags.done : 0, type: ChunkType.offsetHole, cookie: cookie, offset: offset,
                   payloadLength: 12, into: p)
        storeBigEndian(holeOffset, to: p + 32)
        storeBigEndian(length, to: p + 40)
        return offsetHoleSize
    }

    /// BLOCK_STATUS_EXT header, context id and descriptor count; `extentCount` (nonzero)
    /// descriptors of `extentSize` bytes follow.
    @inline(__always)
    public static func blockStatusHeader(cookie: UInt64, offset: UInt64, contextID: UInt32, extentCount: Int, done: Bool,
                                         into p: UnsafeMutableRawPointer) -> Int {
        _ = header(flags: done ? ChunkFlags.done : 0, type: ChunkType.blockStatusExtended, cookie: cookie, offset: offset,
                   payloadLength: UInt64(8 + extentSize * extentCount), into: p)
        storeBigEndian(contextID, to: p + 32)
        storeBigEndian(UInt32(extentCount), to: p + 36)
        return blockStatusHeaderSize
    }

    /// One BLOCK_STATUS_EXT descriptor. 32-bit contexts leave the status's high half zero.
    @inline(__always)
    public static func extent(length: UInt64, status: UInt64, into p: UnsafeMutableRawPointer) -> Int {
        storeBigEndian(length, to: p)
        storeBigEndian(status, to: p + 8)
        return extentSize
    }

    /// Size of an ERROR chunk carrying `messageLength` bytes of message.
    public static func errorSize(messageLength: Int) -> Int { headerSize + 6 + messageLength }

    /// ERROR chunk with DONE: error, message length, message. `message` is cut to 4096 bytes.
    public static func errorChunk(cookie: UInt64, offset: UInt64, error: NBDErrno, message: String) -> [UInt8] {
        let text = Array(message.utf8.prefix(NBDLimits.maxString))
        var w = ByteWriter(capacity: errorSize(messageLength: text.count))
        w.put(NBDMagic.extendedReply)
        w.put(ChunkFlags.done)
        w.put(ChunkType.error)
        w.put(cookie)
        w.put(offset)
        w.put(UInt64(6 + text.count))
        w.put(error.rawValue)
        w.put(UInt16(text.count))
        w.put(bytes: text)
        return w.bytes
    }
}
