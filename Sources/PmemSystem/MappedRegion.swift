import CPmemSupport
import Glibc

/// One `mmap` of a file or device, unmapped when the last reference goes. It owns the
/// only long-lived unsafe pointer to pool memory; everything else borrows from it.
public final class MappedRegion: @unchecked Sendable {
    /// How the mapping was made, which decides how stores are made durable.
    public enum Kind: String, Sendable {
        /// `MAP_SHARED_VALIDATE|MAP_SYNC`: stores are durable once flushed from the CPU cache.
        case synchronous
        /// `MAP_SHARED` over the page cache: durable after `msync`.
        case pageCache
    }

    public let base: UnsafeMutableRawPointer
    public let length: Int
    public let kind: Kind
    public let writable: Bool

    private init(base: UnsafeMutableRawPointer, length: Int, kind: Kind, writable: Bool) {
        self.base = base
        self.length = length
        self.kind = kind
        self.writable = writable
    }

    /// Maps `length` bytes of `fd`. With `preferSynchronous`, tries MAP_SYNC first and falls
    /// back to MAP_SHARED when the kernel answers EOPNOTSUPP or EINVAL (not DAX).
    public static func map(_ fd: FileDescriptor, length: Int, writable: Bool, preferSynchronous: Bool) throws(Errno) -> MappedRegion {
        if preferSynchronous && writable {
            let p = pmem_mmap_sync(fd.rawValue, length, 1)
            if let p, p != MAP_FAILED {
                return MappedRegion(base: p, length: length, kind: .synchronous, writable: writable)
            }
            let e = Errno.current
            if e != .notSupported && e != .invalidArgument { throw e }
        }
        let p = pmem_mmap_shared(fd.rawValue, length, writable ? 1 : 0)
        guard let p, p != MAP_FAILED else { throw Errno.current }
        return MappedRegion(base: p, length: length, kind: .pageCache, writable: writable)
    }

    /// Maps `length` bytes of `fd` (`MAP_SHARED`), writable or read-only, with no MAP_SYNC:
    /// a small shared page such as the feed's status page.
    public static func mapShared(_ fd: FileDescriptor, length: Int, writable: Bool) throws(Errno) -> MappedRegion {
        let p = pmem_mmap_shared(fd.rawValue, length, writable ? 1 : 0)
        guard let p, p != MAP_FAILED else { throw Errno.current }
        return MappedRegion(base: p, length: length, kind: .pageCache, writable: writable)
    }

    deinit { munmap(base, length) }

    /// `madvise(MADV_POPULATE_WRITE)` (Linux 5.14) over memory of a writable shared mapping:
    /// faults the pages in writable, without writing them.
    public static func populateWritable(_ address: UnsafeMutableRawPointer, count: Int) throws(Errno) {
        _ = try retryOnInterrupt { pmem_populate_write(address, count) }
    }

    /// Whether the kernel would map this descriptor with MAP_SYNC (the file is on DAX):
    /// maps and unmaps one page without writing.
    public static func supportsSynchronous(_ fd: FileDescriptor) -> Bool {
        let page = Int(sysconf(Int32(_SC_PAGESIZE)))
        guard let p = pmem_mmap_sync(fd.rawValue, page, 0), p != MAP_FAILED else { return false }
        munmap(p, page)
        return true
    }

    /// `msync(MS_SYNC)` over a byte range (rounded out to pages).
    public func sync(offset: Int = 0, length: Int? = nil) throws(Errno) {
        let page = Int(sysconf(Int32(_SC_PAGESIZE)))
        let start = offset & ~(page - 1)
        let end = min(self.length, offset + (length ?? (self.length - offset)))
        guard end > start else { return }
        _ = try retryOnInterrupt { msync(base + start, end - start, MS_SYNC) }
    }
}
