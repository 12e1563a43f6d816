import PmemSystem
import Synchronization

/// Hands out free physical blocks. Persistent truth is the refcount array (0 = free) and the
/// high-water mark (every block at or above it is free); this DRAM state is rebuilt lazily, so
/// opening a pool costs the same whatever its size:
/// - a stack of blocks known free,
/// - a scan cursor that walks the refcounts below the high-water mark seen at open, a chunk at
///   a time, only when the stack is empty,
/// - blocks freed by an operation are held until the batch that freed them is durable and
///   every reader that might still see them has moved on (then they return to the stack);
///   freed map nodes are held longer, until a checkpoint: until then recovery may replay an
///   older batch that writes into them.
final class Allocator: @unchecked Sendable {
    let layout: PoolLayout
    let journal: Journal
    let epochs: ReaderEpochs
    private let lock = PosixMutex()
    private var free: [UInt64] = []
    private var cursor: UInt64 = 1
    private let scanEnd: UInt64
    /// Blocks at or above this have never been used (persisted at each commit).
    private(set) var highWater: UInt64
    /// Blocks freed in a batch not yet durable: batch → blocks.
    private var quarantine: [UInt64: [UInt64]] = [:]
    /// Map nodes freed in a batch not yet durable, and those of durable batches waiting for a
    /// checkpoint.
    private var nodeQuarantine: [UInt64: [UInt64]] = [:]
    private var nodesCommitted: [UInt64] = []
    let holdNodesUntilCheckpoint: Bool
    /// Durable frees waiting for readers: (epoch stamp, blocks).
    private var limbo: [(UInt64, [UInt64])] = []
    /// Blocks in quarantine or limbo (the scan must not hand them out).
    private var held: Set<UInt64> = []
    /// Blocks with a nonzero refcount (persisted at each commit).
    let allocated: Atomic<Int64>
    /// Blocks someone outside may still read (a feed lease holder): block → holds.
    private var pins: [UInt64: Int] = [:]
    /// Pinned blocks that are free apart from their pins.
    private var pinnedFree: Set<UInt64> = []
    /// Blocks on damaged media: never handed out again.
    private var bad: Set<UInt64> = []

    init(layout: PoolLayout, journal: Journal, epochs: ReaderEpochs, highWater: UInt64, allocated: Int64,
         holdNodesUntilCheckpoint: Bool = true) {
        self.holdNodesUntilCheckpoint = holdNodesUntilCheckpoint
        self.layout = layout
        self.journal = journal
        self.epochs = epochs
        self.highWater = max(1, min(highWater, layout.blockCount))
        self.scanEnd = self.highWater
        self.allocated = Atomic(allocated)
    }

    /// Block `b`'s reference count (`RefcountSlot.damaged` if its slot fails its tag).
    @inline(__always) func refcount(_ b: UInt64) -> UInt32 {
        RefcountSlot.decode(b, slot: RefcountSlot.slot(b, in: journal.load(layout.refcountWordOffset(b))))
    }

    /// The high-water mark, read under the lock (the committer records it while writers reserve).
    var highWaterNow: UInt64 { lock.withLock { highWater } }

    /// A block for the caller's exclusive use (not yet referenced), or nil when the pool is
    /// full (apart from held blocks: committing may release some).
    func reserve() -> UInt64? {
        lock.lock()
        defer { lock.unlock() }
        while let b = free.popLast() {
            if !bad.contains(b) { return b }
        }
        while cursor < scanEnd {
            let end = min(scanEnd, cursor + 4096)
            for b in cursor..<end where refcount(b) == 0 && !held.contains(b) { free.append(b) }
            cursor = end
            if !free.isEmpty {
                free.reverse()
                return free.popLast()
            }
        }
        while highWater < layout.blockCount {
            highWater += 1
            let b = highWater - 1
            if bad.contains(b) { continue }
            // Above the high-water mark every block is free — unless the pool state was damaged:
            // a block with a count is never handed out (one word read per block, once).
            if refcount(b) != 0 {
                Log.error("block \(b) is in use above the high-water mark (damaged pool state): skipped; run 'pmem-nbd check --repair'")
                continue
            }
            return b
        }
        return nil
    }

    /// Fills `out` with reserved blocks (one lock for all); returns how many it got and how many
    /// more are readily available.
    func reserve(into out: UnsafeMutableBufferPointer<UInt64>) -> (Int, UInt64) {
        lock.lock()
        defer { lock.unlock() }
        var n = 0
        while n < out.count {
            if let b = free.popLast(), !bad.contains(b) {
                out[n] = b
            } else if highWater < layout.blockCount && cursor >= scanEnd && !bad.contains(highWater) && refcount(highWater) == 0 {
                out[n] = highWater
                highWater += 1
            } else {
                // The scan (or nothing) is left: the one-at-a-time path handles it.
                lock.unlock()
                let b = reserve()
                lock.lock()
                guard let b else { return (n, 0) }
                out[n] = b
            }
            n += 1
        }
        return (n, UInt64(free.count) + (scanEnd > cursor ? scanEnd - cursor : 0) + (layout.blockCount - highWater))
    }

    /// Returns reserved blocks that were never referenced.
    func unreserve(_ blocks: UnsafeBufferPointer<UInt64>) {
        lock.withLock { free.append(contentsOf: blocks) }
    }

    func unreserve(_ b: UInt64) {
        lock.withLock { free.append(b) }
    }

    /// A block's refcount dropped to zero in `batch` (`node`: it was a map node).
    func freed(_ b: UInt64, batch: UInt64, node: Bool = false) {
        lock.withLock {
            if node && holdNodesUntilCheckpoint {
                nodeQuarantine[batch, default: []].append(b)
            } else {
                quarantine[batch, default: []].append(b)
            }
            // Only the scan needs to know what is held, and only where it has yet to look.
            if b >= cursor && b < scanEnd { held.insert(b) }
        }
    }

    /// Batches up to `batch` are durable: their frees wait only for readers now.
    func committed(through batch: UInt64) {
        let stamp = epochs.advance()
        lock.withLock {
            var blocks: [UInt64] = []
            for k in quarantine.keys where k <= batch { blocks += quarantine.removeValue(forKey: k)! }
            if !blocks.isEmpty { limbo.append((stamp, blocks)) }
            for k in nodeQuarantine.keys where k <= batch { nodesCommitted += nodeQuarantine.removeValue(forKey: k)! }
        }
        reclaim()
    }

    /// Data blocks freed together in `batch`.
    func freed(_ blocks: UnsafeBufferPointer<UInt64>, batch: UInt64) {
        lock.withLock {
            quarantine[batch, default: []].append(contentsOf: blocks)
            for b in blocks where b >= cursor && b < scanEnd { held.insert(b) }
        }
    }

    /// Blocks freed in `batch` (it must be frozen: no more frees join it).
    func freed(inBatch batch: UInt64) -> [UInt64] {
        lock.withLock { (quarantine[batch] ?? []) + (nodeQuarantine[batch] ?? []) }
    }

    /// A checkpoint made every committed batch durable in place: their freed nodes wait only
    /// for readers now.
    func checkpointed() {
        let stamp = epochs.advance()
        lock.withLock {
            if !nodesCommitted.isEmpty { limbo.append((stamp, nodesCommitted)) }
            nodesCommitted = []
        }
        reclaim()
    }

    /// Freed map nodes of durable batches, waiting for a checkpoint.
    var heldUntilCheckpoint: Int { lock.withLock { nodesCommitted.count } }

    /// Moves blocks no reader can still see back to the free stack.
    func reclaim() {
        let oldest = epochs.oldestActive()
        lock.withLock {
            while let first = limbo.first, first.0 < oldest {
                limbo.removeFirst()
                for b in first.1 {
                    if bad.contains(b) { continue }
                    if pins[b] != nil {
                        pinnedFree.insert(b)
                        continue
                    }
                    // Blocks the scan has yet to reach will be found by it.
                    if b < cursor || b >= scanEnd { free.append(b) } else { held.remove(b) }
                }
            }
        }
    }

    /// Keeps a block from being reused until `unpin` (a lease holder may still read it).
    func pin(_ b: UInt64) {
        lock.withLock { pins[b, default: 0] += 1 }
    }

    func unpin(_ b: UInt64) {
        lock.withLock { unpinLocked(b) }
    }

    /// Unpins several blocks under one acquisition of the lock.
    func unpin(_ blocks: some Sequence<UInt64>) {
        lock.withLock { for b in blocks { unpinLocked(b) } }
    }

    private func unpinLocked(_ b: UInt64) {
        guard let n = pins[b] else { return }
        if n > 1 {
            pins[b] = n - 1
            return
        }
        pins[b] = nil
        if pinnedFree.remove(b) != nil {
            if b < cursor || b >= scanEnd { free.append(b) } else { held.remove(b) }
        }
    }

    /// Marks blocks as on damaged media: a free one is never handed out, a used one is never
    /// reused once freed.
    func markBad(_ blocks: [UInt64]) {
        lock.withLock {
            for b in blocks {
                bad.insert(b)
                if let i = free.firstIndex(of: b) { free.remove(at: i) }
                // The scan must not find it either.
                held.insert(b)
            }
        }
    }

    /// Blocks waiting on a commit or on readers.
    var heldCount: Int {
        lock.withLock {
            quarantine.values.reduce(0) { $0 + $1.count } + limbo.reduce(0) { $0 + $1.1.count }
                + nodeQuarantine.values.reduce(0) { $0 + $1.count } + nodesCommitted.count
        }
    }

    /// Blocks that can be handed out without waiting: the free stack, the unscanned range and
    /// the never-used tail (an upper bound: the scan may find some in use).
    var readilyAvailable: UInt64 {
        lock.withLock { UInt64(free.count) + (scanEnd > cursor ? scanEnd - cursor : 0) + (layout.blockCount - highWater) }
    }
}
