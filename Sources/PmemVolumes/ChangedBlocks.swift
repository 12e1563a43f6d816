import PmemPool

/// The `qemu:dirty-bitmap:SNAP` metadata context: which blocks of a volume differ from one of
/// its snapshots (bit 0 set = dirty), the way incremental-backup tools expect. The two maps are
/// walked together (`PoolEngine.changedRuns`, PmemPool/MapWalks.swift); wherever they share a
/// node the whole subtree is clean at once, so the cost follows what changed, not the volume's
/// size.
extension Volume {
    public static let dirtyBitmapPrefix = "qemu:dirty-bitmap:"
}
