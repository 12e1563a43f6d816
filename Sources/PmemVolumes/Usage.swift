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
        let (referenced, exclusive) = try engine.usage(of: r)
        return SpaceUsage(referenced: referenced, exclusive: exclusive)
    }
}
