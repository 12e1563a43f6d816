import PmemSystem

/// Walking and changing a volume's map: a radix tree of 4 KiB nodes with 512 entries each.
/// The root (level depth-1) is named by the volume record; level 0 nodes (leaves) hold
/// physical data blocks. Nodes shared with snapshots or clones (refcount > 1) are copied
/// before they change, so changing one map never changes another.
extension PoolEngine {
    @inline(__always) package static func index(_ vblock: UInt64, level: Int) -> Int { Int((vblock >> (9 * UInt64(level))) & 511) }

    @inline(__always) package func entryOffset(node: UInt64, index: Int) -> UInt64 { layout.blockOffset(node) + UInt64(8 * index) }

    @inline(__always) package func validBlock(_ b: UInt64) -> Bool { b != 0 && b < layout.blockCount }

    /// The leaf node covering `vblock`, or 0 with the number of blocks from `vblock` to the end
    /// of the absent subtree. No locks: the caller is inside a read epoch.
    package func leaf(rootOffset: UInt64, depth: Int, vblock: UInt64) throws(PoolError) -> (leaf: UInt64, absentSpan: UInt64) {
        var node = journal.load(rootOffset) & MapEntry.blockMask
        var level = depth - 1
        while true {
            if node == 0 {
                let span = UInt64(1) << (9 * UInt64(level + 1))
                return (0, span - (vblock & (span - 1)))
            }
            guard validBlock(node) else { throw PoolError(.io, "map node \(node) is out of range (corrupt map)") }
            if level == 0 { return (node, 0) }
            node = journal.load(entryOffset(node: node, index: PoolEngine.index(vblock, level: level))) & MapEntry.blockMask
            level -= 1
        }
    }

    /// The physical block of `vblock`, 0 for a hole.
    package func lookup(rootOffset: UInt64, depth: Int, vblock: UInt64) throws(PoolError) -> UInt64 {
        let (leaf, _) = try leaf(rootOffset: rootOffset, depth: depth, vblock: vblock)
        if leaf == 0 { return 0 }
        return journal.load(entryOffset(node: leaf, index: PoolEngine.index(vblock, level: 0))) & MapEntry.blockMask
    }

    /// The node at `stopLevel` on the path to `vblock`, made private to this map (copied where
    /// shared) and created where absent if `create`; nil when absent and not creating.
    /// Gate and the volume's lock are held.
    package func writableNode(rootOffset: UInt64, depth: Int, vblock: UInt64, stopLevel: Int, create: Bool,
                              spares: inout NodeSpares) throws(PoolError) -> UInt64? {
        var node = journal.load(rootOffset) & MapEntry.blockMask
        var level = depth - 1
        if node == 0 {
            guard create else { return nil }
            node = try newNode(&spares)
            journal.store(rootOffset, node)
        } else {
            guard validBlock(node) else { throw PoolError(.io, "map root \(node) is out of range (corrupt map)") }
            if refcount(node) > 1 {
                node = try copyNode(node, level: level, &spares)
                journal.store(rootOffset, node)
            }
        }
        while level > stopLevel {
            let off = entryOffset(node: node, index: PoolEngine.index(vblock, level: level))
            var child = journal.load(off) & MapEntry.blockMask
            if child == 0 {
                guard create else { return nil }
                child = try newNode(&spares)
                journal.store(off, child)
            } else {
                guard validBlock(child) else { throw PoolError(.io, "map node \(child) is out of range (corrupt map)") }
                if refcount(child) > 1 {
                    child = try copyNode(child, level: level - 1, &spares)
                    journal.store(off, child)
                }
            }
            node = child
            level -= 1
        }
        return node
    }

    /// Calls `body(blocks, mapped)` for consecutive runs of mapped or unmapped blocks from
    /// `first` up to `end`, skipping absent subtrees whole; stops when `body` returns false.
    package func allocationRuns(rootOffset: UInt64, depth: Int, first: UInt64, end: UInt64,
                        _ body: (UInt64, Bool) -> Bool) throws(PoolError) {
        var v = first
        var runStart = first
        var runMapped: Bool?
        while v < end {
            let (leaf, span) = try leaf(rootOffset: rootOffset, depth: depth, vblock: v)
            if leaf == 0 {
                let next = min(end, v + span)
                if runMapped == true {
                    if !body(v - runStart, true) { return }
                    runStart = v
                }
                runMapped = false
                v = next
                continue
            }
            let leafEnd = min(end, (v | 511) + 1)
            while v < leafEnd {
                let mapped = journal.load(entryOffset(node: leaf, index: Int(v & 511))) & MapEntry.blockMask != 0
                if runMapped != mapped {
                    if let m = runMapped, v > runStart {
                        if !body(v - runStart, m) { return }
                    }
                    runStart = v
                    runMapped = mapped
                }
                v += 1
            }
        }
        if let m = runMapped, end > runStart { _ = body(end - runStart, m) }
    }
}
