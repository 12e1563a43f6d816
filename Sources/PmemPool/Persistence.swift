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
/// needs (`flush` + `drain` for ordered cache-line persistence, `syncRange`/`syncAll` as
/// barriers); each domain implements that as the hardware needs, and the tracing domain
/// records it so tests can enumerate crash states.
public struct Persistence: @unchecked Sendable {
    public enum Domain: String, Sendable {
        /// CLWB/CLFLUSHOPT/CLFLUSH + SFENCE: stores are ordered by fences, cheap.
        case cacheline
        /// msync / fdatasync: durability comes from system calls, batched.
        case page
    }

    public let domain: Domain
    /// Whether the mapping is synchronous (stores reach media once flushed from the cache).
    public let synchronousMapping: Bool
    let base: UnsafeMutableRawPointer
    let length: Int
    let fd: FileDescriptor?
    /// Set in tests: every flush, fence and sync is recorded instead of (only) performed.
    public let tracer: PersistenceTracer?

    public init(domain: Domain, synchronousMapping: Bool, base: UnsafeMutableRawPointer, length: Int,
                fd: FileDescriptor?, tracer: PersistenceTracer? = nil) {
        self.domain = domain
        self.synchronousMapping = synchronousMapping
        self.base = base
        self.length = length
        self.fd = fd
        self.tracer = tracer
    }

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

    /// Makes a byte range durable now.
    public func syncRange(_ offset: Int, _ count: Int) throws(PoolError) {
        if let tracer {
            tracer.flush(offset: offset, count: count)
            tracer.fence()
            return
        }
        switch domain {
        case .cacheline:
            PersistentMemory.flush(base + offset, count: count)
            PersistentMemory.drain()
        case .page:
            guard fd != nil else { return }  // an in-memory image (tests)
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
