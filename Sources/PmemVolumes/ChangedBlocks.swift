import PmemPool

/// The `qemu:dirty-bitmap:SNAP` metadata context: which blocks of a volume differ from one of
/// its snapshots (bit 0 set = dirty), the way incremental-backup tools expect. The two maps are
/// walked together; wherever they share a node the whole subtree is clean at once, so the cost
/// follows what changed, not the volume's size.
extension Volume {
    public static let dirtyBitmapPrefix = "qemu:dirty-bitmap:"

    /// The physical block of the level-`level` node covering `vblock` (level `depth` is the
    /// virtual slot above the root), 0 when absent. An entry that fails its check throws `.io`.
    func node(root: UInt64, depth: Int, level: Int, vblock: UInt64) throws(PoolError) -> UInt64 {
        if level >= depth {
            // Above the root: the root covers the first 512^depth blocks only.
            return vblock >> (9 * UInt64(depth)) == 0 ? root : 0
        }
        var n = root
        var l = depth - 1
        while l > level && n != 0 {
            n = try engine.entry(node: n, index: PoolEngine.index(vblock, level: l), level: l)
            l -= 1
        }
        return n
    }

    /// Runs of clean/dirty blocks of this volume against snapshot `snap`, from `first` to `end`.
    /// Entries are decoded with their check tags: a damaged one (in either map) throws `.io`.
    func changedRuns(against snap: VolumeRecord, first: UInt64, end: UInt64, _ body: (UInt64, Bool) -> Bool) throws(PoolError) {
        let myRoot = try engine.root(at: rootOffset, depth: depth)
        let snapRoot = try engine.root(at: VolumeRecord.offset(slot: snap.slot) + VolumeRecord.rootField, depth: snap.depth)
        let top = max(depth, snap.depth)
        var v = first
        var runStart = first
        var runDirty: Bool?
        func emit(_ dirty: Bool, _ n: UInt64) -> Bool {
            if runDirty == dirty { return true }
            if let d = runDirty, v > runStart, !body(v - runStart, d) { return false }
            runStart = v
            runDirty = dirty
            return true
        }
        while v < end {
            var level = top
            var decided = false
            while level >= 0 {
                let a = try node(root: myRoot, depth: depth, level: level, vblock: v)
                let b = try node(root: snapRoot, depth: snap.depth, level: level, vblock: v)
                if a == b {
                    // Same node (or both absent): the whole subtree is unchanged.
                    let span = UInt64(1) << (9 * UInt64(level + 1))
                    guard emit(false, 0) else { return }
                    v = min(end, (v & ~(span - 1)) + span)
                    decided = true
                    break
                }
                if level == 0 {
                    let ea = a == 0 ? 0 : try engine.entry(node: a, index: Int(v & 511), level: 0)
                    let eb = b == 0 ? 0 : try engine.entry(node: b, index: Int(v & 511), level: 0)
                    guard emit(ea != eb, 0) else { return }
                    v += 1
                    decided = true
                    break
                }
                level -= 1
            }
            if !decided { v += 1 }
        }
        if let d = runDirty, end > runStart { _ = body(end - runStart, d) }
    }
}
