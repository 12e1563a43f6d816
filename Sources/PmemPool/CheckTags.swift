/// The check tags of format 3 (Docs/FORMAT.md): map entries, roots and refcount slots carry a
/// hash of what they mean, so damage on the media is caught where the word is used.

/// A block's 32-bit refcount slot (two per 8-byte refcount word): 0 when the block is free,
/// else a 24-bit count with an 8-bit check tag of (block, count) on top (format 3). A slot
/// whose tag does not match — damaged media — decodes as `damaged`: the block counts as in use
/// (never handed out, never freed, always copied before a change) until `check --repair`.
public enum RefcountSlot {
    public static let maxCount: UInt32 = (1 << 24) - 1
    /// What a slot that fails its tag reads as: more references than any block has.
    public static let damaged: UInt32 = .max

    @inline(__always) static func tag(_ block: UInt64, _ count: UInt32) -> UInt32 {
        let h = (block &* 0x9E37_79B9_7F4A_7C15) ^ (UInt64(count) &* 0xD6E8_FEB8_6659_FD93)
        return UInt32(truncatingIfNeeded: ((h ^ (h >> 29)) &* 0xBF58_476D_1CE4_E5B9) >> 56)
    }

    @inline(__always) public static func encode(_ block: UInt64, count: UInt32) -> UInt32 {
        count == 0 ? 0 : min(count, maxCount) | tag(block, min(count, maxCount)) << 24
    }

    /// The count a slot holds, or `damaged`.
    @inline(__always) public static func decode(_ block: UInt64, slot: UInt32) -> UInt32 {
        if slot == 0 { return 0 }
        let count = slot & maxCount
        return count != 0 && slot >> 24 == tag(block, count) ? count : damaged
    }

    /// The slot of block `b` in its refcount word.
    @inline(__always) public static func slot(_ b: UInt64, in word: UInt64) -> UInt32 {
        UInt32(truncatingIfNeeded: word >> PoolLayout.refcountShift(b))
    }

    /// `word` with block `b`'s slot replaced.
    @inline(__always) public static func word(_ word: UInt64, _ b: UInt64, slot: UInt32) -> UInt64 {
        let shift = PoolLayout.refcountShift(b)
        return (word & ~(UInt64(0xFFFF_FFFF) << shift)) | UInt64(slot) << shift
    }
}

/// A map entry: the physical block in the low 48 bits (0 = hole) and, since format 3, a 16-bit
/// check tag in the top bits — a hash of the block, the entry's index in its node and the node's
/// level. A map entry damaged on the media (a flipped bit, a stray write, a foreign sector)
/// fails its tag with odds of 65535 in 65536 and is answered with EIO, never with some other
/// block's data; copied nodes keep their entries' tags, since the tag does not name the node.
public enum MapEntry {
    public static let blockMask: UInt64 = (1 << 48) - 1

    /// The tag of `block` stored at `index` of a level-`level` node (0: a leaf, entries are data).
    @inline(__always) public static func tag(_ block: UInt64, index: Int, level: Int) -> UInt64 {
        var h = block &* 0x9E37_79B9_7F4A_7C15
        h ^= UInt64(truncatingIfNeeded: index << 3 | level) &* 0xC2B2_AE3D_27D4_EB4F
        h ^= h >> 31
        return (h &* 0xBF58_476D_1CE4_E5B9) >> 48
    }

    /// The word to store for `block` (0 stays 0: a hole).
    @inline(__always) public static func make(_ block: UInt64, index: Int, level: Int) -> UInt64 {
        block == 0 ? 0 : block | tag(block, index: index, level: level) << 48
    }

    /// The word a volume record stores for its map's root: tagged like an entry, with the
    /// record's slot and the map's depth in place of index and level (a root copied into
    /// another slot, or read with another depth, fails).
    @inline(__always) public static func makeRoot(_ block: UInt64, slot: Int, depth: Int) -> UInt64 {
        make(block, index: rootIndex(slot, depth), level: 7)
    }

    /// The root block a record's stored word names, or nil when its tag does not match.
    @inline(__always) public static func root(_ raw: UInt64, slot: Int, depth: Int) -> UInt64? {
        block(raw, index: rootIndex(slot, depth), level: 7)
    }

    @inline(__always) static func rootIndex(_ slot: Int, _ depth: Int) -> Int { 0x4000 | slot << 3 | (depth & 7) }

    /// The block a stored word names, or nil when its tag does not match (a corrupt entry).
    @inline(__always) public static func block(_ raw: UInt64, index: Int, level: Int) -> UInt64? {
        if raw == 0 { return 0 }
        let b = raw & blockMask
        return raw >> 48 == tag(b, index: index, level: level) ? b : nil
    }
}
