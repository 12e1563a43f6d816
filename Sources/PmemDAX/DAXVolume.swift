import FeedWire
import Glibc
import PmemFeedClient
import PmemSystem

/// How a read was served.
public enum DAXReadPath: Sendable { case direct, nbd }

/// A volume or snapshot read (and, with a write lease, written) straight from pool memory.
/// A handle stands for one record — the volume or snapshot it was opened on, by its id, which
/// is never reused: once that record is deleted, reads and loans fail ("… was deleted") even
/// if another one takes its name (Docs/FEED.md, G9).
public final class DAXVolume: @unchecked Sendable {
    let pool: DAXPool
    public let info: FeedVolume

    init(pool: DAXPool, info: FeedVolume) {
        self.pool = pool
        self.info = info
    }

    public var size: UInt64 { info.size }

    /// The region covering `vblock`, leased and mapped, renewing a lease that runs short; nil
    /// when it cannot be leased (the record is gone, or this connection was fenced).
    func region(_ index: UInt64) throws -> Region? {
        let key = RegionKey(volume: info.id, index: index)
        let now = MonotonicClock.seconds()
        let (current, fenced) = pool.cond.withLock { () -> (Region?, Bool) in
            guard let r = pool.regions[key], r.valid, r.expires - now > pool.leaseDuration / 3 else { return (nil, pool.isFenced) }
            return (r, false)
        }
        if let current { return current }
        if fenced { return nil }
        let first = index << 9
        let count = UInt32(min(512, (info.size >> 12) - first))
        do {
            // The reader thread installs the region as the grant arrives (see DAXPool).
            _ = try pool.request(.region(key)) { id in
                try pool.connection.requestLease(id, mode: .read, volume: info.id, first: first, count: count,
                                                 durationMs: UInt32(pool.leaseDuration * 1000))
            }
        } catch {
            return nil
        }
        let region = pool.cond.withLock { pool.regions[key] }
        return region
    }

    /// Reads `count` bytes at `offset` into `destination`: directly from pool memory where the
    /// blocks are leased and mapped, else through NBD. Each 4 KiB block read holds what that
    /// block of this record held at some instant during the call (G1); once the record is
    /// deleted the call fails.
    @discardableResult
    public func read(offset: UInt64, count: Int, into destination: UnsafeMutableRawPointer) throws -> DAXReadPath {
        guard offset <= info.size, UInt64(count) <= info.size - offset else { throw DAXError("read beyond the end of \(info.name)") }
        try pool.checkAlive(info.id, info.name)
        var pos = offset
        var out = destination
        var path = DAXReadPath.direct
        while pos < offset + UInt64(count) {
            let index = pos >> 21
            let end = min(offset + UInt64(count), (index + 1) << 21)
            let n = Int(end - pos)
            if try !readDirect(region: index, offset: pos, count: n, into: out) {
                try readThroughNBD(offset: pos, count: n, into: out)
                path = .nbd
            }
            pos = end
            out += n
        }
        return path
    }

    /// Reads through NBD, by export name — which another record may have taken once this one
    /// is deleted. So: the record must be alive as of an event sequence taken before the read
    /// and still as of one taken after it. A name is free for reuse only after the deletion's
    /// event is published, so a read that reached a newer record ends with the deletion known.
    private func readThroughNBD(offset: UInt64, count: Int, into out: UnsafeMutableRawPointer) throws {
        try pool.waitProcessed(pool.publishedSequence)
        try pool.checkAlive(info.id, info.name)
        try pool.nbdRead(info.name, offset: offset, into: out, count: count)
        try pool.waitProcessed(pool.publishedSequence)
        try pool.checkAlive(info.id, info.name)
    }

    /// One region's part of a read; false when the region cannot be leased.
    private func readDirect(region index: UInt64, offset: UInt64, count: Int, into out: UnsafeMutableRawPointer) throws -> Bool {
        var tries = 0
        while tries < 100 {
            guard let region = try region(index) else { return false }
            let c1 = pool.publishedSequence
            try pool.waitProcessed(c1)
            // Snapshot the mapping of the blocks this read needs.
            let firstBlock = offset >> 12, lastBlock = (offset + UInt64(count) - 1) >> 12
            let snapshot: [UInt64]? = pool.cond.withLock {
                region.valid ? (firstBlock...lastBlock).map { region.blocks[Int($0 & 511)] } : nil
            }
            guard let mapping = snapshot else { tries += 1; continue }
            var pos = offset
            var dst = out
            for (i, p) in mapping.enumerated() {
                let vb = firstBlock + UInt64(i)
                let inBlock = Int(pos & 4095)
                let n = min(4096 - inBlock, Int(offset + UInt64(count) - pos))
                if p == 0 {
                    memset(dst, 0, n)
                } else {
                    memcpy(dst, pool.base + pool.blockArea + Int(p) << 12 + inBlock, n)
                }
                _ = vb
                pos += UInt64(n)
                dst += n
            }
            let c2 = pool.publishedSequence
            if c2 == c1 {
                pool.countRead(retried: tries)
                return true
            }
            // Something moved meanwhile: was it one of these blocks?
            try pool.waitProcessed(c2)
            let moved = pool.cond.withLock {
                !region.valid || (firstBlock...lastBlock).contains { region.changed[Int($0 & 511)] > c1 }
            }
            if !moved {
                pool.countRead(retried: tries)
                return true
            }
            tries += 1
        }
        throw DAXError("the blocks kept moving; gave up after 100 tries")
    }

    /// Lends block `block` of the volume in place — pool memory, no copy — for the duration of
    /// `body`; nil when it cannot be leased (read it with `read` then). The block may be moved
    /// by the server meanwhile (a write elsewhere goes to a new block), so the bytes can be
    /// older than the volume's current contents, but they stay the block's own and do not
    /// change during the call (G2): the client holds back its acknowledgement of any event
    /// after the borrow began, and the server reuses a leased block only after that
    /// acknowledgement. Holes read as zeros. Fails once the record is deleted.
    public func withMappedBlock<T>(_ block: UInt64, _ body: (UnsafeRawBufferPointer) throws -> T) throws -> T? {
        guard block < info.size >> 12 else { throw DAXError("block \(block) is beyond the end of \(info.name)") }
        try pool.checkAlive(info.id, info.name)
        for _ in 0..<100 {
            guard let region = try region(block >> 9) else {
                // Not leasable: perhaps deleted since (a clear error then), or fenced.
                try pool.waitProcessed(pool.publishedSequence)
                try pool.checkAlive(info.id, info.name)
                return nil
            }
            let lent: (UInt64, UInt64)? = pool.cond.withLock {
                guard region.valid, pool.regions[RegionKey(volume: info.id, index: block >> 9)] === region else { return nil }
                let start = pool.processed
                pool.borrows[start, default: 0] += 1
                return (start, region.blocks[Int(block & 511)])
            }
            guard let (start, physical) = lent else { continue }
            defer { pool.endBorrow(start) }
            if physical == 0 { return try body(UnsafeRawBufferPointer(start: DAXVolume.zeros, count: 4096)) }
            return try body(UnsafeRawBufferPointer(start: pool.base + pool.blockArea + Int(physical) << 12, count: 4096))
        }
        throw DAXError("the region kept changing; gave up after 100 tries")
    }

    nonisolated(unsafe) static let zeros = UnsafeRawPointer(UnsafeMutableRawPointer.allocate(byteCount: 4096, alignment: 4096).initializeMemory(as: UInt8.self, repeating: 0, count: 4096))

    // MARK: write leases

    /// Takes a write lease on `count` blocks from `first`: they become this volume's alone
    /// (shared ones are copied first) and the holder may store into them directly until the
    /// lease ends. `onRecall` is called exactly once if the lease ends other than by the
    /// holder's `release()` — a recall (before a snapshot, or before anything else moves the
    /// blocks), a fence, or a lost connection — even if that happens before this call returns
    /// (the handle's `state` then says so). From that moment `withStores` refuses; stores made
    /// through `pointer(_:)` outside `withStores` must stop before `onRecall` returns. Then the
    /// library flushes the blocks and returns the lease; a holder that is too slow is fenced
    /// (G5–G7).
    public func writeLease(first: UInt64, count: UInt32, duration: Double = 60, onRecall: @escaping @Sendable () -> Void) throws -> DAXWriteLease {
        guard pool.writable else { throw DAXError("open the pool with writable: true for write leases") }
        try pool.checkAlive(info.id, info.name)
        if pool.isFenced { throw DAXError("this feed connection was fenced; open a new DAXPool for write leases") }
        // The feed thread registers the lease as the grant arrives (see DAXPool).
        let reply = try pool.request(.write(volume: info.id, first: first, onRecall: onRecall)) { id in
            try pool.connection.requestLease(id, mode: .write, volume: info.id, first: first, count: count, durationMs: UInt32(duration * 1000))
        }
        guard let lease = reply.lease else { throw DAXError("the feed sent no lease") }
        pool.testHooks.withLock { $0.beforeRegisteringWriteLease }?()
        return lease
    }
}

/// Blocks a client may store into directly, until the lease ends.
public final class DAXWriteLease: @unchecked Sendable {
    let pool: DAXPool
    public let id: UInt64
    /// The volume's id.
    public let volume: UInt64
    public let first: UInt64
    public let blocks: [UInt64]
    let onRecall: @Sendable () -> Void

    /// Where a write lease stands. Only `held` allows stores.
    public enum State: Sendable, Equatable, CustomStringConvertible {
        /// The holder may store.
        case held
        /// The server asked for it back; `onRecall` ran (or is running); the library returns
        /// it once store sections end. Stores are refused.
        case recalled
        /// The holder released it; the server has not confirmed yet.
        case releasing
        /// The server confirmed the return or release: every store made before it is in the
        /// volume (and in a snapshot taken after).
        case returned
        /// The holder missed a deadline and was fenced: the blocks were moved away from the
        /// volume before this state was set, so nothing stored from now on reaches any volume
        /// or snapshot; stores made after the recall deadline may be lost.
        case fenced
        /// The feed connection ended before the server confirmed: the lease is void.
        case lost

        public var description: String {
            switch self {
            case .held: "held"
            case .recalled: "recalled"
            case .releasing: "releasing"
            case .returned: "returned"
            case .fenced: "fenced"
            case .lost: "lost"
            }
        }
    }

    /// Guarded by the pool's lock.
    var _state = State.held
    private var activeStores = 0
    var notified = false

    init(pool: DAXPool, id: UInt64, volume: UInt64, first: UInt64, blocks: [UInt64], onRecall: @escaping @Sendable () -> Void) {
        self.pool = pool
        self.id = id
        self.volume = volume
        self.first = first
        self.blocks = blocks
        self.onRecall = onRecall
    }

    public internal(set) var state: State {
        get { pool.cond.withLock { _state } }
        set { pool.cond.withLock { _state = newValue; pool.cond.broadcast() } }
    }

    /// Whether the server fenced this holder (it missed a deadline): stores no longer count.
    public var fenced: Bool { state == .fenced }
    /// Whether the lease was given back (on a recall, or by `release`), confirmed or not.
    public var returned: Bool { [.recalled, .releasing, .returned].contains(state) }

    /// Waits until the lease has ended for good (returned, fenced or lost), at most `timeout`
    /// seconds; the state then.
    public func waitUntilEnded(timeout: Double = 10) -> State {
        pool.cond.withLock {
            let deadline = MonotonicClock.seconds() + timeout
            while ![.returned, .fenced, .lost].contains(_state) && MonotonicClock.seconds() < deadline { _ = pool.cond.wait(seconds: 0.05) }
            return _state
        }
    }

    /// Where virtual block `first + i` lives in pool memory.
    public func pointer(_ i: Int) -> UnsafeMutableRawPointer { pool.base + pool.blockArea + Int(blocks[i]) << 12 }

    /// Runs `body`, which stores through `pointer(_:)`, while the lease is held: throws at once
    /// if it is not; a recall waits for running sections to end before the lease goes back.
    public func withStores<T>(_ body: () throws -> T) throws -> T {
        try pool.cond.withLock { () throws in
            guard _state == .held else { throw DAXError("write lease \(id) is \(_state)") }
            activeStores += 1
        }
        defer {
            pool.cond.withLock {
                activeStores -= 1
                if activeStores == 0 { pool.cond.broadcast() }
            }
        }
        return try body()
    }

    /// Makes the stores durable (msync of the blocks; the pool file is a shared mapping).
    public func flush() {
        for i in blocks.indices {
            let p = pointer(i)
            msync(p, 4096, MS_SYNC)
        }
    }

    /// Calls `onRecall` unless it was called already.
    func notify() {
        let first = pool.cond.withLock { () -> Bool in
            defer { notified = true }
            return !notified
        }
        if first { onRecall() }
    }

    /// Answers a RECALL (on a thread of its own): the holder is told, store sections end, the
    /// blocks are flushed and the lease goes back.
    func recall() {
        let held = pool.cond.withLock { () -> Bool in
            guard _state == .held else { return false }
            _state = .recalled
            pool.cond.broadcast()
            return true
        }
        guard held else {
            // Released or fenced meanwhile: nothing to stop; answering is harmless.
            try? pool.connection.returnLease(id)
            return
        }
        notify()
        pool.cond.withLock { while activeStores > 0 { _ = pool.cond.wait(seconds: 0.05) } }
        flush()
        try? pool.connection.returnLease(id)
    }

    /// Gives the lease back (after flushing the blocks). Call it outside `withStores`.
    public func release() throws {
        let held = pool.cond.withLock { () -> Bool in
            guard _state == .held else { return false }
            _state = .releasing
            notified = true
            pool.cond.broadcast()
            return true
        }
        guard held else { return }
        flush()
        try pool.connection.release(id)
    }
}
