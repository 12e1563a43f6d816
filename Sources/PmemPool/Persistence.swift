import Glibc
import PmemSystem

/// How durability is obtained, chosen when the pool is opened (`--persistence`).
public enum PersistenceMode: String, Sendable, CaseIterable {
    /// Cache-line persistence where the mapping is synchronous (MAP_SYNC / device DAX), page otherwise.
    case auto
    /// Flush cache lines and fence. On a mapping without MAP_SYNC this is for testing only: it
    /// exercises the cache-line code path but only the page cache sees the stores.
    case cacheline
    /// msync/fdatasync through the page cache.
    case page
}

/// The one place that knows how to make bytes of the pool durable.
public struct Persistence: Sendable {
    public enum Domain: String, Sendable {
        /// CLWB/CLFLUSHOPT/CLFLUSH + SFENCE.
        case cacheline
        /// msync / fdatasync.
        case page
    }

    public let domain: Domain
    /// Whether the mapping is synchronous (stores reach media once flushed from the cache).
    public let synchronousMapping: Bool
    let region: MappedRegion
    let fd: FileDescriptor

    /// Stores to a range were made (ordinary stores); begin writing them back (cache-line) —
    /// no ordering until `drain`.
    @inline(__always)
    public func flush(_ offset: Int, _ length: Int) {
        if domain == .cacheline { PersistentMemory.flush(region.base + offset, count: length) }
    }

    /// Orders this thread's flushes and non-temporal stores (cache-line domain).
    @inline(__always)
    public func drain() {
        if domain == .cacheline { PersistentMemory.drain() }
    }

    /// Makes a range durable now (FUA of one write).
    public func persist(_ offset: Int, _ length: Int) throws(PoolError) {
        switch domain {
        case .cacheline:
            PersistentMemory.flush(region.base + offset, count: length)
            PersistentMemory.drain()
        case .page:
            do { try region.sync(offset: offset, length: length) } catch { throw PoolError.system(error, "msync") }
        }
    }

    /// Makes everything written to the pool so far durable (FLUSH).
    public func persistAll() throws(PoolError) {
        switch domain {
        case .cacheline:
            PersistentMemory.drain()
        case .page:
            do { try fd.dataSync() } catch { throw PoolError.system(error, "fdatasync") }
        }
    }

    /// Whether copies into the pool should use non-temporal stores.
    public var prefersNonTemporal: Bool { domain == .cacheline }
}
