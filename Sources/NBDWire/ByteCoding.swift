// Big-endian encoding helpers. No I/O.

/// Stores a big-endian integer at a raw pointer (no alignment required).
@inline(__always)
public func storeBigEndian<T: FixedWidthInteger>(_ value: T, to pointer: UnsafeMutableRawPointer) {
    pointer.storeBytes(of: value.bigEndian, as: T.self)
}

/// Loads a big-endian integer from a raw pointer (no alignment required).
@inline(__always)
public func loadBigEndian<T: FixedWidthInteger>(_ type: T.Type, from pointer: UnsafeRawPointer) -> T {
    T(bigEndian: pointer.loadUnaligned(as: T.self))
}

/// Appends big-endian fields to a growable byte array (handshake messages; not the hot path).
public struct ByteWriter {
    public private(set) var bytes: [UInt8]

    public init(capacity: Int = 64) {
        bytes = []
        bytes.reserveCapacity(capacity)
    }

    public mutating func put<T: FixedWidthInteger>(_ value: T) {
        withUnsafeBytes(of: value.bigEndian) { bytes.append(contentsOf: $0) }
    }

    public mutating func put(bytes other: some Collection<UInt8>) { bytes.append(contentsOf: other) }

    public mutating func put(string: String) { bytes.append(contentsOf: string.utf8) }

    public mutating func put(zeroes count: Int) { bytes.append(contentsOf: repeatElement(0, count: count)) }
}

/// Reads big-endian fields from a byte array with bounds checks.
public struct ByteReader {
    public let bytes: [UInt8]
    public private(set) var position = 0

    public init(_ bytes: [UInt8]) { self.bytes = bytes }

    public var remaining: Int { bytes.count - position }

    public struct Truncated: Error {}

    public mutating func get<T: FixedWidthInteger>(_ type: T.Type) throws(Truncated) -> T {
        let size = MemoryLayout<T>.size
        guard remaining >= size else { throw Truncated() }
        var v: T = 0
        for i in 0..<size { v = (v << 8) | T(bytes[position + i]) }
        position += size
        return v
    }

    public mutating func get(count: Int) throws(Truncated) -> ArraySlice<UInt8> {
        guard count >= 0, remaining >= count else { throw Truncated() }
        defer { position += count }
        return bytes[position..<(position + count)]
    }
}

/// Decodes bytes as UTF-8 if they are valid and contain no NUL, as the spec requires of strings.
public func decodeProtocolString(_ bytes: some Collection<UInt8>) -> String? {
    if bytes.contains(0) { return nil }
    var it = bytes.makeIterator()
    var out = ""
    var decoder = UTF8()
    loop: while true {
        switch decoder.decode(&it) {
        case .scalarValue(let s): out.unicodeScalars.append(s)
        case .emptyInput: break loop
        case .error: return nil
        }
    }
    return out
}
