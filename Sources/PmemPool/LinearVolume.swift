import CPmemSupport
import Glibc
import PmemSystem

/// Format version 1: the pool's data area is the volume, block for block, with a bitmap of
/// written blocks so that never-written and trimmed ranges read as holes. Writes go in place.
public final class LinearVolume: BlockVolume, @unchecked Sendable {
    public let pool: PoolFile
    public let name: String
    public let size: UInt64
    public let readOnly: Bool
    let dataOffset: UInt64
    let bitmap: UnsafeMutablePointer<UInt64>
    let blocks: UInt64
    static let blockSize: UInt64 = 4096
    static let blockShift: UInt64 = 12

    public init(pool: PoolFile, name: String? = nil, readOnly: Bool = false) {
        self.pool = pool
        self.name = name ?? pool.header.volumeName
        self.size = pool.header.dataSize
        self.readOnly = readOnly || pool.readOnly
        self.dataOffset = pool.header.dataOffset
        self.blocks = pool.header.dataSize >> LinearVolume.blockShift
        self.bitmap = pool.pointer(pool.header.bitmapOffset).bindMemory(to: UInt64.self, capacity: Int((blocks + 63) / 64))
    }

    public var flushIsCheap: Bool { pool.persistence.domain == .cacheline }

    public var summary: String { "pmem-nbd volume \(name), \(size) bytes" }

    /// Zeroing by punching holes is fast on a regular file in page mode.
    public var fastZero: Bool { pool.backing == .file }

    // MARK: bitmap

    @inline(__always) func isWritten(_ block: UInt64) -> Bool {
        (pmem_atomic_load64(bitmap + Int(block >> 6)) >> (block & 63)) & 1 == 1
    }

    /// Sets (or clears) the bits of blocks [first, end) and writes back the changed words.
    func mark(_ first: UInt64, _ end: UInt64, written: Bool) {
        var b = first
        while b < end {
            let word = Int(b >> 6)
            let lo = b & 63
            let hi = min(64, lo + (end - b))
            let mask: UInt64 = hi - lo == 64 ? ~0 : ((1 << (hi - lo)) - 1) << lo
            let p = bitmap + word
            let old = pmem_atomic_load64(p)
            if written ? (old & mask != mask) : (old & mask != 0) {
                if written { _ = pmem_atomic_or64(p, mask) } else { _ = pmem_atomic_and64(p, ~mask) }
                pool.persistence.flush(Int(pool.header.bitmapOffset) + word * 8, 8)
            }
            b += hi - lo
        }
    }

    /// Length of the run of blocks from `block` (up to `limit`) that share its written state.
    func run(from block: UInt64, limit: UInt64) -> (written: Bool, count: UInt64) {
        let state = isWritten(block)
        var b = block + 1
        while b < limit {
            if b & 63 == 0 && limit - b >= 64 {
                let w = pmem_atomic_load64(bitmap + Int(b >> 6))
                if w == (state ? ~0 : 0) { b += 64; continue }
            }
            if isWritten(b) != state { break }
            b += 1
        }
        return (state, b - block)
    }

    // MARK: BlockVolume

    public func read(offset: UInt64, length: Int, _ body: (Segment) -> Void) throws(PoolError) {
        guard offset + UInt64(length) <= size else { throw PoolError(.invalid, "read beyond the end") }
        var pos = offset
        let end = offset + UInt64(length)
        while pos < end {
            let block = pos >> LinearVolume.blockShift
            let r = run(from: block, limit: (end + LinearVolume.blockSize - 1) >> LinearVolume.blockShift)
            let runEnd = min(end, (block + r.count) << LinearVolume.blockShift)
            let n = Int(runEnd - pos)
            if r.written { body(.data(UnsafeRawPointer(pool.pointer(dataOffset + pos)), n)) } else { body(.hole(n)) }
            pos = runEnd
        }
    }

    public func write(offset: UInt64, length: Int, fua: Bool, from source: inout some ByteSource) throws(PoolError) {
        guard !readOnly else { throw PoolError(.readOnly, "volume is read-only") }
        guard offset + UInt64(length) <= size else { throw PoolError(.noSpace, "write beyond the end") }
        guard length > 0 else { return }
        let dst = UnsafeMutableRawBufferPointer(start: pool.pointer(dataOffset + offset), count: length)
        do { try source.fill(dst, nonTemporal: pool.persistence.prefersNonTemporal) } catch { throw PoolError(.source(error), "payload: \(error)") }
        let persistence = pool.persistence
        persistence.flush(Int(dataOffset + offset), length)
        let first = offset >> LinearVolume.blockShift
        let end = (offset + UInt64(length) + LinearVolume.blockSize - 1) >> LinearVolume.blockShift
        mark(first, end, written: true)
        persistence.drain()
        if fua && persistence.domain == .page {
            try persistence.persist(Int(dataOffset + offset), length)
            try persistence.persist(Int(pool.header.bitmapOffset + (first >> 6) * 8), Int(((end - first) >> 6 + 1) * 8))
        }
    }

    public func writeZeroes(offset: UInt64, length: UInt64, mayTrim: Bool, fast: Bool, fua: Bool) throws(PoolError) {
        guard !readOnly else { throw PoolError(.readOnly, "volume is read-only") }
        guard offset + length <= size else { throw PoolError(.noSpace, "write beyond the end") }
        if fast && (!mayTrim || !fastZero) { throw PoolError.notFast }
        guard length > 0 else { return }
        if mayTrim {
            try discard(offset: offset, length: length, zeroEdges: true)
        } else {
            PersistentMemory.zeroNonTemporal(pool.pointer(dataOffset + offset), count: Int(length))
            mark(offset >> LinearVolume.blockShift, (offset + length + LinearVolume.blockSize - 1) >> LinearVolume.blockShift, written: true)
            pool.persistence.drain()
        }
        if fua { try flush() }
    }

    public func trim(offset: UInt64, length: UInt64, fua: Bool) throws(PoolError) {
        guard !readOnly else { throw PoolError(.readOnly, "volume is read-only") }
        guard offset + length <= size else { throw PoolError(.invalid, "trim beyond the end") }
        try discard(offset: offset, length: length, zeroEdges: false)
        if fua { try flush() }
    }

    /// Zeroes whole blocks (punching holes where the backing allows) and marks them unwritten;
    /// with `zeroEdges` also zeroes the partial blocks at either end in place.
    func discard(offset: UInt64, length: UInt64, zeroEdges: Bool) throws(PoolError) {
        let bs = LinearVolume.blockSize
        let first = (offset + bs - 1) / bs
        let last = (offset + length) / bs
        if zeroEdges {
            let headEnd = min(offset + length, first * bs)
            if headEnd > offset { zeroInPlace(offset, headEnd - offset) }
            let tailStart = max(offset, last * bs)
            if offset + length > tailStart && tailStart >= headEnd { zeroInPlace(tailStart, offset + length - tailStart) }
        }
        guard last > first else { pool.persistence.drain(); return }
        // Clear the bits first: a block marked unwritten reads as zeroes whatever it holds.
        mark(first, last, written: false)
        pool.persistence.drain()
        let byteOffset = dataOffset + first * bs
        let byteLength = (last - first) * bs
        if pool.backing == .file && pool.persistence.domain == .page
            && pmem_punch_hole(pool.fd.rawValue, Int64(byteOffset), Int64(byteLength)) == 0 {
            return
        }
        PersistentMemory.zeroNonTemporal(pool.pointer(byteOffset), count: Int(byteLength))
        pool.persistence.drain()
    }

    func zeroInPlace(_ offset: UInt64, _ length: UInt64) {
        let block = offset >> LinearVolume.blockShift
        // An unwritten block already reads as zero.
        if !isWritten(block) { return }
        PersistentMemory.zeroNonTemporal(pool.pointer(dataOffset + offset), count: Int(length))
    }

    public func flush() throws(PoolError) { try pool.persistence.persistAll() }

    public func cache(offset: UInt64, length: UInt64) throws(PoolError) {
        guard offset + length <= size else { throw PoolError(.invalid, "cache beyond the end") }
        pool.region.advise(offset: Int(dataOffset + offset), length: Int(length), MADV_WILLNEED)
    }

    public func allocation(offset: UInt64, length: UInt64, _ body: (UInt64, ExtentStatus) -> Bool) throws(PoolError) {
        guard offset < size, length <= size - offset else { throw PoolError(.invalid, "range beyond the end") }
        var pos = offset
        let end = offset + length
        let limit = (size + LinearVolume.blockSize - 1) >> LinearVolume.blockShift
        while pos < end {
            let block = pos >> LinearVolume.blockShift
            let r = run(from: block, limit: limit)
            let runEnd = min(size, (block + r.count) << LinearVolume.blockShift)
            if !body(runEnd - pos, r.written ? [] : [.hole, .zero]) { return }
            pos = runEnd
        }
    }
}
