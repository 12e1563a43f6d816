/// The pool state block (4 KiB at `PoolLayout.stateOffset`): counters that change with
/// every commit. Written only through the journal.
public enum PoolState {
    public static let magic: UInt64 = 0x3145_5441_5453_4e50 // "PNSTATE1"
    static let base = UInt64(PoolLayout.stateOffset)
    public static let magicOffset = base
    /// Blocks with a nonzero refcount.
    public static let allocatedOffset = base + 8
    /// Every block at or above this has never been used.
    public static let highWaterOffset = base + 16
    /// Monotonic counter: snapshots and volumes record the generation they were born in.
    public static let generationOffset = base + 24
    /// Next volume id to hand out.
    public static let nextVolumeIDOffset = base + 32
}

/// One entry of the volume table (128 bytes at `PoolLayout.volumeTableOffset + 128·slot`).
public struct VolumeRecord: Equatable, Sendable {
    public enum Kind: UInt64, Sendable {
        case free = 0
        case volume = 1
        case snapshot = 2
        /// Being deleted in the background (its blocks are released step by step).
        case deleting = 3
    }

    public var slot: Int
    public var kind: Kind
    public var id: UInt64
    /// A snapshot's volume id; a clone's origin snapshot id; 0 otherwise.
    public var parent: UInt64
    /// Physical block of the map's root node, 0 for an empty map.
    public var root: UInt64
    public var size: UInt64
    public var depth: Int
    public var created: UInt64
    public var generation: UInt64
    public var name: String

    public init(slot: Int, kind: Kind, id: UInt64, parent: UInt64, root: UInt64, size: UInt64, depth: Int,
                created: UInt64, generation: UInt64, name: String) {
        self.slot = slot
        self.kind = kind
        self.id = id
        self.parent = parent
        self.root = root
        self.size = size
        self.depth = depth
        self.created = created
        self.generation = generation
        self.name = name
    }

    public static let kindField: UInt64 = 0, idField: UInt64 = 8, parentField: UInt64 = 16, rootField: UInt64 = 24
    public static let sizeField: UInt64 = 32, depthField: UInt64 = 40, createdField: UInt64 = 48
    public static let generationField: UInt64 = 56, nameField: UInt64 = 64, nameBytes = 64

    public static func offset(slot: Int) -> UInt64 { UInt64(PoolLayout.volumeTableOffset + slot * PoolLayout.volumeEntrySize) }

    /// The slot whose root field is at `rootOffset`.
    public static func slot(ofRootOffset rootOffset: UInt64) -> Int {
        Int((rootOffset - rootField - UInt64(PoolLayout.volumeTableOffset)) / UInt64(PoolLayout.volumeEntrySize))
    }

    /// What `decode` reports as the root when the stored word fails its tag: a block number
    /// past every pool's end, so nothing walks from it.
    public static let damagedRoot = MapEntry.blockMask

    /// The deepest map (512^6 blocks of 4 KiB cover 2^66 bytes).
    public static let maxDepth = 6

    /// Whether a stored map depth can be right for a volume of `size` bytes: 1 to 6 levels, at
    /// least as many as the size needs (a volume that shrank keeps its deeper map).
    public static func depthFits(_ depth: UInt64, size: UInt64) -> Bool {
        depth >= 1 && depth <= UInt64(maxDepth) && depth >= UInt64(self.depth(forSize: size))
    }

    /// Map depth for a volume of `size` bytes: the fewest levels of 512-entry nodes that cover it.
    public static func depth(forSize size: UInt64) -> Int {
        let blocks = max(1, (size + 4095) >> 12)
        var d = 1
        var cover: UInt64 = 512
        while cover < blocks {
            d += 1
            cover = cover &* 512
            if d >= 6 { break }
        }
        return d
    }

    /// The words that encode this record.
    public func words() -> [(UInt64, UInt64)] {
        let o = VolumeRecord.offset(slot: slot)
        var w: [(UInt64, UInt64)] = [
            (o + VolumeRecord.kindField, kind.rawValue), (o + VolumeRecord.idField, id), (o + VolumeRecord.parentField, parent),
            (o + VolumeRecord.rootField, MapEntry.makeRoot(root, slot: slot, depth: depth)), (o + VolumeRecord.sizeField, size), (o + VolumeRecord.depthField, UInt64(depth)),
            (o + VolumeRecord.createdField, created), (o + VolumeRecord.generationField, generation),
        ]
        var bytes = Array(name.utf8.prefix(VolumeRecord.nameBytes - 1))
        bytes += [UInt8](repeating: 0, count: VolumeRecord.nameBytes - bytes.count)
        for i in 0..<(VolumeRecord.nameBytes / 8) {
            var v: UInt64 = 0
            for j in 0..<8 { v |= UInt64(bytes[8 * i + j]) << (8 * UInt64(j)) }
            w.append((o + VolumeRecord.nameField + UInt64(8 * i), v))
        }
        return w
    }

    /// Decodes a record with `load` (overlay-aware in the engine).
    public static func decode(slot: Int, load: (UInt64) -> UInt64) -> VolumeRecord? {
        let o = offset(slot: slot)
        guard let kind = Kind(rawValue: load(o + kindField)), kind != .free else { return nil }
        var bytes: [UInt8] = []
        for i in 0..<(nameBytes / 8) {
            let v = load(o + nameField + UInt64(8 * i))
            for j in 0..<8 { bytes.append(UInt8(truncatingIfNeeded: v >> (8 * UInt64(j)))) }
        }
        if let z = bytes.firstIndex(of: 0) { bytes.removeSubrange(z...) }
        let size = load(o + sizeField)
        // A depth that cannot be (outside 1...6, or too shallow for the size: blocks past the
        // map's reach would alias blocks inside it) marks the record damaged. Users of the record
        // get a depth that keeps their arithmetic bounded; the map is not reachable through it
        // (the root's tag names the stored depth, so it fails against this one).
        let storedDepth = load(o + depthField)
        let fits = depthFits(storedDepth, size: size)
        let depth = fits ? Int(storedDepth) : depth(forSize: size)
        let root = fits ? MapEntry.root(load(o + rootField), slot: slot, depth: depth) ?? damagedRoot : damagedRoot
        return VolumeRecord(slot: slot, kind: kind, id: load(o + idField), parent: load(o + parentField), root: root,
                            size: size, depth: depth, created: load(o + createdField),
                            generation: load(o + generationField), name: String(decoding: bytes, as: UTF8.self))
    }

    /// Whether a name is acceptable for a volume (and, with `@`, for a snapshot's own part).
    public static func validName(_ name: String) -> Bool {
        !name.isEmpty && name.utf8.count < nameBytes && !name.contains("@") && !name.contains("/")
            && name.unicodeScalars.allSatisfy { $0.value > 0x20 && $0.value != 0x7f }
    }
}
