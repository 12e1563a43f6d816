import Glibc
import PmemSystem

// The map tree's nodes and the refcounts under them: a node's refcount reaching zero releases
// its children; a shared node is copied before it changes (its children gain a reference).

extension PoolEngine {
    // MARK: refcounts

    @inline(__always) package func refcount(_ b: UInt64) -> UInt32 { allocator.refcount(b) }

    /// Adds `delta` to a block's refcount (gate held). At zero the block is freed; a freed map
    /// node releases its children. `level` is the node level (0 = leaf node), or -1 for data.
    func adjustRefcount(_ b: UInt64, _ delta: Int32, level: Int) {
        let off = layout.refcountWordOffset(b)
        let change = journal.withPage(off) { page in PoolEngine.changeRefcount(page, off, b, delta) }
        switch change {
        case .damaged:
            Log.error("the refcount of block \(b) fails its check: the block stays in use; run 'pmem-nbd check --repair'")
        case .allocated:
            allocator.allocated.add(1, ordering: .relaxed)
        case .freed:
            allocator.allocated.subtract(1, ordering: .relaxed)
            if level >= 0 {
                for i in 0..<512 {
                    let child = entryOrHole(node: b, index: i, level: level)
                    if child != 0 { adjustRefcount(child, -1, level: level - 1) }
                }
            }
            allocator.freed(b, batch: journal.runningBatch.load(ordering: .relaxed), node: level >= 0)
        case .counted:
            break
        }
    }

    enum RefcountChange { case counted, allocated, freed, damaged }

    /// Adds `delta` to block `b`'s slot in the refcount word at `off` (its page locked).
    @inline(__always)
    static func changeRefcount(_ page: Journal.PageWords, _ off: UInt64, _ b: UInt64, _ delta: Int32) -> RefcountChange {
        let w = page.get(off)
        let cur = RefcountSlot.decode(b, slot: RefcountSlot.slot(b, in: w))
        if cur == RefcountSlot.damaged { return .damaged }
        var next = Int64(cur) + Int64(delta)
        if next < 0 {
            Log.error("refcount underflow on block \(b): the pool is inconsistent; run 'pmem-nbd check'")
            next = 0
        }
        let count = UInt32(min(next, Int64(RefcountSlot.maxCount)))
        page.set(off, RefcountSlot.word(w, b, slot: RefcountSlot.encode(b, count: count)))
        if cur == 0 && count > 0 { return .allocated }
        if cur > 0 && count == 0 { return .freed }
        return .counted
    }

    /// Adds `delta` to the refcounts of data blocks, sorted ascending (zeroes, holes, are
    /// skipped): one lock per refcount page, one allocator call for all the blocks freed.
    func adjustDataRefcounts(_ blocks: UnsafeBufferPointer<UInt64>, _ delta: Int32) {
        var allocated: Int64 = 0
        withUnsafeTemporaryAllocation(of: UInt64.self, capacity: blocks.count) { freed in
            var nfreed = 0
            var i = 0
            while i < blocks.count {
                if blocks[i] == 0 { i += 1; continue }
                let page = layout.refcountWordOffset(blocks[i]) & ~4095
                journal.withPage(page) { words in
                    while i < blocks.count && layout.refcountWordOffset(blocks[i]) & ~4095 == page {
                        let b = blocks[i]
                        switch PoolEngine.changeRefcount(words, layout.refcountWordOffset(b), b, delta) {
                        case .damaged:
                            Log.error("the refcount of block \(b) fails its check: the block stays in use; run 'pmem-nbd check --repair'")
                        case .allocated: allocated += 1
                        case .freed:
                            allocated -= 1
                            freed[nfreed] = b
                            nfreed += 1
                        case .counted: break
                        }
                        i += 1
                    }
                }
            }
            if allocated != 0 { allocator.allocated.add(allocated, ordering: .relaxed) }
            if nfreed > 0 {
                allocator.freed(UnsafeBufferPointer(rebasing: freed[0..<nfreed]), batch: journal.runningBatch.load(ordering: .relaxed))
            }
        }
    }

    /// A new zeroed map node with refcount 1, from the caller's spares (gate held; never waits).
    func newNode(_ spares: inout NodeSpares) throws(PoolError) -> UInt64 {
        let b = try spares.take()
        let p = media.base + Int(layout.blockOffset(b))
        if persistence.usesPwrite {
            try withUnsafeTemporaryAllocation(byteCount: 4096, alignment: 4096) { (page) throws(PoolError) in
                memset(page.baseAddress!, 0, 4096)
                try persistence.pwrite(at: Int(layout.blockOffset(b)), page.baseAddress!, 4096)
            }
        } else {
            PersistentMemory.zeroNonTemporal(p, count: 4096)
            persistence.didStoreNonTemporal(p, 4096)
        }
        noteWritten(b, count: 1, node: true)
        adjustRefcount(b, 1, level: 0)
        return b
    }

    /// A private copy of a shared node: entries copied (as currently visible), children gain a
    /// reference, the original loses one (gate held).
    func copyNode(_ old: UInt64, level: Int, _ spares: inout NodeSpares) throws(PoolError) -> UInt64 {
        let b = try spares.take()
        copyCounters.addShared(CopyCounter.mapNodes)
        let src = layout.blockOffset(old)
        let mapped = media.base + Int(layout.blockOffset(b))
        try withUnsafeTemporaryAllocation(byteCount: persistence.usesPwrite ? 4096 : 0, alignment: 4096) { (scratch) throws(PoolError) in
            let dst = persistence.usesPwrite ? scratch.baseAddress! : mapped
            for i in 0..<512 {
                let e = journal.load(src + UInt64(8 * i))
                dst.storeBytes(of: e, toByteOffset: 8 * i, as: UInt64.self)
                let child = decodedOrHole(e, node: old, index: i, level: level)
                if child != 0 { adjustRefcount(child, 1, level: level - 1) }
            }
            if persistence.usesPwrite {
                try persistence.pwrite(at: Int(layout.blockOffset(b)), dst, 4096)
            } else {
                persistence.flush(dst, 4096)
            }
        }
        noteWritten(b, count: 1, node: true)
        adjustRefcount(b, 1, level: level)
        adjustRefcount(old, -1, level: level)
        return b
    }
}

/// Slots of `PoolEngine.copyCounters`.
public enum CopyCounter {
    /// Map nodes shared with a snapshot or clone, copied before a change.
    public static let mapNodes = 0
    /// Old blocks copied into new ones under a write of part of a block.
    public static let partialBlocks = 1
}

/// Blocks an operation reserved, before entering the gate, for the map nodes it may create or
/// copy; what it does not use goes back to the allocator.
package struct NodeSpares: ~Copyable {
    unowned(unsafe) let allocator: Allocator
    /// Up to 16 blocks in place (no allocation for ordinary writes), more on the heap.
    private var inline: (UInt64, UInt64, UInt64, UInt64, UInt64, UInt64, UInt64, UInt64,
                         UInt64, UInt64, UInt64, UInt64, UInt64, UInt64, UInt64, UInt64) = (0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0)
    private var heap: UnsafeMutablePointer<UInt64>?
    private var count: Int

    /// Reserves `count` blocks (waiting for commits if needed; throws ENOSPC).
    package init(_ engine: PoolEngine, count: Int) throws(PoolError) {
        allocator = engine.allocator
        self.count = 0
        heap = count > 16 ? .allocate(capacity: count) : nil
        let got = try withBlocks(capacity: count) { (p) throws(PoolError) in
            try engine.reserveBlocks(UnsafeMutableBufferPointer(start: p, count: count))
        }
        // On failure reserveBlocks gave back what it had reserved and `count` is still 0, so
        // the deinit gives back nothing (giving them back twice would hand them out twice).
        self.count = got
    }

    private mutating func withBlocks<T>(capacity: Int, _ body: (UnsafeMutablePointer<UInt64>) throws(PoolError) -> T) throws(PoolError) -> T {
        if let heap { return try body(heap) }
        return try withUnsafeMutableBytes(of: &inline) { (raw) throws(PoolError) in try body(raw.baseAddress!.assumingMemoryBound(to: UInt64.self)) }
    }

    mutating func take() throws(PoolError) -> UInt64 {
        guard count > 0 else { throw PoolError(.noSpace, "the pool is full (no block for a map node)") }
        count -= 1
        let n = count
        return try withBlocks(capacity: n) { p in p[n] }
    }

    deinit {
        if count > 0 {
            if let heap {
                allocator.unreserve(UnsafeBufferPointer(start: heap, count: count))
            } else {
                let n = count
                withUnsafeBytes(of: inline) { raw in
                    allocator.unreserve(UnsafeBufferPointer(start: raw.baseAddress!.assumingMemoryBound(to: UInt64.self), count: n))
                }
            }
        }
        heap?.deallocate()
    }
}
