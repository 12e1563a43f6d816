import PmemPool

/// Space a volume or snapshot uses, like `zfs list`: `referenced` is the data its map reaches;
/// `exclusive` is what only it holds — what deleting it would free (data and map nodes).
public struct SpaceUsage: Sendable, Equatable {
    public var referenced: UInt64 = 0
    public var exclusive: UInt64 = 0
}

extension Pool {
    /// Walks a map: a block is exclusive when it and every node above it have one reference.
    /// Costs a visit per mapped block.
    public func usage(of r: VolumeRecord) throws(PoolError) -> SpaceUsage {
        var u = SpaceUsage()
        let root = engine.journal.load(VolumeRecord.offset(slot: r.slot) + VolumeRecord.rootField) & MapEntry.blockMask
        guard root != 0 else { return u }
        var stack: [(node: UInt64, level: Int, shared: Bool)] = [(root, r.depth - 1, engine.refcount(root) > 1)]
        while let (node, level, shared) = stack.popLast() {
            guard engine.validBlock(node) else { throw PoolError(.io, "map of '\(r.name)' is corrupt") }
            if !shared { u.exclusive += 4096 }
            for i in 0..<512 {
                let e = engine.journal.load(engine.entryOffset(node: node, index: i)) & MapEntry.blockMask
                if e == 0 { continue }
                if level == 0 {
                    u.referenced += 4096
                    if !shared && engine.refcount(e) == 1 { u.exclusive += 4096 }
                } else {
                    stack.append((e, level - 1, shared || engine.refcount(e) > 1))
                }
            }
        }
        return u
    }
}
