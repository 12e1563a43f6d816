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
        if engine.mapIsEmpty(slot: r.slot, depth: r.depth) {
            // Nothing left: the table entry is free again. Under the table lock, like every
            // other change of the table: the slot reads free as soon as its kind word is
            // cleared, and a snapshot or volume created meanwhile would take it and have the
            // rest of its record cleared under it.
            try engine.tableLock.withLock { () throws(PoolError) in
                try engine.withMetadata(words: Pool.tableWords) { () throws(PoolError) in
                    engine.clearRecord(slot: r.slot) { testHooks.withLock { $0.deleterFreeingSlot }?(r.slot) }
                }
            }
            return true
        }
        // A bounded group of the map released (PmemPool/MapUpdates.swift).
        try engine.releaseMapStep(of: r)
        return true
    }
}
