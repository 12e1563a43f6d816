import PmemSystem

/// Whole-map walks that answer questions about maps rather than change them: space used,
/// sharing, the difference of two maps, the owners of a block. Every entry is decoded through
/// its check tag (`entry`, `entryOrHole`).
extension PoolEngine {
    /// A map's space: a block is exclusive when it and every node above it have one reference.
    /// A volume's map is walked whole (a visit per mapped block). A snapshot's map never
    /// changes, so its referenced figure is walked once and kept (`snapshotReferenced`, by id:
    /// ids are never reused); its exclusive figure, which changes as other maps let go of
    /// blocks, walks only the nodes no other map shares. A map entry or root that fails its
    /// check throws `.io`.
    package func usage(of r: VolumeRecord) throws(PoolError) -> (referenced: UInt64, exclusive: UInt64) {
        guard r.kind == .snapshot else { return try fullUsage(of: r) }
        let key = SnapshotKey(id: r.id, root: r.root, depth: r.depth)
        guard let referenced = snapshotReferenced.withLock({ $0[key] }) else {
            let u = try fullUsage(of: r)
            snapshotReferenced.withLock {
                if $0.count >= 65536 { $0 = [:] }
                $0[key] = u.referenced
            }
            return u
        }
        let top = try root(at: VolumeRecord.offset(slot: r.slot) + VolumeRecord.rootField, depth: r.depth)
        guard top != 0 else { return (referenced, 0) }
        let pages = PageCopies(self)
        guard pages.refcount(top) == 1 else { return (referenced, 0) }
        // Below a shared node nothing is exclusive: only unshared nodes are visited.
        var exclusive: UInt64 = 0
        var stack: [(node: UInt64, level: Int)] = [(top, r.depth - 1)]
        while let (node, level) = stack.popLast() {
            exclusive += 4096
            for i in 0..<512 {
                let e = try pages.entry(node: node, index: i, level: level)
                if e == 0 || pages.refcount(e) != 1 { continue }
                if level == 0 { exclusive += 4096 } else { stack.append((e, level - 1)) }
            }
        }
        return (referenced, exclusive)
    }

    /// `usage(of:)` by a walk of the whole map, every time.
    package func fullUsage(of r: VolumeRecord) throws(PoolError) -> (referenced: UInt64, exclusive: UInt64) {
        var u: (referenced: UInt64, exclusive: UInt64) = (0, 0)
        let top = try root(at: VolumeRecord.offset(slot: r.slot) + VolumeRecord.rootField, depth: r.depth)
        guard top != 0 else { return u }
        // Nodes and refcounts are read a page at a time (`PageCopies`): under a writer, one
        // shard lock per page rather than per word.
        let pages = PageCopies(self)
        var stack: [(node: UInt64, level: Int, shared: Bool)] = [(top, r.depth - 1, pages.refcount(top) > 1)]
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

    /// Runs of blocks from `first` to `end` that are shared (the block, or a map node above it,
    /// has more than one reference) or not; holes count as not shared. A map entry that fails
    /// its check throws `.io`.
    package func sharingRuns(rootOffset: UInt64, depth: Int, first: UInt64, end: UInt64, _ body: (UInt64, Bool) -> Bool) throws(PoolError) {
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
            var node = try root(at: rootOffset, depth: depth)
            var level = depth - 1
            var shared = node != 0 && refcount(node) > 1
            var span = UInt64(1) << (9 * UInt64(depth))
            while node != 0 && level > 0 {
                node = try entry(node: node, index: PoolEngine.index(v, level: level), level: level)
                span = UInt64(1) << (9 * UInt64(level))
                if node != 0 && refcount(node) > 1 { shared = true }
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
                let p = try entry(node: node, index: Int(v & 511), level: 0)
                guard emit(p != 0 && refcount(p) > 1) else { return }
                v += 1
            }
        }
        if let s = runShared, end > runStart { _ = body(end - runStart, s) }
    }

    /// The physical block of the level-`level` node covering `vblock` (level `depth` is the
    /// virtual slot above the root), 0 when absent. An entry that fails its check throws `.io`.
    package func node(root: UInt64, depth: Int, level: Int, vblock: UInt64) throws(PoolError) -> UInt64 {
        if level >= depth {
            // Above the root: the root covers the first 512^depth blocks only.
            return vblock >> (9 * UInt64(depth)) == 0 ? root : 0
        }
        var n = root
        var l = depth - 1
        while l > level && n != 0 {
            n = try entry(node: n, index: PoolEngine.index(vblock, level: l), level: l)
            l -= 1
        }
        return n
    }

    /// Runs of clean/dirty blocks of the map at `rootOffset` against snapshot `snap`, from `first`
    /// to `end`. The two maps are walked together; wherever they share a node the whole subtree
    /// is clean at once.
    /// Entries are decoded with their check tags: a damaged one (in either map) throws `.io`.
    package func changedRuns(rootOffset: UInt64, depth: Int, against snap: VolumeRecord, first: UInt64, end: UInt64,
                             _ body: (UInt64, Bool) -> Bool) throws(PoolError) {
        let myRoot = try root(at: rootOffset, depth: depth)
        let snapRoot = try root(at: VolumeRecord.offset(slot: snap.slot) + VolumeRecord.rootField, depth: snap.depth)
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
                let a = try node(root: myRoot, depth: depth, level: level, vblock: v)
                let b = try node(root: snapRoot, depth: snap.depth, level: level, vblock: v)
                if a == b {
                    // Same node (or both absent): the whole subtree is unchanged.
                    let span = UInt64(1) << (9 * UInt64(level + 1))
                    guard emit(false, 0) else { return }
                    v = min(end, (v & ~(span - 1)) + span)
                    decided = true
                    break
                }
                if level == 0 {
                    let ea = a == 0 ? 0 : try entry(node: a, index: Int(v & 511), level: 0)
                    let eb = b == 0 ? 0 : try entry(node: b, index: Int(v & 511), level: 0)
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

    /// Which maps hold `block`: (volume id, virtual block) pairs. A damaged root or entry names
    /// no block: it is logged and its map or subtree skipped.
    package func owners(of block: UInt64) -> [(UInt64, UInt64)] {
        guard validBlock(block) else { return [] }
        var out: [(UInt64, UInt64)] = []
        for r in records() where r.kind == .volume || r.kind == .snapshot {
            let top: UInt64
            do { top = try root(at: VolumeRecord.offset(slot: r.slot) + VolumeRecord.rootField, depth: r.depth) } catch {
                Log.error("owners of block \(block): \(error.message); '\(r.name)' skipped")
                continue
            }
            guard top != 0 else { continue }
            var stack: [(UInt64, Int, UInt64)] = [(top, r.depth - 1, 0)]
            while let (node, level, base) = stack.popLast() {
                for i in 0..<512 {
                    let e = entryOrHole(node: node, index: i, level: level)
                    if e == 0 { continue }
                    let vb = base | UInt64(i) << (9 * UInt64(level))
                    if level == 0 {
                        if e == block { out.append((r.id, vb)) }
                    } else {
                        stack.append((e, level - 1, vb))
                    }
                }
            }
        }
        return out
    }
}
