import PmemSystem

/// Walking and changing a volume's map: a radix tree of 4 KiB nodes with 512 entries each.
/// The root (level depth-1) is named by the volume record; level 0 nodes (leaves) hold
/// physical data blocks. Nodes shared with snapshots or clones (refcount > 1) are copied
/// before they change, so changing one map never changes another.
extension PoolEngine {
    @inline(__always) package static func index(_ vblock: UInt64, level: Int) -> Int { Int((vblock >> (9 * UInt64(level))) & 511) }

    @inline(__always) package func entryOffset(node: UInt64, index: Int) -> UInt64 { layout.blockOffset(node) + UInt64(8 * index) }

    @inline(__always) package func validBlock(_ b: UInt64) -> Bool { b != 0 && b < layout.blockCount }

    /// The root of the map whose record's root field is at `rootOffset` (0: an empty map).
    /// Throws `.io` when the stored word fails its tag.
    @inline(__always)
    package func root(at rootOffset: UInt64, depth: Int) throws(PoolError) -> UInt64 {
        let raw = journal.load(rootOffset)
        if raw == 0 { return 0 }
        let slot = VolumeRecord.slot(ofRootOffset: rootOffset)
        guard let b = MapEntry.root(raw, slot: slot, depth: depth), validBlock(b) else {
            throw PoolError(.io, "the map root of volume slot \(slot) fails its check (corrupt volume table: run 'pmem-nbd check')")
        }
        return b
    }

    /// Stores a map root into a record's root field, tagged for that slot and depth.
    @inline(__always)
    package func storeRoot(_ block: UInt64, at rootOffset: UInt64, depth: Int) {
        journal.store(rootOffset, MapEntry.makeRoot(block, slot: VolumeRecord.slot(ofRootOffset: rootOffset), depth: depth))
    }

    /// Entry `index` of the level-`level` node `node`: its block, 0 for a hole. A corrupt entry
    /// (tag mismatch, or a block outside the pool) throws `.io`: the caller's client gets EIO.
    @inline(__always)
    package func entry(node: UInt64, index: Int, level: Int) throws(PoolError) -> UInt64 {
        let raw = journal.load(entryOffset(node: node, index: index))
        if raw == 0 { return 0 }
        guard let b = MapEntry.block(raw, index: index, level: level), validBlock(b) else {
            throw PoolError(.io, "map entry \(index) of node \(node) (level \(level)) fails its check (corrupt map: run 'pmem-nbd check')")
        }
        return b
    }

    /// The same for paths that must go on (reference counting while nodes are copied or freed):
    /// a corrupt entry counts as a hole, so it never changes another block's refcount; logged.
    package func entryOrHole(node: UInt64, index: Int, level: Int) -> UInt64 {
        decodedOrHole(journal.load(entryOffset(node: node, index: index)), node: node, index: index, level: level)
    }

    /// A word already loaded (or exchanged) from entry `index` of `node`, decoded as `entryOrHole` does.
    package func decodedOrHole(_ raw: UInt64, node: UInt64, index: Int, level: Int) -> UInt64 {
        if raw == 0 { return 0 }
        guard let b = MapEntry.block(raw, index: index, level: level), validBlock(b) else {
            Log.error("map entry \(index) of node \(node) (level \(level)) fails its check: left alone; run 'pmem-nbd check'")
            return 0
        }
        return b
    }

    /// The leaf node covering `vblock`, or 0 with the number of blocks from `vblock` to the end
    /// of the absent subtree. No locks: the caller is inside a read epoch.
    package func leaf(rootOffset: UInt64, depth: Int, vblock: UInt64) throws(PoolError) -> (leaf: UInt64, absentSpan: UInt64) {
        var node = try root(at: rootOffset, depth: depth)
        var level = depth - 1
        while true {
            if node == 0 {
                let span = UInt64(1) << (9 * UInt64(level + 1))
                return (0, span - (vblock & (span - 1)))
            }
            guard validBlock(node) else { throw PoolError(.io, "map node \(node) is out of range (corrupt map)") }
            if level == 0 { return (node, 0) }
            node = try entry(node: node, index: PoolEngine.index(vblock, level: level), level: level)
            level -= 1
        }
    }

    /// The physical block of `vblock`, 0 for a hole.
    package func lookup(rootOffset: UInt64, depth: Int, vblock: UInt64) throws(PoolError) -> UInt64 {
        let (leaf, _) = try leaf(rootOffset: rootOffset, depth: depth, vblock: vblock)
        if leaf == 0 { return 0 }
        return try entry(node: leaf, index: PoolEngine.index(vblock, level: 0), level: 0)
    }

    /// The node at `stopLevel` on the path to `vblock`, made private to this map (copied where
    /// shared) and created where absent if `create`; nil when absent and not creating.
    /// Gate and the volume's lock are held.
    package func writableNode(rootOffset: UInt64, depth: Int, vblock: UInt64, stopLevel: Int, create: Bool,
                              spares: inout NodeSpares) throws(PoolError) -> UInt64? {
        var node = try root(at: rootOffset, depth: depth)
        var level = depth - 1
        if node == 0 {
            guard create else { return nil }
            node = try newNode(&spares)
            storeRoot(node, at: rootOffset, depth: depth)
        } else if refcount(node) > 1 {
            node = try copyNode(node, level: level, &spares)
            storeRoot(node, at: rootOffset, depth: depth)
        }
        while level > stopLevel {
            let index = PoolEngine.index(vblock, level: level)
            let off = entryOffset(node: node, index: index)
            var child = try entry(node: node, index: index, level: level)
            if child == 0 {
                guard create else { return nil }
                child = try newNode(&spares)
                journal.store(off, MapEntry.make(child, index: index, level: level))
            } else if refcount(child) > 1 {
                child = try copyNode(child, level: level - 1, &spares)
                journal.store(off, MapEntry.make(child, index: index, level: level))
            }
            node = child
            level -= 1
        }
        return node
    }

    /// Points entries `first`, `first + 1`, … of leaf `leaf` at `blocks` (new data blocks, each
    /// gaining a reference) and drops a reference from the blocks they named: the entries under
    /// one lock, the refcounts a page at a time. Gate and the map's lock are held.
    package func remap(leaf: UInt64, first: Int, to blocks: UnsafeBufferPointer<UInt64>) {
        let n = blocks.count
        withUnsafeTemporaryAllocation(of: UInt64.self, capacity: n) { old in
            journal.withPage(entryOffset(node: leaf, index: first)) { page in
                for i in 0..<n {
                    old[i] = page.exchange(entryOffset(node: leaf, index: first + i), MapEntry.make(blocks[i], index: first + i, level: 0))
                }
            }
            // A corrupt entry decodes as a hole: it never lowers another block's count.
            for i in 0..<n { old[i] = decodedOrHole(old[i], node: leaf, index: first + i, level: 0) }
            adjustDataRefcounts(blocks, 1)
            var sorted = old
            sorted.sort()
            adjustDataRefcounts(UnsafeBufferPointer(old), -1)
        }
    }

    /// Calls `body(blocks, mapped)` for consecutive runs of mapped or unmapped blocks from
    /// `first` up to `end`, skipping absent subtrees whole; stops when `body` returns false.
    /// An entry that fails its check throws `.io` (as a read of it does).
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
                let mapped = try entry(node: leaf, index: Int(v & 511), level: 0) != 0
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
