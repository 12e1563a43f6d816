import Glibc
import PmemSystem
import Synchronization

/// Runs commits: on its own thread whenever a sync (FLUSH, FUA), free space or a full batch asks,
/// and every few seconds while anything is pending; or inline on the caller's thread. After a
/// commit that leaves the journal ring more than half used it runs a checkpoint.
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
    /// Seconds after which pending changes are committed although nobody asked (as a file
    /// system commits its journal every few seconds).
    static let interval = 5.0

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

    /// Runs `body` holding the commit lock (nothing commits meanwhile).
    func withCommitLock<T>(_ body: () throws(PoolError) -> T) throws(PoolError) -> T {
        commitLock.lock()
        defer { commitLock.unlock() }
        if let failure { throw failure }
        return try body()
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
            // With the waiters released, make room in the ring if it is filling up.
            if engine.journal.wantsCheckpoint { try engine.checkpointLocked() }
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

    /// How often the thread looks for an idle running batch.
    static let tick = 0.2

    private func loop() {
        defer { cond.withLock { running = false; cond.broadcast() } }
        var lastWords = 0
        var lastCommit = MonotonicClock.seconds()
        while true {
            cond.lock()
            if !(requested > durable || stopping) { _ = cond.wait(seconds: Committer.tick) }
            let stop = stopping
            // Read under the lock: syncs raise `requested` from other threads.
            let asked = requested > durable
            cond.unlock()
            guard let engine else { return }
            // Pending words are committed when asked (FLUSH, FUA, space, a full batch), when no
            // operation added any for a tick (readers then find the pool's words without the
            // overlay), and at the latest `interval` after the last commit.
            let words = engine.journal.runningWordCount
            let now = MonotonicClock.seconds()
            let idle = words > 0 && words == lastWords
            let due = engine.journal.hasPendingWords && now - lastCommit >= Committer.interval
            if asked || stop || idle || due {
                commitLock.lock()
                try? commitNow()
                commitLock.unlock()
                lastCommit = now
                lastWords = 0
            } else {
                lastWords = words
                engine.allocator.reclaim()
            }
            if stop || failure != nil { return }
        }
    }
}
