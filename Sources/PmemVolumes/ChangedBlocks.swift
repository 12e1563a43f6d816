import PmemPool

/// Which blocks of a volume differ from one of its snapshots, and which are shared (what the
/// NBD export offers as `qemu:dirty-bitmap:SNAP` and `pmem-nbd:sharing`, PmemNBD/VolumeExport.swift).
/// The two maps are walked together (`PoolEngine.changedRuns`, PmemPool/MapWalks.swift); wherever
/// they share a node the whole subtree is clean at once, so the cost follows what changed, not
/// the volume's size.
extension Volume {
    /// The snapshots of this volume, oldest first (none for a snapshot).
    public var snapshots: [VolumeRecord] { kind == .volume ? pool.snapshots(of: id) : [] }

    /// Runs of [offset, offset + length), in bytes, each shared with a snapshot or a clone (its
    /// next write through this volume will copy) or not. `body` returns false to stop.
    public func sharing(offset: UInt64, length: UInt64, _ body: (UInt64, Bool) -> Bool) throws(PoolError) {
        guard offset < size, length <= size - offset else { throw PoolError(.invalid, "range beyond the end") }
        var skip = offset & 4095
        try engine.sharingRuns(rootOffset: rootOffset, depth: depth, first: offset >> 12, end: (offset + length + 4095) >> 12) { blocks, shared in
            let bytes = (blocks << 12) - skip
            skip = 0
            return body(bytes, shared)
        }
    }

    /// Runs of [offset, offset + length), in bytes, each changed since `snapshot` (one of
    /// `snapshots`) or not. `body` returns false to stop.
    public func changes(since snapshot: VolumeRecord, offset: UInt64, length: UInt64, _ body: (UInt64, Bool) -> Bool) throws(PoolError) {
        guard kind == .volume, snapshot.kind == .snapshot, snapshot.parent == id else {
            throw PoolError(.invalid, "\(snapshot.name) is not a snapshot of \(name)")
        }
        guard offset < size, length <= size - offset else { throw PoolError(.invalid, "range beyond the end") }
        var skip = offset & 4095
        try engine.changedRuns(rootOffset: rootOffset, depth: depth, against: snapshot, first: offset >> 12, end: (offset + length + 4095) >> 12) { blocks, dirty in
            let bytes = (blocks << 12) - skip
            skip = 0
            return body(bytes, dirty)
        }
    }
}
