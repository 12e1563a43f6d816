import Glibc
import PmemSystem

/// Where everything lives in a pool (format 4, see Docs/FORMAT.md). Computed from the pool size
/// at creation and recorded in the superblock; never recomputed when opening.
public struct PoolLayout: Equatable, Sendable {
    public static let blockSize = 4096
    public static let superblockOffset = 0
    public static let backupSuperblockOffset = 4096
    public static let stateOffset = 8192
    public static let volumeTableOffset = 12288
    public static let volumeEntrySize = 128
    public static let volumeEntries = 1024

    public var poolSize: UInt64
    public var journalOffset: UInt64
    public var journalSize: UInt64
    public var refcountOffset: UInt64
    public var refcountSize: UInt64
    public var blockAreaOffset: UInt64
    /// Blocks in the block area; block 0 is reserved (0 means "none" in maps).
    public var blockCount: UInt64

    /// Lays out a pool of `poolSize` bytes. `journalSize` (a multiple of 4 KiB, at least 64 KiB)
    /// replaces the usual journal size: crash tests use a small ring to reach its wrap-around
    /// and checkpoints quickly.
    public static func compute(poolSize: UInt64, journalSize requested: UInt64? = nil) throws(PoolError) -> PoolLayout {
        guard poolSize >= 4 << 20 else { throw PoolError(.invalid, "pool size \(poolSize) is too small (minimum 4 MiB)") }
        let block = UInt64(blockSize)
        let tableEnd = UInt64(volumeTableOffset + volumeEntries * volumeEntrySize)
        let journalOffset = (tableEnd + 65535) & ~65535
        // The journal: a header page and a ring of commit batches, 16 bytes per changed word.
        let journalSize = requested.map { max(64 << 10, $0 & ~(block - 1)) } ?? min(16 << 20, max(256 << 10, (poolSize / 128) & ~(block - 1)))
        let refcountOffset = journalOffset + journalSize
        let align: UInt64 = 2 << 20
        var blocks = (poolSize - refcountOffset) / block
        while true {
            let rc = ((blocks * 4) + block - 1) / block * block
            let area = (refcountOffset + rc + align - 1) / align * align
            if area + blocks * block <= poolSize {
                return PoolLayout(poolSize: poolSize, journalOffset: journalOffset, journalSize: journalSize,
                                  refcountOffset: refcountOffset, refcountSize: rc, blockAreaOffset: area, blockCount: blocks)
            }
            blocks -= max(1, (area + blocks * block - poolSize) / block)
        }
    }

    /// Byte offset of a physical block.
    @inline(__always) public func blockOffset(_ b: UInt64) -> UInt64 { blockAreaOffset + b << 12 }
    /// Byte offset of the 8-byte word holding the (32-bit) refcount of block `b`.
    @inline(__always) public func refcountWordOffset(_ b: UInt64) -> UInt64 { refcountOffset + (b >> 1) << 3 }
    /// Which half of that word: low 32 bits for even blocks.
    @inline(__always) public static func refcountShift(_ b: UInt64) -> UInt64 { (b & 1) << 5 }
}

/// The superblock at offset 0, with a backup copy at 4096. Written once at creation; every
/// field that changes lives in the pool state block and changes through the journal.
public struct Superblock: Equatable, Sendable {
    /// "PMEM-NBD" read as a little-endian 64-bit integer.
    public static let magic: UInt64 = 0x4442_4e2d_4d45_4d50
    public static let currentVersion: UInt32 = 4
    public static let encodedSize = 256

    public var version: UInt32 = Superblock.currentVersion
    public var uuid: [UInt8]
    public var layout: PoolLayout
    public var createdSeconds: UInt64

    public var uuidString: String {
        let hex = uuid.map { String($0, radix: 16).leftPadded(2) }
        return [hex[0..<4], hex[4..<6], hex[6..<8], hex[8..<10], hex[10..<16]].map { $0.joined() }.joined(separator: "-")
    }

    enum Field {
        static let magic = 0, version = 8, headerSize = 12, uuid = 16, poolSize = 32, blockSize = 40
        static let journalOffset = 48, journalSize = 56, refcountOffset = 64, refcountSize = 72
        static let blockAreaOffset = 80, blockCount = 88, created = 96
        static let stateOffset = 104, volumeTableOffset = 112, volumeEntrySize = 120, volumeEntries = 124
        static let checksum = 248
    }

    public static func new(layout: PoolLayout) -> Superblock {
        var rng = SystemRandomNumberGenerator()
        var uuid = (0..<16).map { _ in UInt8.random(in: 0...255, using: &rng) }
        uuid[6] = (uuid[6] & 0x0f) | 0x40
        uuid[8] = (uuid[8] & 0x3f) | 0x80
        return Superblock(uuid: uuid, layout: layout, createdSeconds: UInt64(time(nil)))
    }

    public func encode() -> [UInt8] {
        var b = [UInt8](repeating: 0, count: Superblock.encodedSize)
        func put<T: FixedWidthInteger>(_ v: T, _ at: Int) {
            withUnsafeBytes(of: v.littleEndian) { for (i, x) in $0.enumerated() { b[at + i] = x } }
        }
        put(Superblock.magic, Field.magic)
        put(version, Field.version)
        put(UInt32(Superblock.encodedSize), Field.headerSize)
        for i in 0..<16 { b[Field.uuid + i] = uuid[i] }
        put(layout.poolSize, Field.poolSize)
        put(UInt32(PoolLayout.blockSize), Field.blockSize)
        put(layout.journalOffset, Field.journalOffset)
        put(layout.journalSize, Field.journalSize)
        put(layout.refcountOffset, Field.refcountOffset)
        put(layout.refcountSize, Field.refcountSize)
        put(layout.blockAreaOffset, Field.blockAreaOffset)
        put(layout.blockCount, Field.blockCount)
        put(createdSeconds, Field.created)
        put(UInt64(PoolLayout.stateOffset), Field.stateOffset)
        put(UInt64(PoolLayout.volumeTableOffset), Field.volumeTableOffset)
        put(UInt32(PoolLayout.volumeEntrySize), Field.volumeEntrySize)
        put(UInt32(PoolLayout.volumeEntries), Field.volumeEntries)
        let crc = b.withUnsafeBytes { PersistentMemory.crc32c($0) }
        put(UInt64(crc), Field.checksum)
        return b
    }

    /// Decodes and validates. `available` is the size of the file or device, to detect truncation.
    /// Every failure says what is wrong; nothing is repaired here.
    public static func decode(_ bytes: UnsafeRawBufferPointer, available: UInt64) throws(PoolError) -> Superblock {
        guard bytes.count >= encodedSize else {
            throw PoolError(.badPool, "file is \(available) bytes, too small to hold a pmem-nbd pool header (truncated?)")
        }
        func get<T: FixedWidthInteger>(_ t: T.Type, _ at: Int) -> T { T(littleEndian: bytes.loadUnaligned(fromByteOffset: at, as: T.self)) }
        if get(UInt64.self, Field.magic) != magic {
            if bytes.prefix(encodedSize).allSatisfy({ $0 == 0 }) {
                throw PoolError(.badPool, "no pool header (the first bytes are all zero); create a pool with 'pmem-nbd create'")
            }
            let shown = bytes.prefix(8).map { (0x20..<0x7f).contains($0) ? String(UnicodeScalar($0)) : "." }.joined()
            throw PoolError(.badPool, "not a pmem-nbd pool: foreign magic '\(shown)'")
        }
        let version = get(UInt32.self, Field.version)
        guard version == currentVersion else {
            throw PoolError(.badPool, "pool format version \(version) is not supported by this build (it reads version \(currentVersion)); "
                            + "serve it with the build that made it and copy its volumes into a new pool (e.g. nbdcopy), see Docs/FORMAT.md")
        }
        guard get(UInt32.self, Field.headerSize) == encodedSize else { throw PoolError(.badPool, "pool header size is invalid (corrupt header)") }
        var copy = Array(bytes.prefix(encodedSize))
        for i in 0..<8 { copy[Field.checksum + i] = 0 }
        let crc = copy.withUnsafeBytes { PersistentMemory.crc32c($0) }
        let stored = get(UInt64.self, Field.checksum)
        guard UInt64(crc) == stored else {
            throw PoolError(.badPool, "pool header checksum mismatch (stored \(String(stored, radix: 16)), computed \(String(crc, radix: 16))): the header is corrupt")
        }
        let layout = PoolLayout(poolSize: get(UInt64.self, Field.poolSize), journalOffset: get(UInt64.self, Field.journalOffset),
                                journalSize: get(UInt64.self, Field.journalSize), refcountOffset: get(UInt64.self, Field.refcountOffset),
                                refcountSize: get(UInt64.self, Field.refcountSize), blockAreaOffset: get(UInt64.self, Field.blockAreaOffset),
                                blockCount: get(UInt64.self, Field.blockCount))
        let sb = Superblock(version: version, uuid: Array(bytes[Field.uuid..<(Field.uuid + 16)]), layout: layout,
                            createdSeconds: get(UInt64.self, Field.created))
        guard get(UInt32.self, Field.blockSize) == PoolLayout.blockSize,
              get(UInt64.self, Field.stateOffset) == UInt64(PoolLayout.stateOffset),
              get(UInt64.self, Field.volumeTableOffset) == UInt64(PoolLayout.volumeTableOffset),
              get(UInt32.self, Field.volumeEntrySize) == UInt32(PoolLayout.volumeEntrySize),
              get(UInt32.self, Field.volumeEntries) == UInt32(PoolLayout.volumeEntries) else {
            throw PoolError(.badPool, "pool header describes a layout this build does not use (corrupt header)")
        }
        guard layout.poolSize <= available else {
            throw PoolError(.badPool, "pool is truncated: the header says \(layout.poolSize) bytes but only \(available) are there")
        }
        let tableEnd = UInt64(PoolLayout.volumeTableOffset + PoolLayout.volumeEntries * PoolLayout.volumeEntrySize)
        guard layout.journalOffset >= tableEnd, layout.journalSize >= 64 << 10, layout.journalSize & 4095 == 0,
              layout.refcountOffset >= layout.journalOffset + layout.journalSize,
              layout.refcountSize >= layout.blockCount * 4,
              layout.blockAreaOffset >= layout.refcountOffset + layout.refcountSize,
              layout.blockCount >= 2,
              layout.blockAreaOffset + layout.blockCount * UInt64(PoolLayout.blockSize) <= layout.poolSize else {
            throw PoolError(.badPool, "pool header describes an impossible layout (corrupt header)")
        }
        return sb
    }
}

extension String {
    func leftPadded(_ width: Int) -> String { count >= width ? self : String(repeating: "0", count: width - count) + self }
}
