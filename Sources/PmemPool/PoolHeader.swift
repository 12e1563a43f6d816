import Glibc
import PmemSystem

/// The pool header at offset 0 (see Docs/FORMAT.md). Little-endian; 256 bytes covered by a
/// CRC-32C; the rest of the first 4 KiB is reserved (zero).
public struct PoolHeader: Equatable, Sendable {
    /// "PMEM-NBD" read as a little-endian 64-bit integer.
    public static let magic: UInt64 = 0x4442_4e2d_4d45_4d50
    public static let currentVersion: UInt32 = 1
    public static let encodedSize = 256
    public static let blockSize: UInt32 = 4096

    public var version: UInt32 = PoolHeader.currentVersion
    public var uuid: [UInt8]
    /// Bytes of the pool, header and metadata included.
    public var poolSize: UInt64
    public var blockSize: UInt32 = PoolHeader.blockSize
    public var flags: UInt32 = 0
    public var bitmapOffset: UInt64
    public var bitmapSize: UInt64
    public var dataOffset: UInt64
    /// Bytes of the data area = the export size.
    public var dataSize: UInt64
    public var createdSeconds: UInt64
    /// Name of the pool's volume (at most 63 bytes).
    public var volumeName: String

    public var uuidString: String {
        let hex = uuid.map { String($0, radix: 16).leftPadded(2) }
        return [hex[0..<4], hex[4..<6], hex[6..<8], hex[8..<10], hex[10..<16]].map { $0.joined() }.joined(separator: "-")
    }

    /// Field offsets (bytes).
    enum Field {
        static let magic = 0, version = 8, headerSize = 12, uuid = 16, poolSize = 32, blockSize = 40, flags = 44
        static let bitmapOffset = 48, bitmapSize = 56, dataOffset = 64, dataSize = 72, created = 80
        static let name = 88, nameSize = 64, checksum = 248
    }

    /// Lays out a new pool of `poolSize` bytes.
    public static func layout(poolSize: UInt64, volumeName: String) throws(PoolError) -> PoolHeader {
        let block = UInt64(blockSize)
        let align: UInt64 = 2 << 20
        guard poolSize >= 4 << 20 else { throw PoolError(.invalid, "pool size \(poolSize) is too small (minimum 4 MiB)") }
        guard volumeName.utf8.count < Field.nameSize, !volumeName.contains("@"), !volumeName.isEmpty else {
            throw PoolError(.invalid, "volume name must be 1 to 63 bytes without '@'")
        }
        // Data blocks after the bitmap, which needs one bit per data block.
        var dataBlocks = (poolSize - align) / block
        var bitmapBytes: UInt64 = 0
        while true {
            bitmapBytes = ((dataBlocks + 7) / 8 + block - 1) / block * block
            let dataOffset = (block + bitmapBytes + align - 1) / align * align
            if dataOffset + dataBlocks * block <= poolSize { break }
            dataBlocks -= 1
        }
        let dataOffset = (block + bitmapBytes + align - 1) / align * align
        var rng = SystemRandomNumberGenerator()
        var uuid = (0..<16).map { _ in UInt8.random(in: 0...255, using: &rng) }
        uuid[6] = (uuid[6] & 0x0f) | 0x40
        uuid[8] = (uuid[8] & 0x3f) | 0x80
        return PoolHeader(uuid: uuid, poolSize: poolSize, bitmapOffset: block, bitmapSize: bitmapBytes,
                          dataOffset: dataOffset, dataSize: dataBlocks * block,
                          createdSeconds: UInt64(time(nil)), volumeName: volumeName)
    }

    /// Encodes into `encodedSize` bytes with the checksum filled in.
    public func encode() -> [UInt8] {
        var b = [UInt8](repeating: 0, count: PoolHeader.encodedSize)
        func put<T: FixedWidthInteger>(_ v: T, _ at: Int) {
            withUnsafeBytes(of: v.littleEndian) { for (i, x) in $0.enumerated() { b[at + i] = x } }
        }
        put(PoolHeader.magic, Field.magic)
        put(version, Field.version)
        put(UInt32(PoolHeader.encodedSize), Field.headerSize)
        for i in 0..<16 { b[Field.uuid + i] = uuid[i] }
        put(poolSize, Field.poolSize)
        put(blockSize, Field.blockSize)
        put(flags, Field.flags)
        put(bitmapOffset, Field.bitmapOffset)
        put(bitmapSize, Field.bitmapSize)
        put(dataOffset, Field.dataOffset)
        put(dataSize, Field.dataSize)
        put(createdSeconds, Field.created)
        for (i, c) in volumeName.utf8.prefix(Field.nameSize - 1).enumerated() { b[Field.name + i] = c }
        let crc = b.withUnsafeBytes { PersistentMemory.crc32c($0) }
        put(UInt64(crc), Field.checksum)
        return b
    }

    /// Decodes and validates a header. `available` is the size of the file or device, to
    /// detect truncation. Every failure names what is wrong; nothing is ever repaired here.
    public static func decode(_ bytes: UnsafeRawBufferPointer, available: UInt64) throws(PoolError) -> PoolHeader {
        guard bytes.count >= encodedSize else {
            throw PoolError(.badPool, "file is \(available) bytes, too small to hold a pmem-nbd pool header (truncated?)")
        }
        func get<T: FixedWidthInteger>(_ t: T.Type, _ at: Int) -> T { T(littleEndian: bytes.loadUnaligned(fromByteOffset: at, as: T.self)) }
        let magic = get(UInt64.self, Field.magic)
        if magic != PoolHeader.magic {
            if bytes.prefix(encodedSize).allSatisfy({ $0 == 0 }) {
                throw PoolError(.badPool, "no pool header (the first bytes are all zero); create a pool with 'pmem-nbd create'")
            }
            let shown = bytes.prefix(8).map { (0x20..<0x7f).contains($0) ? String(UnicodeScalar($0)) : "." }.joined()
            throw PoolError(.badPool, "not a pmem-nbd pool: foreign magic '\(shown)'")
        }
        let version = get(UInt32.self, Field.version)
        guard version == currentVersion else {
            throw PoolError(.badPool, "pool format version \(version) is not supported by this build (it reads version \(currentVersion))")
        }
        let headerSize = get(UInt32.self, Field.headerSize)
        guard headerSize == encodedSize else { throw PoolError(.badPool, "pool header size \(headerSize) is invalid (corrupt header)") }
        var copy = Array(bytes.prefix(encodedSize))
        for i in 0..<8 { copy[Field.checksum + i] = 0 }
        let crc = copy.withUnsafeBytes { PersistentMemory.crc32c($0) }
        let stored = get(UInt64.self, Field.checksum)
        guard UInt64(crc) == stored else {
            throw PoolError(.badPool, "pool header checksum mismatch (stored \(String(stored, radix: 16)), computed \(String(crc, radix: 16))): the header is corrupt")
        }
        var nameBytes = Array(bytes[(Field.name)..<(Field.name + Field.nameSize)])
        if let z = nameBytes.firstIndex(of: 0) { nameBytes.removeSubrange(z...) }
        let h = PoolHeader(version: version, uuid: Array(bytes[Field.uuid..<(Field.uuid + 16)]),
                           poolSize: get(UInt64.self, Field.poolSize), blockSize: get(UInt32.self, Field.blockSize),
                           flags: get(UInt32.self, Field.flags), bitmapOffset: get(UInt64.self, Field.bitmapOffset),
                           bitmapSize: get(UInt64.self, Field.bitmapSize), dataOffset: get(UInt64.self, Field.dataOffset),
                           dataSize: get(UInt64.self, Field.dataSize), createdSeconds: get(UInt64.self, Field.created),
                           volumeName: String(decoding: nameBytes, as: UTF8.self))
        guard h.blockSize == blockSize else { throw PoolError(.badPool, "pool block size \(h.blockSize) is not supported") }
        guard h.poolSize <= available else {
            throw PoolError(.badPool, "pool is truncated: the header says \(h.poolSize) bytes but only \(available) are there")
        }
        let block = UInt64(blockSize)
        let blocks = h.dataSize / block
        guard h.dataSize % block == 0, h.bitmapOffset >= block, h.bitmapSize * 8 >= blocks,
              h.bitmapOffset + h.bitmapSize <= h.dataOffset, h.dataOffset + h.dataSize <= h.poolSize else {
            throw PoolError(.badPool, "pool header describes an impossible layout (corrupt header)")
        }
        return h
    }
}

extension String {
    func leftPadded(_ width: Int) -> String { count >= width ? self : String(repeating: "0", count: width - count) + self }
}
