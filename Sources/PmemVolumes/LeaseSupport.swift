import PmemPool
import PmemSystem

/// What the mapping-change feed needs from volumes: mappings under the map lock, exclusive
/// ownership for write leases, relocation, and the reverse map.
extension Pool {
    /// A volume or snapshot by id.
    public func volume(id: UInt64) -> Volume? {
        records().first { $0.id == id && ($0.kind == .volume || $0.kind == .snapshot) }.flatMap { volume(slot: $0.slot) }
    }

    /// Every (volume or snapshot id, virtual block) whose map names physical block `block`.
    /// Walks every map (shared subtrees once per map that reaches them): a cost in proportion to
    /// what is mapped. Entries and roots are decoded with their check tags: a damaged one names
    /// no block (it is logged and its subtree skipped), so the answer lists the owners the
    /// undamaged maps show and never one that a damaged word seems to name.
    public func owners(of block: UInt64) throws(PoolError) -> [(UInt64, UInt64)] { engine.owners(of: block) }
}

extension Volume {
    /// Whether this volume or snapshot still exists: its table slot still holds its id and it
    /// is not being deleted. (Ids are never reused, so a stale `Volume` never passes.)
    public var isLive: Bool {
        let kind = engine.recordKind(slot: slot)
        return engine.recordID(slot: slot) == id
            && (kind == VolumeRecord.Kind.volume.rawValue || kind == VolumeRecord.Kind.snapshot.rawValue)
    }

    /// Runs `body` with this volume's map lock held (no map change can happen meanwhile).
    public func withMapLocked<T>(_ body: () -> T) -> T {
        mapLock.lock()
        defer { mapLock.unlock() }
        return body()
    }

    /// The physical block of each virtual block of a range (0 for holes).
    public func currentBlocks(first: UInt64, count: UInt64) throws(PoolError) -> [UInt64] {
        var out: [UInt64] = []
        out.reserveCapacity(Int(count))
        var v = first
        while v < first + count {
            let (leaf, span) = try engine.leaf(rootOffset: rootOffset, depth: depth, vblock: v)
            if leaf == 0 {
                let n = min(first + count - v, span)
                out += repeatElement(0, count: Int(n))
                v += n
                continue
            }
            let end = min(first + count, (v | 511) + 1)
            while v < end {
                out.append(try engine.entry(node: leaf, index: Int(v & 511), level: 0))
                v += 1
            }
        }
        return out
    }

    /// The blocks of a range if every one is mapped and held by this map alone (the block and
    /// every node above it have one reference); nil otherwise.
    public func exclusiveBlocks(first: UInt64, count: UInt64) throws(PoolError) -> [UInt64]? {
        var out: [UInt64] = []
        var v = first
        while v < first + count {
            var node = try engine.root(at: rootOffset, depth: depth)
            var level = depth - 1
            guard node != 0, engine.refcount(node) == 1 else { return nil }
            while level > 0 {
                node = try engine.entry(node: node, index: PoolEngine.index(v, level: level), level: level)
                guard node != 0, engine.refcount(node) == 1 else { return nil }
                level -= 1
            }
            let end = min(first + count, (v | 511) + 1)
            while v < end {
                let p = try engine.entry(node: node, index: Int(v & 511), level: 0)
                guard p != 0, engine.refcount(p) == 1 else { return nil }
                out.append(p)
                v += 1
            }
        }
        return out
    }

    /// Gives every block of a range a block of its own (copying shared ones, allocating zeroed
    /// ones for holes), publishing the remaps as copy-on-write.
    public func makeExclusive(first: UInt64, count: UInt64) throws(PoolError) {
        var v = first
        while v < first + count {
            let n = min(first + count - v, 512 - (v & 511))
            let ok = try withMapLockedThrowing { () throws(PoolError) in try exclusiveBlocks(first: v, count: n) != nil }
            if !ok { try relocate(first: v, count: n, reason: .copyOnWrite) }
            v += n
        }
    }

    /// Rewrites a range with its current contents into new blocks (out of place, so the old
    /// blocks leave this map).
    public func relocate(first: UInt64, count: UInt64, reason: MappingChangeReason) throws(PoolError) {
        var v = first
        while v < first + count {
            let n = min(first + count - v, 256)
            var data = [UInt8](repeating: 0, count: Int(n) << 12)
            var pos = 0
            try engine.withStripeCopying(0) { () throws(PoolError) in
                try read(offset: v << 12, length: Int(n) << 12) { seg in
                    switch seg {
                    case .data(let p, let k):
                        data.withUnsafeMutableBytes { $0.baseAddress!.advanced(by: pos).copyMemory(from: p, byteCount: k) }
                        pos += k
                    case .hole(let k):
                        pos += k
                    }
                }
            }
            pool.testHooks.withLock { $0.relocationCopied }?(id, v, reason)
            let r: Result<Void, PoolError> = data.withUnsafeBytes { b in
                Result { () throws(PoolError) in
                    var source = BufferByteSource(b)
                    try write(offset: v << 12, length: Int(n) << 12, fua: false, from: &source, reason: reason)
                }
            }
            try r.get()
            v += n
        }
    }

    func withMapLockedThrowing<T>(_ body: () throws(PoolError) -> T) throws(PoolError) -> T {
        mapLock.lock()
        defer { mapLock.unlock() }
        return try body()
    }
}
