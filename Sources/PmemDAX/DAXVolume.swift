import FeedWire
import Glibc
import PmemFeedClient
import PmemSystem

/// How a read was served.
public enum DAXReadPath: Sendable { case direct, nbd }

/// A volume or snapshot read (and, with a write lease, written) straight from pool memory.
public final class DAXVolume: @unchecked Sendable {
    let pool: DAXPool
    public let info: FeedVolume

    init(pool: DAXPool, info: FeedVolume) {
        self.pool = pool
        self.info = info
    }

    public var size: UInt64 { info.size }

    /// The region covering `vblock`, leased and mapped, renewing a lease that runs short.
    func region(_ index: UInt64) throws -> Region? {
        let key = RegionKey(volume: info.id, index: index)
        let now = monotonic()
        let current = pool.cond.withLock { () -> Region? in
            guard let r = pool.regions[key], r.valid, r.expires - now > pool.leaseDuration / 3 else { return nil }
            return r
        }
        if let current { return current }
        let first = index << 9
        let count = UInt32(min(512, (info.size >> 12) - first))
        do {
            // The reader thread installs the region as the grant arrives (see DAXPool).
            _ = try pool.request(region: key) { id in
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
    /// blocks are leased and mapped, else through NBD.
    @discardableResult
    public func read(offset: UInt64, count: Int, into destination: UnsafeMutableRawPointer) throws -> DAXReadPath {
        guard offset <= info.size, UInt64(count) <= info.size - offset else { throw DAXError("read beyond the end of \(info.name)") }
        var pos = offset
        var out = destination
        var path = DAXReadPath.direct
        while pos < offset + UInt64(count) {
            let index = pos >> 21
            let end = min(offset + UInt64(count), (index + 1) << 21)
            let n = Int(end - pos)
            if try !readDirect(region: index, offset: pos, count: n, into: out) {
                try pool.nbdRead(info.name, offset: pos, into: out, count: n)
                path = .nbd
            }
            pos = end
            out += n
        }
        return path
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
    /// older than the volume's current contents, but they stay the block's own: the client holds
    /// back its acknowledgement of any event after the borrow began, and the server reuses a
    /// leased block only after that acknowledgement. Holes read as zeros.
    public func withMappedBlock<T>(_ block: UInt64, _ body: (UnsafeRawBufferPointer) throws -> T) throws -> T? {
        guard block < info.size >> 12 else { throw DAXError("block \(block) is beyond the end of \(info.name)") }
        for _ in 0..<100 {
            guard let region = try region(block >> 9) else { return nil }
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
    /// lease is recalled — before a snapshot, or before anything else moves them. `onRecall`
    /// must stop the stores (and `flush`) quickly: a holder that misses the deadline is fenced.
    public func writeLease(first: UInt64, count: UInt32, duration: Double = 60, onRecall: @escaping @Sendable () -> Void) throws -> DAXWriteLease {
        guard pool.writable else { throw DAXError("open the pool with writable: true for write leases") }
        let payload = try pool.request { id in
            try pool.connection.requestLease(id, mode: .write, volume: info.id, first: first, count: count, durationMs: UInt32(duration * 1000))
        }
        var r = FeedReader(payload)
        _ = try r.u64()
        let lease = try r.u64()
        _ = try r.u8(); _ = try r.u8(); _ = try r.u16(); _ = try r.u32(); _ = try r.u64(); _ = try r.u64(); _ = try r.u64()
        let n = Int(try r.u32())
        _ = try r.u32()
        var blocks: [UInt64] = []
        for _ in 0..<n { blocks.append(try r.u64()) }
        pool.testHooks.withLock { $0.beforeRegisteringWriteLease }?()
        let handle = DAXWriteLease(pool: pool, id: lease, first: first, blocks: blocks, onRecall: onRecall)
        pool.cond.withLock { pool.writeLeases[lease] = handle }
        return handle
    }
}

/// Blocks a client may store into directly, until recalled.
public final class DAXWriteLease: @unchecked Sendable {
    unowned let pool: DAXPool
    public let id: UInt64
    public let first: UInt64
    public let blocks: [UInt64]
    let onRecall: @Sendable () -> Void
    /// Set when the server fenced this holder (it missed a recall deadline): stores no longer count.
    public internal(set) var fenced = false
    public private(set) var returned = false

    init(pool: DAXPool, id: UInt64, first: UInt64, blocks: [UInt64], onRecall: @escaping @Sendable () -> Void) {
        self.pool = pool
        self.id = id
        self.first = first
        self.blocks = blocks
        self.onRecall = onRecall
    }

    /// Where virtual block `first + i` lives in pool memory.
    public func pointer(_ i: Int) -> UnsafeMutableRawPointer { pool.base + pool.blockArea + Int(blocks[i]) << 12 }

    /// Makes the stores durable (msync of the blocks; the pool file is a shared mapping).
    public func flush() {
        for i in blocks.indices {
            let p = pointer(i)
            msync(p, 4096, MS_SYNC)
        }
    }

    func recalled() {
        onRecall()
        flush()
        returned = true
    }

    /// Gives the lease back.
    public func release() throws {
        flush()
        returned = true
        try pool.connection.release(id)
        pool.cond.withLock { pool.writeLeases[id] = nil }
    }
}
