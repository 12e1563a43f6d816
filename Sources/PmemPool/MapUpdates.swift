import Glibc
import PmemSystem

/// The changes of a volume's map that writes, trims and zeroes make: publishing data blocks a
/// write filled (completing partial blocks first) and unmapping ranges. The volume layer
/// (PmemVolumes/Volume.swift) reserves the blocks, fills them with the payload and announces
/// the moves; the map words, the journal, the refcounts and the read-modify-write stripes are
/// handled here.
extension PoolEngine {
    /// Read-modify-write stripes (locks, each with a read epoch).
    package static let stripeCount = 64

    /// The stripe of block `vblock` of the map salted `salt` (the volume's id).
    @inline(__always) static func stripe(_ vblock: UInt64, salt: UInt64) -> Int {
        Int(truncatingIfNeeded: ((vblock ^ salt &* 0x9E37_79B9) &* 0x9E37_79B9_7F4A_7C15) >> 58)
    }

    /// Runs `body` with every read-modify-write stripe locked (in ascending order, as writers
    /// take them): no partial-block write is between reading its old block and publishing the
    /// new one meanwhile. Take it before the metadata gate, as writers do.
    package func withEveryStripeLocked<T>(_ body: () throws(PoolError) -> T) throws(PoolError) -> T {
        for s in 0..<PoolEngine.stripeCount { rmwLocks.lock(s) }
        defer { for s in (0..<PoolEngine.stripeCount).reversed() { rmwLocks.unlock(s) } }
        return try body()
    }

    /// Runs `body` holding one read-modify-write stripe inside its read epoch: blocks read
    /// meanwhile are not reused under the reader (a relocation's copy).
    package func withStripeCopying<T>(_ stripe: Int, _ body: () throws(PoolError) -> T) throws(PoolError) -> T {
        let readGuard = rmwGuards[stripe]
        rmwLocks.lock(stripe)
        readGuard.enter()
        defer {
            readGuard.exit()
            rmwLocks.unlock(stripe)
        }
        return try body()
    }

    /// Gives back reserved blocks a write did not publish.
    package func unreserve(_ blocks: UnsafeBufferPointer<UInt64>) { allocator.unreserve(blocks) }

    /// Completes the partial blocks among the filled `blocks` of [start, end) (within one leaf)
    /// and points the map at `rootOffset` at them, in one metadata group under `mapLock`.
    /// `stripeSalt` spreads the map's blocks over the read-modify-write stripes (the volume's
    /// id). When `announce`, `willRemap(first, old, new)` is called under the map lock just
    /// before the map changes.
    package func publish(rootOffset: UInt64, depth: Int, mapLock: PosixMutex, stripeSalt: UInt64,
                         start: UInt64, end: UInt64, blocks: UnsafeMutableBufferPointer<UInt64>, spares: inout NodeSpares,
                         announce: Bool,
                         willRemap: (UInt64, UnsafeBufferPointer<UInt64>, UnsafeBufferPointer<UInt64>) -> Void) throws(PoolError) {
        let first = start >> 12
        let count = blocks.count
        let base = media.base
        let persistence = self.persistence
        // Then the rest of a partial block: the old block's bytes around the payload (zeroes
        // for a hole). This read-modify-write is serialised per block (striped engine-wide) up
        // to the map update, and copies inside the stripe's read epoch, so the old block cannot
        // be reused under the copy. Stripes are locked in ascending order, once each.
        let headPartial = start & 4095 != 0 || (count == 1 && end & 4095 != 0)
        let tailPartial = count > 1 && end & 4095 != 0
        var partial: [Int] = []
        if headPartial { partial.append(0) }
        if tailPartial { partial.append(count - 1) }
        var locked: [Int] = []
        for k in partial {
            let s = PoolEngine.stripe(first + UInt64(k), salt: stripeSalt)
            if !locked.contains(s) { locked.append(s) }
        }
        locked.sort()
        for s in locked { rmwLocks.lock(s) }
        defer { for s in locked { rmwLocks.unlock(s) } }
        let pw = persistence.usesPwrite
        for k in partial {
            let vb = first + UInt64(k)
            let blockStart = vb << 12
            let head = Int(max(start, blockStart) - blockStart), tail = Int(min(end, blockStart + 4096) - blockStart)
            let at = Int(layout.blockOffset(blocks[k]))
            let dst = base + at
            let readGuard = rmwGuards[PoolEngine.stripe(vb, salt: stripeSalt)]
            readGuard.enter()
            defer { readGuard.exit() }
            let old = try lookup(rootOffset: rootOffset, depth: depth, vblock: vb)
            if old != 0 {
                guard validBlock(old) else { throw PoolError(.io, "map entry for block \(vb) is out of range (corrupt map)") }
                let src = UnsafeRawPointer(base + Int(layout.blockOffset(old)))
                if pw {
                    // Page mode with pwrite: the old bytes go through the file as the payload did.
                    if head > 0 { try persistence.pwrite(at: at, src, head) }
                    if tail < 4096 { try persistence.pwrite(at: at + tail, src + tail, 4096 - tail) }
                } else {
                    if head > 0 { PersistentMemory.copyNonTemporal(to: dst, from: src, count: head) }
                    if tail < 4096 { PersistentMemory.copyNonTemporal(to: dst + tail, from: src + tail, count: 4096 - tail) }
                }
                copyCounters.addShared(CopyCounter.partialBlocks)
            } else if pw {
                try withUnsafeTemporaryAllocation(byteCount: 4096, alignment: 64) { (zero) throws(PoolError) in
                    memset(zero.baseAddress!, 0, 4096)
                    if head > 0 { try persistence.pwrite(at: at, zero.baseAddress!, head) }
                    if tail < 4096 { try persistence.pwrite(at: at + tail, zero.baseAddress!, 4096 - tail) }
                }
            } else {
                if head > 0 { PersistentMemory.zeroNonTemporal(dst, count: head) }
                if tail < 4096 { PersistentMemory.zeroNonTemporal(dst + tail, count: 4096 - tail) }
            }
            if !pw { persistence.didStoreNonTemporal(dst, 4096) }
        }
        // The metadata group fences this thread's data before its gate is released, so the
        // blocks are durable before any commit names them.
        try withMetadata(words: 3 * count + (depth + 1) * 520 + 16) { () throws(PoolError) in
            mapLock.lock()
            defer { mapLock.unlock() }
            guard let leaf = try writableNode(rootOffset: rootOffset, depth: depth, vblock: first, stopLevel: 0,
                                              create: true, spares: &spares) else {
                throw PoolError(.io, "map walk failed")
            }
            // Page domain: the commit of this group's batch makes these blocks durable first.
            var r = 0
            while r < count {
                var n = 1
                while r + n < count && blocks[r + n] == blocks[r] + UInt64(n) { n += 1 }
                noteWritten(blocks[r], count: n)
                r += n
            }
            if announce {
                // Announced before the map changes (the feed raises its sequence number first).
                withUnsafeTemporaryAllocation(of: UInt64.self, capacity: count) { old in
                    for i in 0..<count {
                        old[i] = entryOrHole(node: leaf, index: Int((first + UInt64(i)) & 511), level: 0)
                    }
                    willRemap(first, UnsafeBufferPointer(old), UnsafeBufferPointer(blocks))
                }
            }
            remap(leaf: leaf, first: Int(first & 511), to: UnsafeBufferPointer(blocks))
        }
    }

    /// Unmaps whole blocks [first, end) of the map at `rootOffset`: one metadata group per
    /// leaf, under `mapLock`; a leaf covered whole is dropped from its parent (one reference
    /// less, however shared it is). When `announce`, `willRemap(first, old, new)` (new all
    /// holes) is called under the map lock before each group's change.
    package func unmap(rootOffset: UInt64, depth: Int, mapLock: PosixMutex, first: UInt64, end: UInt64, announce: Bool,
                       willRemap: (UInt64, UnsafeBufferPointer<UInt64>, UnsafeBufferPointer<UInt64>) -> Void) throws(PoolError) {
        var v = first
        while v < end {
            let leafEnd = min(end, (v | 511) + 1)
            let (leaf, span) = try self.leaf(rootOffset: rootOffset, depth: depth, vblock: v)
            if leaf == 0 {
                v = min(end, v + span)
                continue
            }
            let whole = v & 511 == 0 && leafEnd - v == 512 && depth > 1
            var spares = try NodeSpares(self, count: depth + 1)
            try withMetadata(words: 2 * 512 + (depth + 1) * 520 + 16) { () throws(PoolError) in
                mapLock.lock()
                defer { mapLock.unlock() }
                if whole {
                    guard let parent = try writableNode(rootOffset: rootOffset, depth: depth, vblock: v, stopLevel: 1,
                                                        create: false, spares: &spares) else { return }
                    let index = PoolEngine.index(v, level: 1)
                    let off = entryOffset(node: parent, index: index)
                    let child = entryOrHole(node: parent, index: index, level: 1)
                    guard child != 0 else { return }
                    if announce { announceUnmap(willRemap, leaf: child, first: v, count: 512) }
                    journal.store(off, 0)
                    adjustRefcount(child, -1, level: 0)
                    return
                }
                guard let leaf = try writableNode(rootOffset: rootOffset, depth: depth, vblock: v, stopLevel: 0,
                                                  create: false, spares: &spares) else { return }
                if announce { announceUnmap(willRemap, leaf: leaf, first: v, count: Int(leafEnd - v)) }
                for u in v..<leafEnd {
                    let off = entryOffset(node: leaf, index: Int(u & 511))
                    let raw = journal.load(off)
                    guard raw != 0 else { continue }
                    // A corrupt entry (decoded as a hole) is dropped without touching a refcount.
                    let old = decodedOrHole(raw, node: leaf, index: Int(u & 511), level: 0)
                    journal.store(off, 0)
                    if old != 0 { adjustRefcount(old, -1, level: -1) }
                }
            }
            v = leafEnd
        }
    }

    /// Tells `willRemap` that the mapped blocks of a leaf range are being unmapped.
    private func announceUnmap(_ willRemap: (UInt64, UnsafeBufferPointer<UInt64>, UnsafeBufferPointer<UInt64>) -> Void,
                               leaf: UInt64, first: UInt64, count: Int) {
        withUnsafeTemporaryAllocation(of: UInt64.self, capacity: count * 2) { buf in
            let old = UnsafeMutableBufferPointer(rebasing: buf[0..<count]), new = UnsafeMutableBufferPointer(rebasing: buf[count...])
            for i in 0..<count {
                old[i] = entryOrHole(node: leaf, index: Int((first + UInt64(i)) & 511), level: 0)
                new[i] = 0
            }
            willRemap(first, UnsafeBufferPointer(old), UnsafeBufferPointer(new))
        }
    }
}

// MARK: whole maps

extension PoolEngine {
    /// Gives the map with root `root` (level `depth - 1`) one more owner: a snapshot or a clone
    /// taking it, or a rollback (gate held, with the owner's root stored by the caller).
    package func shareMap(root: UInt64, depth: Int) {
        if root != 0 { adjustRefcount(root, 1, level: depth - 1) }
    }

    /// Deepens the map whose root field is at `rootOffset` from `depth` to `newDepth` levels:
    /// new top nodes whose entry 0 is the old root (gate held, map lock held). An empty map
    /// stays empty.
    package func deepenMap(rootOffset: UInt64, depth: Int, to newDepth: Int, spares: inout NodeSpares) throws(PoolError) {
        var root = try self.root(at: rootOffset, depth: depth)
        guard root != 0 else { return }
        for level in depth..<newDepth {
            // A new top node at `level` whose first entry is the old root.
            let top = try newNode(&spares)
            journal.store(entryOffset(node: top, index: 0), MapEntry.make(root, index: 0, level: level))
            root = top
        }
        storeRoot(root, at: rootOffset, depth: newDepth)
    }

    /// Releases part of the map of `r`, a record being deleted: one metadata group of at most
    /// a bounded number of words, a leaf or a shared subtree dropped whole, an exclusive inner
    /// node descended into first. Returns once the group is done or the root is empty.
    package func releaseMapStep(of r: VolumeRecord) throws(PoolError) {
        let budget = max(600, journal.capacity / 8)
        try withMetadata(words: budget) { () throws(PoolError) in
            let j = journal
            let o = VolumeRecord.offset(slot: r.slot)
            let rootOff = o + VolumeRecord.rootField
            var used = 0
            while used + 530 <= budget {
                // A root that fails its tag is dropped as if empty: its blocks leak (check
                // finds them) rather than refcounts of blocks it does not own being lowered.
                guard let root = MapEntry.root(j.load(rootOff), slot: r.slot, depth: r.depth) else {
                    Log.error("the map root of '\(r.name)' fails its check; its blocks are left to 'pmem-nbd check --repair'")
                    j.store(rootOff, 0)
                    continue
                }
                // Nothing left: the next step frees the table entry (under the table lock).
                if root == 0 { return }
                guard validBlock(root) else { throw PoolError(.io, "map root of '\(r.name)' is out of range (corrupt)") }
                var entry = rootOff
                var node = root
                var level = r.depth - 1
                while true {
                    if level == 0 || refcount(node) > 1 {
                        // A leaf, or a subtree others share: let go of it whole.
                        j.store(entry, 0)
                        adjustRefcount(node, -1, level: level)
                        used += level == 0 ? 520 : 4
                        break
                    }
                    // An exclusive inner node: descend to its first child, or drop it if empty.
                    var child: (Int, UInt64)?
                    for i in 0..<512 {
                        let e = entryOrHole(node: node, index: i, level: level)
                        if e != 0 { child = (i, e); break }
                    }
                    guard let (i, c) = child else {
                        j.store(entry, 0)
                        adjustRefcount(node, -1, level: level)
                        used += 4
                        break
                    }
                    guard validBlock(c) else { throw PoolError(.io, "map of '\(r.name)' is corrupt") }
                    entry = entryOffset(node: node, index: i)
                    node = c
                    level -= 1
                }
            }
        }
    }
}
