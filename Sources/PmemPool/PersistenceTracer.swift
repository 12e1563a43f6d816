import Glibc
import PmemSystem

/// A model of persistent memory for crash testing (like PMDK's pmreorder).
///
/// The engine works on the *volatile* image (ordinary memory). `durable` holds what has surely
/// reached media. A flush snapshots the flushed cache lines; a fence makes those snapshots
/// durable. At any moment, every 8-byte word whose volatile value differs from its durable
/// value may or may not have reached media (write-back, eviction, flushed-but-unfenced): a
/// crash state is the durable image plus any subset of those words. Hardware guarantees no
/// more than 8-byte atomicity, and the model assumes no more.
///
/// The page domain is modelled the same way: the kernel may write back any dirty page (here:
/// any word) at any moment, in any order. `writeBack` (sync_file_range) snapshots a range as
/// written to the device, which is not durable: the device's volatile cache may still lose
/// it, or keep it; `deviceFlush` (the flush an msync or fdatasync ends with) makes every
/// written snapshot durable. A range sync is a write-back of the range and a device flush;
/// `syncAll` (fdatasync) makes everything durable.
///
/// At each fence, device flush and sync the tracer calls `crashPoint` (before making anything
/// durable), so a test can freeze crash states there.
public final class PersistenceTracer: @unchecked Sendable {
    public let length: Int
    /// The image the engine reads and writes.
    public let volatile: UnsafeMutableRawPointer
    /// What is known to be on media.
    public let durable: UnsafeMutableRawPointer
    typealias Line = (UInt64, UInt64, UInt64, UInt64, UInt64, UInt64, UInt64, UInt64)
    /// Flushed-but-unfenced lines per thread (a fence orders only its own thread's flushes):
    /// thread → line offset → contents at flush time.
    private var pending: [Int32: [Int: Line]] = [:]
    /// Lines written to the device (page domain) but not yet flushed from its cache.
    private var written: [Int: Line] = [:]
    private let lock = PosixMutex()
    /// Incremental hash of the durable image (XOR of a hash per word), for counting distinct states.
    public private(set) var durableHash: UInt64 = 0
    /// Called at every fence/sync with the tracer itself; nil when not collecting.
    public var crashPoint: ((PersistenceTracer, String) -> Void)?
    /// Number of fences and syncs seen.
    public private(set) var fences = 0
    /// A label for the operation in progress (shown with crash points).
    public var phase = ""
    /// Bytes written to media so far: cache lines made durable by fences (64 bytes each), and
    /// whole 4 KiB pages made durable by syncs (page-cache writeback works in pages).
    public private(set) var durableBytes = 0

    /// Wraps an image: `initial` bytes are both volatile and durable.
    public init(image: UnsafeRawBufferPointer) {
        length = image.count
        volatile = .allocate(byteCount: length, alignment: 4096)
        durable = .allocate(byteCount: length, alignment: 4096)
        volatile.copyMemory(from: image.baseAddress!, byteCount: length)
        durable.copyMemory(from: image.baseAddress!, byteCount: length)
        durableHash = PersistenceTracer.hashImage(durable, length)
    }

    deinit {
        volatile.deallocate()
        durable.deallocate()
    }

    @inline(__always)
    public static func wordHash(_ offset: Int, _ value: UInt64) -> UInt64 {
        var z = UInt64(truncatingIfNeeded: offset) &* 0x9E37_79B9_7F4A_7C15 ^ value
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }

    static func hashImage(_ p: UnsafeRawPointer, _ n: Int) -> UInt64 {
        var h: UInt64 = 0
        var off = 0
        while off < n {
            let v = p.load(fromByteOffset: off, as: UInt64.self)
            if v != 0 { h ^= wordHash(off, v) }
            off += 8
        }
        return h
    }

    private func snapshot(_ line: Int) -> Line {
        let p = volatile + line
        return (p.load(fromByteOffset: 0, as: UInt64.self), p.load(fromByteOffset: 8, as: UInt64.self),
                p.load(fromByteOffset: 16, as: UInt64.self), p.load(fromByteOffset: 24, as: UInt64.self),
                p.load(fromByteOffset: 32, as: UInt64.self), p.load(fromByteOffset: 40, as: UInt64.self),
                p.load(fromByteOffset: 48, as: UInt64.self), p.load(fromByteOffset: 56, as: UInt64.self))
    }

    func flush(offset: Int, count: Int) {
        guard count > 0 else { return }
        let thread = OSThread.currentID
        lock.withLock {
            var line = offset & ~63
            while line < offset + count && line < length {
                pending[thread, default: [:]][line] = snapshot(line)
                line += 64
            }
        }
    }

    /// Page domain: the range's pages are written to the device as they are now (whole pages,
    /// as writeback works), not yet durable.
    func writeBack(offset: Int, count: Int) {
        guard count > 0 else { return }
        lock.withLock {
            var line = offset & ~4095
            let end = min(length, (offset + count + 4095) & ~4095)
            while line < end {
                if memcmp(volatile + line, durable + line, 64) != 0 || written[line] != nil { written[line] = snapshot(line) }
                line += 64
            }
        }
    }

    /// Page domain: the device's cache is flushed: everything written back is durable.
    func deviceFlush() {
        crashPoint?(self, "device flush")
        lock.withLock {
            fences += 1
            var pages = Set<Int>()
            for (line, words) in written {
                pages.insert(line >> 12)
                withUnsafeBytes(of: words) { w in
                    for i in 0..<8 { makeDurable(line + 8 * i, w.load(fromByteOffset: 8 * i, as: UInt64.self)) }
                }
            }
            durableBytes += 4096 * pages.count
            written.removeAll(keepingCapacity: true)
        }
    }

    private func makeDurable(_ offset: Int, _ value: UInt64) {
        let old = durable.load(fromByteOffset: offset, as: UInt64.self)
        guard old != value else { return }
        if old != 0 { durableHash ^= PersistenceTracer.wordHash(offset, old) }
        if value != 0 { durableHash ^= PersistenceTracer.wordHash(offset, value) }
        durable.storeBytes(of: value, toByteOffset: offset, as: UInt64.self)
    }

    func fence() {
        crashPoint?(self, "fence")
        let thread = OSThread.currentID
        lock.withLock {
            fences += 1
            guard let mine = pending.removeValue(forKey: thread) else { return }
            durableBytes += 64 * mine.count
            for (line, words) in mine {
                withUnsafeBytes(of: words) { w in
                    for i in 0..<8 { makeDurable(line + 8 * i, w.load(fromByteOffset: 8 * i, as: UInt64.self)) }
                }
            }
        }
    }

    func syncAll() {
        crashPoint?(self, "sync")
        lock.withLock {
            fences += 1
            pending.removeAll(keepingCapacity: true)
            written.removeAll(keepingCapacity: true)
            var off = 0
            var lastPage = -1
            while off < length {
                if memcmp(volatile + off, durable + off, 64) != 0 {
                    for w in stride(from: off, to: off + 64, by: 8) {
                        let v = volatile.load(fromByteOffset: w, as: UInt64.self)
                        if v != durable.load(fromByteOffset: w, as: UInt64.self) { makeDurable(w, v) }
                    }
                    if off >> 12 != lastPage {
                        lastPage = off >> 12
                        durableBytes += 4096
                    }
                }
                off += 64
            }
        }
    }

    /// Words whose value on media is uncertain at this instant: (offset, possible values besides
    /// the durable one). Flushed-but-unfenced lines offer their flush-time value too.
    public func uncertainWords() -> [(offset: Int, values: [UInt64])] {
        lock.withLock {
            // Flush-time snapshots by line, from every thread.
            var snapshots: [Int: [Line]] = [:]
            for lines in pending.values { for (line, words) in lines { snapshots[line, default: []].append(words) } }
            for (line, words) in written { snapshots[line, default: []].append(words) }
            var out: [(Int, [UInt64])] = []
            var off = 0
            while off < length {
                let snaps = snapshots[off]
                if snaps != nil || memcmp(volatile + off, durable + off, 64) != 0 {
                    for i in 0..<8 {
                        let o = off + 8 * i
                        let d = durable.load(fromByteOffset: o, as: UInt64.self)
                        let v = volatile.load(fromByteOffset: o, as: UInt64.self)
                        var values: [UInt64] = []
                        if v != d { values.append(v) }
                        for snap in snaps ?? [] {
                            let s = withUnsafeBytes(of: snap) { $0.load(fromByteOffset: 8 * i, as: UInt64.self) }
                            if s != d && !values.contains(s) { values.append(s) }
                        }
                        if !values.isEmpty { out.append((o, values)) }
                    }
                }
                off += 64
            }
            return out
        }
    }

    /// Builds a crash image: the durable image with the chosen words applied. Returns its hash.
    public func crashImage(choosing chosen: [(offset: Int, value: UInt64)], into dst: UnsafeMutableRawPointer) -> UInt64 {
        dst.copyMemory(from: durable, byteCount: length)
        var h = durableHash
        for (o, v) in chosen {
            let d = durable.load(fromByteOffset: o, as: UInt64.self)
            if d != 0 { h ^= PersistenceTracer.wordHash(o, d) }
            if v != 0 { h ^= PersistenceTracer.wordHash(o, v) }
            dst.storeBytes(of: v, toByteOffset: o, as: UInt64.self)
        }
        return h
    }
}

