import PmemPool

/// The `qemu:dirty-bitmap:SNAP` metadata context: which blocks of a volume differ from one of
/// its snapshots (bit 0 set = dirty), the way incremental-backup tools expect. The two maps are
/// walked together; wherever they share a node the whole subtree is clean at once, so the cost
/// follows what changed, not the volume's size.
extension Volume {
    public static let dirtyBitmapPrefix = "qemu:dirty-bitmap:"

    /// The physical block of the level-`level` node covering `vblock` (level `depth` is the
    /// virtual slot above the root), 0 when absent.
    func node(root: UInt64, depth: Int, level: Int, vblock: UInt64) -> UInt64 {
        if level >= depth {
            // Above the root: the root covers the first 512^depth blocks only.
            return vblock >> (9 * UInt64(depth)) == 0 ? root : 0
        }
        var n = root
        var l = depth - 1
        while l > level && n != 0 {
            n = engine.journal.load(engine.entryOffset(node: n, index: PoolEngine.index(vblock, level: l))) & MapEntry.blockMask
            l -= 1
        }
        return n
    }

    /// Runs of clean/dirty blocks of this volume against snapshot `snap`, from `first` to `end`.
    func changedRuns(against snap: VolumeRecord, first: UInt64, end: UInt64, _ body: (UInt64, Bool) -> Bool) throws(PoolError) {
        let j = engine.journal
        let myRoot = j.load(rootOffset) & MapEntry.blockMask
        let snapRoot = j.load(VolumeRecord.offset(slot: snap.slot) + VolumeRecord.rootField) & MapEntry.blockMask
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
                let a = node(root: myRoot, depth: depth, level: level, vblock: v)
                let b = node(root: snapRoot, depth: snap.depth, level: level, vblock: v)
                if a == b {
                    // Same node (or both absent): the whole subtree is unchanged.
                    let span = UInt64(1) << (9 * UInt64(level + 1))
                    guard emit(false, 0) else { return }
                    v = min(end, (v & ~(span - 1)) + span)
                    decided = true
                    break
                }
                if level == 0 {
                    let ea = a == 0 ? 0 : j.load(engine.entryOffset(node: a, index: Int(v & 511))) & MapEntry.blockMask
                    let eb = b == 0 ? 0 : j.load(engine.entryOffset(node: b, index: Int(v & 511))) & MapEntry.blockMask
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
