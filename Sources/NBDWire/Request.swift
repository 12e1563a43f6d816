// Transmission-phase requests.

/// A decoded request header. `length` is 32 bits on the wire in compact headers and 64 bits in
/// extended ones (NBD_OPT_EXTENDED_HEADERS), where it is a payload length when the flags carry
/// PAYLOAD_LEN and an effect length otherwise.
public struct Request: Sendable, Equatable {
    public var flags: CommandFlags
    public var typeCode: UInt16
    public var cookie: UInt64
    public var offset: UInt64
    public var length: UInt64

    public init(flags: CommandFlags, typeCode: UInt16, cookie: UInt64, offset: UInt64, length: UInt64) {
        self.flags = flags
        self.typeCode = typeCode
        self.cookie = cookie
        self.offset = offset
        self.length = length
    }

    public var type: CommandType? { CommandType(rawValue: typeCode) }

    /// Size of a compact request header (magic, flags, type, cookie, offset, 32-bit length).
    public static let compactSize = 28
    /// Size of an extended request header (64-bit length).
    public static let extendedSize = 32

    public enum Decoded: Sendable, Equatable {
        case request(Request)
        /// The magic was wrong: the stream cannot be trusted any more (hard disconnect).
        case badMagic(UInt32)
    }

    /// Decodes a header from `compactSize` (or, with `extended`, `extendedSize`) readable bytes.
    /// The other header's magic is a bad magic: the two sizes differ, so the stream is lost.
    @inline(__always)
    public static func decode(_ p: UnsafeRawPointer, extended: Bool = false) -> Decoded {
        let magic = loadBigEndian(UInt32.self, from: p)
        let expected = extended ? NBDMagic.extendedRequest : NBDMagic.request
        guard magic == expected else { return .badMagic(magic) }
        let length = extended ? loadBigEndian(UInt64.self, from: p + 24) : UInt64(loadBigEndian(UInt32.self, from: p + 24))
        return .request(Request(
            flags: CommandFlags(rawValue: loadBigEndian(UInt16.self, from: p + 4)),
            typeCode: loadBigEndian(UInt16.self, from: p + 6),
            cookie: loadBigEndian(UInt64.self, from: p + 8),
            offset: loadBigEndian(UInt64.self, from: p + 16),
            length: length))
    }

    /// Encodes a compact request header (used by tests and tools, never by the server), or an
    /// extended one (64-bit length) with `extended`.
    public func encode(into p: UnsafeMutableRawPointer, extended: Bool = false) {
        storeBigEndian(extended ? NBDMagic.extendedRequest : NBDMagic.request, to: p)
        storeBigEndian(flags.rawValue, to: p + 4)
        storeBigEndian(typeCode, to: p + 6)
        storeBigEndian(cookie, to: p + 8)
        storeBigEndian(offset, to: p + 16)
        if extended {
            storeBigEndian(length, to: p + 24)
        } else {
            storeBigEndian(UInt32(truncatingIfNeeded: length), to: p + 24)
        }
    }

    public func encoded(extended: Bool = false) -> [UInt8] {
        let size = extended ? Request.extendedSize : Request.compactSize
        return [UInt8](unsafeUninitializedCapacity: size) { buf, n in
            encode(into: UnsafeMutableRawPointer(buf.baseAddress!), extended: extended)
            n = size
        }
    }
}
