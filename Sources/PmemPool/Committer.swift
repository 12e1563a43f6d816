import Glibc
import PmemSystem
import Synchronization

/// Runs commits: on its own thread every second when anything is pending, and whenever a sync
/// or a full batch asks; or inline on the caller's thread.
package final class Committer: @unchecked Sendable {
    let mode: PoolEngine.CommitMode
    /// Set right after the engine is built. The committer's thread holds the engine strongly
    /// while it runs (until `stop`); inline commits are called by the engine itself.
    unowned(unsafe) var engine: PoolEngine?
    private let cond = PosixCondition()
    private let commitLock = PosixMutex()
    private var requested: UInt64 = 0
    private var durable: UInt64 = 0
    private var stopping = false
    private var running = false
    /// The failure that made the pool read-only (under `cond`); `failed` says whether there is
    /// one without the lock (writers check it on every metadata group).
    private var storedFailure: PoolError?
    private let failed = Atomic<Bool>(false)
    package var failure: PoolError? {
        guard failed.load(ordering: .acquiring) else { return nil }
        return cond.withLock { storedFailure }
    }
    static let interval = 1.0

    init(mode: PoolEngine.CommitMode) { self.mode = mode }

    func start() {
        running = true
        let owner = engine
        OSThread.spawn(name: "pmem-commit") { [self] in
            withExtendedLifetime(owner) { loop() }
        }
    }

    func stop() {
        cond.withLock {
            stopping = true
            cond.broadcast()
        }
        cond.withLock { while running { _ = cond.wait(seconds: 0.1) } }
    }

    /// The running batch a kick already asked for (so repeated kicks cost one atomic load).
    private let kicked = Atomic<UInt64>(0)

    /// Asks for a commit soon without waiting.
    package func kick() {
        guard mode == .background, let engine else { return }
        let batch = engine.journal.runningBatch.load(ordering: .relaxed)
        if kicked.load(ordering: .relaxed) >= batch { return }
        kicked.store(batch, ordering: .relaxed)
        cond.withLock {
            requested = max(requested, batch)
            cond.broadcast()
        }
    }

    /// Returns once every batch up to `batch` is durable.
    package func sync(through batch: UInt64) throws(PoolError) {
        if mode == .inline {
            try commitLock.withLock { () throws(PoolError) in
                if durable >= batch { return }
                try commitNow()
            }
            return
        }
        cond.lock()
        defer { cond.unlock() }
        requested = max(requested, batch)
        cond.broadcast()
        while durable < batch && storedFailure == nil && !stopping { cond.wait() }
        if let storedFailure { throw storedFailure }
    }

    private func commitNow() throws(PoolError) {
        guard let engine else { return }
        if let failure { throw failure }
        do {
            let b = try engine.commitOnce()
            cond.withLock {
                durable = max(durable, b)
                cond.broadcast()
            }
        } catch {
            Log.error("commit failed: \(error.message); the pool is now read-only")
            cond.withLock {
                storedFailure = PoolError(.io, "commit failed: \(error.message)")
                failed.store(true, ordering: .releasing)
                cond.broadcast()
            }
            throw error
        }
    }

    private func loop() {
        defer { cond.withLock { running = false; cond.broadcast() } }
        while true {
            cond.lock()
            if !(requested > durable || stopping) { _ = cond.wait(seconds: Committer.interval) }
            let stop = stopping
            // Read under the lock: syncs raise `requested` from other threads.
            let asked = requested > durable
            cond.unlock()
            guard let engine else { return }
            if engine.journal.hasPendingWords || asked || stop {
                commitLock.lock()
                try? commitNow()
                commitLock.unlock()
            } else {
                engine.allocator.reclaim()
            }
            if stop || failure != nil { return }
        }
    }
}
