// Transmission-phase replies, encoded into caller-owned memory (no allocation).

public enum Reply {
    public static let simpleSize = 16
    public static let chunkHeaderSize = 20
    /// Chunk header plus the 8-byte offset that starts an OFFSET_DATA payload.
    public static let offsetDataHeaderSize = 28
    /// Chunk header plus offset and hole length.
    public static let offsetHoleSize = 32
    public static let noneSize = 20
    /// Chunk header plus the context id of a BLOCK_STATUS payload.
    public static let blockStatusHeaderSize = 24

    /// Simple reply: magic, error, cookie.
    @inline(__always)
    public static func simple(error: NBDErrno?, cookie: UInt64, into p: UnsafeMutableRawPointer) -> Int {
        storeBigEndian(NBDMagic.simpleReply, to: p)
        storeBigEndian(error?.rawValue ?? 0, to: p + 4)
        storeBigEndian(cookie, to: p + 8)
        return simpleSize
    }

    /// Structured chunk header: magic, flags, type, cookie, payload length.
    @inline(__always)
    public static func chunkHeader(flags: UInt16, type: UInt16, cookie: UInt64, payloadLength: UInt32, into p: UnsafeMutableRawPointer) -> Int {
        storeBigEndian(NBDMagic.structuredReply, to: p)
        storeBigEndian(flags, to: p + 4)
        storeBigEndian(type, to: p + 6)
        storeBigEndian(cookie, to: p + 8)
        storeBigEndian(payloadLength, to: p + 16)
        return chunkHeaderSize
    }

    /// OFFSET_DATA chunk header and offset; `dataLength` bytes of data follow.
    @inline(__always)
    public static func offsetDataHeader(cookie: UInt64, offset: UInt64, dataLength: UInt32, done: Bool, into p: UnsafeMutableRawPointer) -> Int {
        _ = chunkHeader(flags: done ? ChunkFlags.done : 0, type: ChunkType.offsetData, cookie: cookie, payloadLength: dataLength + 8, into: p)
        storeBigEndian(offset, to: p + 20)
        return offsetDataHeaderSize
    }

    /// OFFSET_HOLE chunk.
    @inline(__always)
    public static func offsetHole(cookie: UInt64, offset: UInt64, length: UInt32, done: Bool, into p: UnsafeMutableRawPointer) -> Int {
        _ = chunkHeader(flags: done ? ChunkFlags.done : 0, type: ChunkType.offsetHole, cookie: cookie, payloadLength: 12, into: p)
        storeBigEndian(offset, to: p + 20)
        storeBigEndian(length, to: p + 28)
        return offsetHoleSize
    }

    /// NONE chunk with the DONE flag.
    @inline(__always)
    public static func none(cookie: UInt64, into p: UnsafeMutableRawPointer) -> Int {
        chunkHeader(flags: ChunkFlags.done, type: ChunkType.none, cookie: cookie, payloadLength: 0, into: p)
    }

    /// BLOCK_STATUS chunk header and context id; `extentCount` descriptors of 8 bytes follow.
    @inline(__always)
    public static func blockStatusHeader(cookie: UInt64, contextID: UInt32, extentCount: Int, done: Bool, into p: UnsafeMutableRawPointer) -> Int {
        _ = chunkHeader(flags: done ? ChunkFlags.done : 0, type: ChunkType.blockStatus, cookie: cookie, payloadLength: UInt32(4 + 8 * extentCount), into: p)
        storeBigEndian(contextID, to: p + 20)
        return blockStatusHeaderSize
    }

    /// One block status descriptor.
    @inline(__always)
    public static func extent(length: UInt32, flags: UInt32, into p: UnsafeMutableRawPointer) -> Int {
        storeBigEndian(length, to: p)
        storeBigEndian(flags, to: p + 4)
        return 8
    }

    /// Size of an ERROR chunk carrying `messageLength` bytes of message.
    public static func errorSize(messageLength: Int) -> Int { chunkHeaderSize + 6 + messageLength }

    /// ERROR chunk with DONE: error, message length, message. `message` is cut to 4096 bytes.
    public static func errorChunk(cookie: UInt64, error: NBDErrno, message: String) -> [UInt8] {
        let text = Array(message.utf8.prefix(NBDLimits.maxString))
        var w = ByteWriter(capacity: errorSize(messageLength: text.count))
        w.put(NBDMagic.structuredReply)
        w.put(ChunkFlags.done)
        w.put(ChunkType.error)
        w.put(cookie)
        w.put(UInt32(6 + text.count))
        w.put(error.rawValue)
        w.put(UInt16(text.count))
        w.put(bytes: text)
        return w.bytes
    }
}
