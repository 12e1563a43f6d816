import PmemPool
import PmemSystem

/// Releases the maps of deleted volumes and snapshots (and of volumes' pre-rollback maps),
/// a bounded group of metadata words at a time, so I/O never waits long and the work is
/// proportional to what is freed: shared subtrees are let go with one reference, exclusive
/// ones are taken apart leaf by leaf. Each group leaves a consistent map behind, so a crash
/// or restart resumes where it stopped.
final class Deleter: @unchecked Sendable {
    unowned(unsafe) var pool: Pool!
    let background: Bool
    private let cond = PosixCondition()
    private var stopping = false
    private var running = false
    private var pending = true

    init(background: Bool) { self.background = background }

    func start() {
        guard background else { return }
        running = true
        let owner = pool
        OSThread.spawn(name: "pmem-delete") { [self] in
            withExtendedLifetime(owner) { loop() }
        }
    }

    func stop() {
        cond.withLock {
            stopping = true
            cond.broadcast()
            while running { _ = cond.wait(seconds: 0.1) }
        }
    }

    func wake() {
        cond.withLock {
            pending = true
            cond.broadcast()
        }
    }

    private func loop() {
        defer { cond.withLock { running = false; cond.broadcast() } }
        while true {
            cond.lock()
            while !pending && !stopping { _ = cond.wait(seconds: 5) }
            pending = false
            let stop = stopping
            cond.unlock()
            if stop { return }
            do {
                while try pool.deleteStep(stopping: { self.cond.withLock { self.stopping } }) {}
            } catch {
                Log.error("background delete: \(error.message)")
            }
        }
    }
}

extension Pool {
    /// Performs all pending deletions now (offline tools and deterministic tests).
    public func runDeletions() throws(PoolError) {
        while try deleteStep(stopping: { false }) {}
        try engine.sync()
    }

    /// The same, telling `progress` how far it is (the CLI's bar).
    /// `progress(freed, total)` counts blocks: `total` is what the records being deleted hold
    /// alone (a walk of their maps first), `freed` how many have been released so far.
    public func runDeletions(progress: (UInt64, UInt64) -> Void) throws(PoolError) {
        var total: UInt64 = 0
        // Only for the progress bar: a damaged map (whose entries deletion drops) counts as empty.
        for r in records() where r.kind == .deleting { total += ((try? usage(of: r))?.exclusive ?? 0) >> 12 }
        let before = engine.space.allocated
        progress(0, total)
        while try deleteStep(stopping: { false }) {
            progress(min(total, before &- min(before, engine.space.allocated)), total)
        }
        progress(total, total)
        try engine.sync()
    }

    /// Records still being deleted.
    public var deletionsPending: Int { records().filter { $0.kind == .deleting }.count }

    /// One metadata group of deletion work; false when nothing is left to delete.
    func deleteStep(stopping: () -> Bool) throws(PoolError) -> Bool {
        let held = deleterHolds.withLock { $0 }
        guard !stopping(), let r = records().first(where: { $0.kind == .deleting && !held.contains($0.slot) }) else { return false }
        let rootField = VolumeRecord.offset(slot: r.slot) + VolumeRecord.rootField
        if MapEntry.root(engine.journal.load(rootField), slot: r.slot, depth: r.depth) == 0 {
            // Nothing left: the table entry is free again. Under the table lock, like every
            // other change of the table: the slot reads free as soon as its kind word is
            // cleared, and a snapshot or volume created meanwhile would take it and have the
            // rest of its record cleared under it.
            try engine.tableLock.withLock { () throws(PoolError) in
                try engine.withMetadata(words: Pool.tableWords) { () throws(PoolError) in
                    let words = VolumeRecord(slot: r.slot, kind: .free, id: 0, parent: 0, root: 0, size: 0, depth: 0,
                                             created: 0, generation: 0, name: "").words()
                    for (i, (off, _)) in words.enumerated() {
                        engine.journal.store(off, 0)
                        if i == 0 { testHooks.withLock { $0.deleterFreeingSlot }?(r.slot) }
                    }
                }
            }
            return true
        }
        let budget = max(600, engine.journal.capacity / 8)
        try engine.withMetadata(words: budget) { () throws(PoolError) in
            let j = engine.journal
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
                guard engine.validBlock(root) else { throw PoolError(.io, "map root of '\(r.name)' is out of range (corrupt)") }
                var entry = rootOff
                var node = root
                var level = r.depth - 1
                while true {
                    if level == 0 || engine.refcount(node) > 1 {
                        // A leaf, or a subtree others share: let go of it whole.
                        j.store(entry, 0)
                        engine.adjustRefcount(node, -1, level: level)
                        used += level == 0 ? 520 : 4
                        break
                    }
                    // An exclusive inner node: descend to its first child, or drop it if empty.
                    var child: (Int, UInt64)?
                    for i in 0..<512 {
                        let e = engine.entryOrHole(node: node, index: i, level: level)
                        if e != 0 { child = (i, e); break }
                    }
                    guard let (i, c) = child else {
                        j.store(entry, 0)
                        engine.adjustRefcount(node, -1, level: level)
                        used += 4
                        break
                    }
                    guard engine.validBlock(c) else { throw PoolError(.io, "map of '\(r.name)' is corrupt") }
                    entry = engine.entryOffset(node: node, index: i)
                    node = c
                    level -= 1
                }
            }
        }
        return true
    }
}
