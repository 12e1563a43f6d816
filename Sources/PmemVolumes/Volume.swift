import Glibc
import PmemPool
import PmemSystem

/// Zeroes as a payload (WRITE_ZEROES with NO_HOLE, and partial blocks of a zeroed range).
struct ZeroSource: ByteSource {
    mutating func fill(_ destination: UnsafeMutableRawBufferPointer, nonTemporal: Bool) throws(Errno) {
        guard let p = destination.baseAddress, destination.count > 0 else { return }
        if nonTemporal { PersistentMemory.zeroNonTemporal(p, count: destination.count) } else { memset(p, 0, destination.count) }
    }
}

/// A volume or snapshot of a pool (format 3) as a block device. Writes go out of place: each
/// 4 KiB block is written into a free block, made durable, and only then does the map point
/// at it (in the journal's running batch) — so after a crash a block holds its old or its new
/// contents, never a mix. Sub-block writes copy the old block first (read-modify-write).
public final class Volume: @unchecked Sendable {
    /// The pool this volume belongs to (kept alive by the volume; `Pool.close` drops its cache).
    let pool: Pool
    /// The pool's engine, used on every I/O: no reference counting there (the pool holds it).
    unowned(unsafe) let engine: PoolEngine
    public let slot: Int
    public let id: UInt64
    public let name: String
    public let kind: VolumeRecord.Kind
    public let size: UInt64
    public let depth: Int
    public let readOnly: Bool
    let rootOffset: UInt64
    /// Held while this volume's map changes. Shared by every `Volume` of the same table slot:
    /// an object the pool no longer caches (after a rollback or resize) may still be in use.
    let mapLock: PosixMutex

    /// The volume a snapshot belongs to (0 for volumes).
    public let parent: UInt64

    init(pool: Pool, record: VolumeRecord) {
        self.pool = pool
        self.engine = pool.engine
        parent = record.parent
        slot = record.slot
        id = record.id
        name = record.name
        kind = record.kind
        size = record.size
        depth = record.depth
        readOnly = engine.readOnly || record.kind != .volume
        rootOffset = VolumeRecord.offset(slot: record.slot) + VolumeRecord.rootField
        mapLock = pool.mapLock(slot: record.slot)
    }

    public var summary: String {
        kind == .snapshot ? "snapshot \(name) (read-only), \(size) bytes" : "volume \(name), \(size) bytes"
    }

    public var fastZero: Bool { true }
    public var flushIsCheap: Bool { engine.persistence.domain == .cacheline }
    public func makeReadGuard() -> ReadGuard { engine.makeReadGuard() }

    static let bs: UInt64 = 4096

    // MARK: read

    public func read(offset: UInt64, length: Int, _ body: (Segment) -> Void) throws(PoolError) {
        guard offset <= size, UInt64(length) <= size - offset else { throw PoolError(.invalid, "read beyond the end") }
        let base = UnsafeRawPointer(engine.media.base)
        var pos = offset
        let end = offset + UInt64(length)
        var dataStart: UnsafeRawPointer?
        var dataLength = 0
        var holeLength = 0
        func emitData() { if let d = dataStart { body(.data(d, dataLength)); dataStart = nil; dataLength = 0 } }
        func emitHole() { if holeLength > 0 { body(.hole(holeLength)); holeLength = 0 } }
        while pos < end {
            let vb = pos >> 12
            let (leaf, span) = try engine.leaf(rootOffset: rootOffset, depth: depth, vblock: vb)
            if leaf == 0 {
                let next = min(end, (vb + span) << 12)
                emitData()
                holeLength += Int(next - pos)
                pos = next
                continue
            }
            let leafEnd = min(end, ((vb | 511) + 1) << 12)
            while pos < leafEnd {
                let v = pos >> 12
                let inBlock = Int(pos & 4095)
                let n = Int(min(leafEnd, (v + 1) << 12) - pos)
                let p = try engine.entry(node: leaf, index: Int(v & 511), level: 0)
                if p == 0 {
                    emitData()
                    holeLength += n
                } else {
                    if engine.hasBadBlocks && engine.isBad(p) {
                        throw PoolError(.io, "block \(v) of \(name) is on damaged media (physical block \(p)); rewriting it moves it")
                    }
                    emitHole()
                    let ptr = base + Int(engine.layout.blockOffset(p)) + inBlock
                    if let d = dataStart, d + dataLength == ptr {
                        dataLength += n
                    } else {
                        emitData()
                        dataStart = ptr
                        dataLength = n
                    }
                }
                pos += UInt64(n)
            }
        }
        emitData()
        emitHole()
    }

    // MARK: write

    public func write(offset: UInt64, length: Int, fua: Bool, from source: inout some ByteSource) throws(PoolError) {
        try write(offset: offset, length: length, fua: fua, from: &source, reason: .write)
    }

    func write(offset: UInt64, length: Int, fua: Bool, from source: inout some ByteSource, reason: MappingChangeReason) throws(PoolError) {
        guard !readOnly else { throw PoolError(.readOnly, "\(name) is read-only") }
        guard offset <= size, UInt64(length) <= size - offset else { throw PoolError(.noSpace, "write beyond the end") }
        guard length > 0 else { return }
        let engine = self.engine
        let first = offset >> 12
        let count = Int(((offset + UInt64(length) - 1) >> 12) - first + 1)
        let leaves = Int(((offset + UInt64(length) - 1) >> 21) - (offset >> 21) + 1)
        try withUnsafeTemporaryAllocation(of: UInt64.self, capacity: count) { (blocks) throws(PoolError) in
            let observer = pool.observer
            // The move is announced before any block is reserved (the lease model's FIX 3): it
            // may recall a write lease and fence a holder that misses the deadline, and the
            // fence moves the holder's blocks away — which needs free blocks, in a nearly full
            // pool perhaps the very ones this write would be holding meanwhile (a deadlock).
            // A relocation (copy-on-write for a write lease, a fence) is the observer's own
            // move: it holds the range alone already.
            let announce = reason != .fence && reason != .copyOnWrite
            if announce { observer?.beginMove(volume: id, first: first, count: UInt64(count)) }
            defer { if announce { observer?.endMove(volume: id, first: first, count: UInt64(count)) } }
            // Every block the write needs, data and map nodes, is reserved before anything is
            // touched: a full pool answers ENOSPC and changes nothing.
            _ = try engine.reserveBlocks(blocks)
            // In ascending order, blocks freed together (or never used) come out contiguous:
            // whole runs are then filled at once and read back as one segment.
            // (`blocks` is a buffer pointer: the copy sorts the reserved blocks themselves.)
            if count > 1 { var reserved = blocks; reserved.sort() }
            var published = 0
            defer { if published < count { engine.unreserve(UnsafeBufferPointer(rebasing: blocks[published...])) } }
            var spares = try NodeSpares(engine, count: leaves * depth + 1)
            let end = offset + UInt64(length)
            // The whole payload first, into the reserved blocks, before any lock is taken: the
            // source may be a client's socket that delivers slowly, and nothing other
            // connections wait for may wait on it. (The feed's move of the range is announced
            // already: only a write lease asked for over this very range waits meanwhile.)
            try fill(offset, end, &source, UnsafeBufferPointer(blocks))
            var pos = offset
            while pos < end {
                // One metadata group per leaf: bounded size, at most `depth` new map nodes.
                let chunkEnd = min(end, (((pos >> 12) | 511) + 1) << 12)
                let n = Int(((chunkEnd - 1) >> 12) - (pos >> 12) + 1)
                // Partial blocks completed, then the map pointed at the blocks (PmemPool/MapUpdates.swift).
                try engine.publish(rootOffset: rootOffset, depth: depth, mapLock: mapLock, stripeSalt: id, start: pos, end: chunkEnd,
                                   blocks: UnsafeMutableBufferPointer(rebasing: blocks[published..<(published + n)]), spares: &spares,
                                   announce: observer != nil) { first, old, new in
                    observer?.willRemap(volume: id, first: first, old: old, new: new, reason: reason)
                }
                published += n
                pos = chunkEnd
            }
        }
        if fua { try engine.sync() }
    }

    /// Fills the reserved `blocks` with the payload of [start, end): each byte where it belongs
    /// in its block (the rest of a partial block is filled when it is published).
    private func fill(_ start: UInt64, _ end: UInt64, _ source: inout some ByteSource, _ blocks: UnsafeBufferPointer<UInt64>) throws(PoolError) {
        // One strong reference for the whole payload: every call through `self.engine` would
        // otherwise retain and release the engine, whose count every connection shares.
        let engine = self.engine
        let first = start >> 12
        let count = blocks.count
        let base = engine.media.base
        let persistence = engine.persistence
        let nt = persistence.prefersNonTemporal
        // Page mode on a file on a device: blocks are assembled in a buffer and written with
        // pwrite (see Persistence.PageWrites), at most `scratchBlocks` at a time.
        let pw = persistence.usesPwrite
        if !pw && count > 1 {
            try fillScattered(start, end, &source, blocks, base: base, nonTemporal: nt)
            return
        }
        let scratch = pw ? engine.takeScratch() : nil
        defer { if let scratch { engine.returnScratch(scratch) } }
        var i = 0
        while i < count {
            let vb = first + UInt64(i)
            let blockStart = vb << 12
            let a = max(start, blockStart), b = min(end, blockStart + 4096)
            let dst = scratch ?? base + Int(engine.layout.blockOffset(blocks[i]))
            var run = 1
            if b - a == 4096 {
                // Whole blocks that follow each other in the pool are filled by one call, so a
                // large payload can go from the socket straight into them.
                while i + run < count && blocks[i + run] == blocks[i] + UInt64(run) && (vb + UInt64(run) + 1) << 12 <= end
                    && (!pw || run < PoolEngine.scratchBlocks) { run += 1 }
            }
            let n = run == 1 ? Int(b - a) : run << 12
            do throws(Errno) {
                try source.fill(UnsafeMutableRawBufferPointer(start: dst + Int(a - blockStart), count: n), nonTemporal: nt)
            } catch {
                throw PoolError(.source(error), "payload: \(error)")
            }
            if pw {
                // A partial block gets only the payload's bytes now (the rest when published).
                try persistence.pwrite(at: Int(engine.layout.blockOffset(blocks[i]) + (a - blockStart)), dst + Int(a - blockStart), n)
            } else if b - a == 4096 {
                persistence.didStoreNonTemporal(dst, run << 12)
            }
            i += run
        }
    }

    /// `fill` for memory-mapped media: one vector per run of blocks that follow each other in
    /// the pool (and one per partial block), filled by one `fill(scatter:)` — for a socket, one
    /// `readv(2)` straight into the blocks however scattered the free space is.
    private func fillScattered(_ start: UInt64, _ end: UInt64, _ source: inout some ByteSource, _ blocks: UnsafeBufferPointer<UInt64>,
                               base: UnsafeMutableRawPointer, nonTemporal: Bool) throws(PoolError) {
        let engine = self.engine
        let first = start >> 12
        let count = blocks.count
        try withUnsafeTemporaryAllocation(of: iovec.self, capacity: 2 * count) { (vectors) throws(PoolError) in
            var nv = 0
            var i = 0
            while i < count {
                let vb = first + UInt64(i)
                let blockStart = vb << 12
                let a = max(start, blockStart), b = min(end, blockStart + 4096)
                var run = 1
                if b - a == 4096 {
                    while i + run < count && blocks[i + run] == blocks[i] + UInt64(run) && (vb + UInt64(run) + 1) << 12 <= end { run += 1 }
                }
                let n = run == 1 ? Int(b - a) : run << 12
                let dst = base + Int(engine.layout.blockOffset(blocks[i])) + Int(a - blockStart)
                vectors[nv] = iovec(iov_base: dst, iov_len: n)
                nv += 1
                i += run
            }
            // The fill advances the vectors: the second half keeps them as they were.
            for k in 0..<nv { vectors[count + k] = vectors[k] }
            do throws(Errno) {
                try source.fill(scatter: UnsafeMutableBufferPointer(rebasing: vectors[0..<nv]), nonTemporal: nonTemporal)
            } catch {
                throw PoolError(.source(error), "payload: \(error)")
            }
            let persistence = engine.persistence
            for k in 0..<nv {
                let v = vectors[count + k]
                // Whole blocks only (a partial block is completed, and stored, when published).
                if v.iov_len & 4095 == 0 && Int(bitPattern: v.iov_base) & 4095 == 0 {
                    persistence.didStoreNonTemporal(v.iov_base!, v.iov_len)
                }
            }
        }
    }

    // MARK: trim and zero

    public func trim(offset: UInt64, length: UInt64, fua: Bool) throws(PoolError) {
        guard !readOnly else { throw PoolError(.readOnly, "\(name) is read-only") }
        guard offset <= size, length <= size - offset else { throw PoolError(.invalid, "trim beyond the end") }
        try unmap(first: (offset + 4095) >> 12, end: (offset + length) >> 12, reason: .trim)
        if fua { try engine.sync() }
    }

    public func writeZeroes(offset: UInt64, length: UInt64, mayTrim: Bool, fast: Bool, fua: Bool) throws(PoolError) {
        guard !readOnly else { throw PoolError(.readOnly, "\(name) is read-only") }
        guard offset <= size, length <= size - offset else { throw PoolError(.noSpace, "write beyond the end") }
        if fast && !mayTrim { throw PoolError.notFast }
        guard length > 0 else { return }
        var zeroes = ZeroSource()
        if !mayTrim {
            // Provisioned zeroes: real blocks of zeroes, written like data.
            var pos = offset
            while pos < offset + length {
                let n = min(offset + length - pos, 32 << 20)
                try write(offset: pos, length: Int(n), fua: false, from: &zeroes, reason: .zero)
                pos += n
            }
        } else {
            let first = (offset + 4095) >> 12, end = (offset + length) >> 12
            if first > end {
                // Inside one block.
                try zeroPart(offset, offset + length, &zeroes)
            } else {
                if offset & 4095 != 0 { try zeroPart(offset, first << 12, &zeroes) }
                if (offset + length) & 4095 != 0 { try zeroPart(end << 12, offset + length, &zeroes) }
                try unmap(first: first, end: end, reason: .zero)
            }
        }
        if fua { try engine.sync() }
    }

    /// Zeroes part of one block: nothing to do for a hole, else a read-modify-write.
    private func zeroPart(_ a: UInt64, _ b: UInt64, _ zeroes: inout ZeroSource) throws(PoolError) {
        guard b > a, try engine.lookup(rootOffset: rootOffset, depth: depth, vblock: a >> 12) != 0 else { return }
        try write(offset: a, length: Int(b - a), fua: false, from: &zeroes, reason: .zero)
    }

    /// Unmaps whole blocks [first, end): one metadata group per leaf; a leaf covered whole is
    /// dropped from its parent (one reference less, however shared it is).
    func unmap(first: UInt64, end: UInt64, reason: MappingChangeReason = .trim) throws(PoolError) {
        let observer = pool.observer
        if end > first { observer?.beginMove(volume: id, first: first, count: end - first) }
        defer { if end > first { observer?.endMove(volume: id, first: first, count: end - first) } }
        try engine.unmap(rootOffset: rootOffset, depth: depth, mapLock: mapLock, first: first, end: end,
                         announce: observer != nil) { first, old, new in
            observer?.willRemap(volume: id, first: first, old: old, new: new, reason: reason)
        }
    }

    // MARK: the rest

    public func flush() throws(PoolError) { try engine.sync() }

    public func cache(offset: UInt64, length: UInt64) throws(PoolError) {
        guard offset <= size, length <= size - offset else { throw PoolError(.invalid, "cache beyond the end") }
    }

    public func allocation(offset: UInt64, length: UInt64, _ body: (UInt64, ExtentStatus) -> Bool) throws(PoolError) {
        guard offset < size, length <= size - offset else { throw PoolError(.invalid, "range beyond the end") }
        var skip = offset & 4095
        try engine.allocationRuns(rootOffset: rootOffset, depth: depth, first: offset >> 12,
                                  end: (offset + length + 4095) >> 12) { blocks, mapped in
            let bytes = (blocks << 12) - skip
            skip = 0
            return body(bytes, mapped ? [] : [.hole, .zero])
        }
    }
}
