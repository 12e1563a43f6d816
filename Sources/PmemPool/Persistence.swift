import Glibc
import PmemSystem

/// How durability is obtained, chosen when the pool is opened (`--persistence`).
public enum PersistenceMode: String, Sendable, CaseIterable {
    /// Cache-line persistence where the mapping is synchronous (MAP_SYNC / device DAX), page otherwise.
    case auto
    /// Flush cache lines and fence. On a mapping without MAP_SYNC this is for testing only: it
    /// runs the cache-line code path but only the page cache sees the stores.
    case cacheline
    /// msync/fdatasync through the page cache.
    case page
}

/// The one place that knows how to make bytes of the pool durable. The engine states what it
/// needs (`flush` + `drain` for ordered cache-line persistence; `writeBack`, `flushDevice`,
/// `syncRange` and `syncAll` as page-cache barriers); each domain implements that as the
/// hardware needs, and the tracing domain records it so tests can enumerate crash states.
public struct Persistence: @unchecked Sendable {
    public enum Domain: String, Sendable {
        /// CLWB/CLFLUSHOPT/CLFLUSH + SFENCE: stores are ordered by fences, cheap.
        case cacheline
        /// msync / fdatasync: durability comes from system calls, batched.
        case page
    }

    /// How the engine puts bytes into the pool in the page domain.
    public enum PageWrites: String, Sendable {
        /// Stores through the mapping (tmpfs and other memory-only files: nothing is written back).
        case mapped
        /// `pwrite` (files on a device). A store through a shared mapping dirties the whole page-cache
        /// folio it falls in (up to 2 MiB with large folios), which writeback then writes whole;
        /// `pwrite` dirties only the 4 KiB blocks it writes, and never reads a block it replaces.
        case pwrite
    }

    /// What a range sync makes durable besides its range.
    public enum RangeSync: String, Sendable {
        /// `msync` of a range writes that range, then flushes the device's cache, which makes
        /// everything already written (`writeBack`) durable too (ext4, XFS, block devices).
        case range
        /// Only a whole-file `fdatasync` is trusted to make written-back data durable (other
        /// file systems): `flushDevice` is an `fdatasync`.
        case wholeFile
    }

    public let domain: Domain
    /// Whether the mapping is synchronous (stores reach media once flushed from the cache).
    public let synchronousMapping: Bool
    public let pageWrites: PageWrites
    public let rangeSync: RangeSync
    let base: UnsafeMutableRawPointer
    let length: Int
    let fd: FileDescriptor?
    /// Set in tests: every flush, fence and sync is recorded instead of (only) performed.
    public let tracer: PersistenceTracer?

    public init(domain: Domain, synchronousMapping: Bool, base: UnsafeMutableRawPointer, length: Int,
                fd: FileDescriptor?, tracer: PersistenceTracer? = nil, pageWrites: PageWrites = .mapped,
                rangeSync: RangeSync = .range) {
        self.domain = domain
        self.synchronousMapping = synchronousMapping
        self.base = base
        self.length = length
        self.fd = fd
        self.tracer = tracer
        self.pageWrites = domain == .page ? pageWrites : .mapped
        self.rangeSync = rangeSync
    }

    /// Whether the engine writes the pool with `pwrite` (page domain, file on a device).
    @inline(__always) public var usesPwrite: Bool { pageWrites == .pwrite }

    /// Starts writing back the cache lines of a range (cache-line domain); no ordering until `drain`.
    @inline(__always)
    public func flush(_ p: UnsafeRawPointer, _ count: Int) {
        guard domain == .cacheline else { return }
        if let tracer { tracer.flush(offset: p - UnsafeRawPointer(base), count: count); return }
        PersistentMemory.flush(p, count: count)
    }

    /// Non-temporal stores were made to a range (or it was filled by the kernel and flushed):
    /// only a fence is needed. Tracing records the range as in flight.
    @inline(__always)
    public func didStoreNonTemporal(_ p: UnsafeRawPointer, _ count: Int) {
        if domain == .cacheline, let tracer { tracer.flush(offset: p - UnsafeRawPointer(base), count: count) }
    }

    /// Orders this thread's earlier flushes and non-temporal stores (SFENCE).
    @inline(__always)
    public func drain() {
        guard domain == .cacheline else { return }
        if let tracer { tracer.fence(); return }
        PersistentMemory.drain()
    }

    /// Copies bytes into the pool with `pwrite` (only when `usesPwrite`; a traced image is
    /// written directly).
    public func pwrite(at offset: Int, _ source: UnsafeRawPointer, _ count: Int) throws(PoolError) {
        precondition(offset >= 0 && offset + count <= length, "pwrite outside the pool")
        if let tracer {
            (tracer.volatile + offset).copyMemory(from: source, byteCount: count)
            return
        }
        guard let fd else {
            (base + offset).copyMemory(from: source, byteCount: count)
            return
        }
        do { try fd.writeAll(at: offset, UnsafeRawBufferPointer(start: source, count: count)) } catch {
            throw PoolError.system(error, "pwrite")
        }
    }

    /// Page domain: writes a range's dirty pages to the device (its volatile cache, not yet
    /// durable). Without `wait` it only starts the writing; with `wait` it returns once they
    /// are written. `flushDevice` (or any range sync) then makes them durable.
    public func writeBack(_ offset: Int, _ count: Int, wait: Bool) throws(PoolError) {
        guard domain == .page, count > 0 else { return }
        if let tracer {
            if wait { tracer.writeBack(offset: offset, count: count) }
            return
        }
        guard let fd, rangeSync == .range else { return }
        do { try fd.writeBack(at: offset, count: count, wait: wait) } catch { throw PoolError.system(error, "sync_file_range") }
    }

    /// Page domain: makes everything written back so far durable (flushes the device's cache).
    public func flushDevice() throws(PoolError) {
        guard domain == .page else { return }
        if let tracer { tracer.deviceFlush(); return }
        guard let fd else { return }
        switch rangeSync {
        case .range:
            // A clean page's msync writes nothing and flushes the device's cache (and commits
            // the file system's metadata for blocks the file allocated, as fdatasync would).
            if msync(base, 4096, MS_SYNC) != 0 { throw PoolError.system(.current, "msync") }
        case .wholeFile:
            do { try fd.dataSync() } catch { throw PoolError.system(error, "fdatasync") }
        }
    }

    /// Makes a byte range durable now (page domain: written, then the device's cache flushed,
    /// which makes whatever was written back before durable too).
    public func syncRange(_ offset: Int, _ count: Int) throws(PoolError) {
        if let tracer {
            if domain == .page {
                tracer.writeBack(offset: offset, count: count)
                tracer.deviceFlush()
            } else {
                tracer.flush(offset: offset, count: count)
                tracer.fence()
            }
            return
        }
        switch domain {
        case .cacheline:
            PersistentMemory.flush(base + offset, count: count)
            PersistentMemory.drain()
        case .page:
            guard let fd else { return }  // an in-memory image (tests)
            if rangeSync == .wholeFile {
                do { try fd.dataSync() } catch { throw PoolError.system(error, "fdatasync") }
                return
            }
            let page = 4096
            let start = offset & ~(page - 1)
            let end = min(length, offset + count)
            guard end > start else { return }
            if msync(base + start, end - start, MS_SYNC) != 0 { throw PoolError.system(.current, "msync") }
        }
    }

    /// Makes every store made so far durable (page cache: fdatasync; cache-line: a fence,
    /// since every writer flushes and fences its own stores).
    public func syncAll() throws(PoolError) {
        if let tracer { tracer.syncAll(); return }
        switch domain {
        case .cacheline:
            PersistentMemory.drain()
        case .page:
            if let fd {
                do { try fd.dataSync() } catch { throw PoolError.system(error, "fdatasync") }
            }
        }
    }

    /// Whether copies into the pool should use non-temporal stores.
    @inline(__always)
    public var prefersNonTemporal: Bool { domain == .cacheline }
}
