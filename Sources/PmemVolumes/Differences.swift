import PmemPool

/// What changed between two points in a volume's life, block by block: the input of an
/// incremental export (`pmem-nbd export-diff`, Docs/SCALE-OUT.md).
public enum BlockChange: Sendable, Equatable {
    /// The block holds data here (new or rewritten since the base).
    case data
    /// The block was deallocated since the base: it reads as zeroes here.
    case zero
}

extension Volume {
    /// Calls `body(firstBlock, blocks, change)` for runs of blocks in `[first, end)` of this
    /// volume (or snapshot) that differ from `base`, in ascending order; blocks that did not
    /// change are skipped. Without a base, every allocated block is a change (a full export).
    /// Both trees are walked together, so the cost follows what changed, not the size.
    ///
    /// The caller holds a read guard (`makeReadGuard().enter()`) while this runs, so that
    /// map nodes of a snapshot deleted meanwhile are not reused under the walk.
    public func changes(since base: VolumeRecord?, first: UInt64, end: UInt64,
                        _ body: (UInt64, UInt64, BlockChange) -> Bool) throws(PoolError) {
        let last = min(end, (size + 4095) >> 12)
        guard first < last else { return }
        guard let base else {
            var at = first
            try engine.allocationRuns(rootOffset: rootOffset, depth: depth, first: first, end: last) { blocks, mapped in
                defer { at += blocks }
                return mapped ? body(at, blocks, .data) : true
            }
            return
        }
        var dirtyRuns: [(UInt64, UInt64)] = []
        var at = first
        try engine.changedRuns(rootOffset: rootOffset, depth: depth, against: base, first: first, end: last) { blocks, dirty in
            if dirty { dirtyRuns.append((at, blocks)) }
            at += blocks
            return true
        }
        // Each changed run is data where this side has a block, zeroes where it has none.
        for (start, count) in dirtyRuns {
            var pos = start
            var stop = false
            try engine.allocationRuns(rootOffset: rootOffset, depth: depth, first: start, end: start + count) { blocks, mapped in
                defer { pos += blocks }
                if !body(pos, blocks, mapped ? .data : .zero) { stop = true; return false }
                return true
            }
            if stop { return }
        }
    }
}
