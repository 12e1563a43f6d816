import PmemPool

/// Space a volume or snapshot uses, like `zfs list`: `referenced` is the data its map reaches;
/// `exclusive` is what only it holds — what deleting it would free (data and map nodes).
public struct SpaceUsage: Sendable, Equatable {
    public var referenced: UInt64 = 0
    public var exclusive: UInt64 = 0
}

extension Pool {
    /// Walks a map: a block is exclusive when it and every node above it have one reference.
    /// Costs a visit per mapped block. A map entry or root that fails its check throws `.io`.
    /// Nodes and refcounts are read a page at a time (`PageCopies`): under a writer, one shard
    /// lock per page rather than per word.
    public func usage(of r: VolumeRecord) throws(PoolError) -> SpaceUsage {
        var u = SpaceUsage()
        let root = try engine.root(at: VolumeRecord.offset(slot: r.slot) + VolumeRecord.rootField, depth: r.depth)
        guard root != 0 else { return u }
        let pages = PageCopies(engine)
        var stack: [(node: UInt64, level: Int, shared: Bool)] = [(root, r.depth - 1, pages.refcount(root) > 1)]
        while let (node, level, shared) = stack.popLast() {
            if !shared { u.exclusive += 4096 }
            for i in 0..<512 {
                let e = try pages.entry(node: node, index: i, level: level)
                if e == 0 { continue }
                if level == 0 {
                    u.referenced += 4096
                    if !shared && pages.refcount(e) == 1 { u.exclusive += 4096 }
                } else {
                    stack.append((e, level - 1, shared || pages.refcount(e) > 1))
                }
            }
        }
        return u
    }
}

extension Volume {
    /// Runs of blocks from `first` to `end` that are shared (the block, or a map node above it,
    /// has more than one reference) or not; holes count as not shared. A map entry that fails
    /// its check throws `.io`.
    func sharingRuns(first: UInt64, end: UInt64, _ body: (UInt64, Bool) -> Bool) throws(PoolError) {
        var v = first
        var runStart = first
        var runShared: Bool?
        func emit(_ shared: Bool) -> Bool {
            if runShared == shared { return true }
            if let s = runShared, v > runStart, !body(v - runStart, s) { return false }
            runStart = v
            runShared = shared
            return true
        }
        while v < end {
            // Walk down to the leaf, noting whether any node on the way is shared.
            var node = try engine.root(at: rootOffset, depth: depth)
            var level = depth - 1
            var shared = node != 0 && engine.refcount(node) > 1
            var span = UInt64(1) << (9 * UInt64(depth))
            while node != 0 && level > 0 {
                node = try engine.entry(node: node, index: PoolEngine.index(v, level: level), level: level)
                span = UInt64(1) << (9 * UInt64(level))
                if node != 0 && engine.refcount(node) > 1 { shared = true }
                level -= 1
            }
            if node == 0 {
                guard emit(false) else { return }
                v = min(end, (v & ~(span - 1)) + span)
                continue
            }
            if shared {
                // The whole leaf is shared with another map.
                guard emit(true) else { return }
                v = min(end, (v | 511) + 1)
                continue
            }
            let leafEnd = min(end, (v | 511) + 1)
            while v < leafEnd {
                let p = try engine.entry(node: node, index: Int(v & 511), level: 0)
                guard emit(p != 0 && engine.refcount(p) > 1) else { return }
                v += 1
            }
        }
        if let s = runShared, end > runStart { _ = body(end - runStart, s) }
    }
}
