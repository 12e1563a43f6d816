import CPmemSupport
import FeedWire
import Glibc
import PmemSystem

/// A 4 KiB shared-memory page (a memfd handed to each subscriber) holding the global event
/// sequence number. The server raises it before it changes any mapping, so a DAX reader that
/// reads it before and after copying a block knows whether anything moved meanwhile.
final class StatusPage: @unchecked Sendable {
    let fd: FileDescriptor
    private let base: UnsafeMutableRawPointer
    let instance: UInt64

    init() throws(Errno) {
        let raw = pmem_memfd("pmem-nbd-feed-status")
        guard raw >= 0 else { throw Errno.current }
        fd = FileDescriptor(rawValue: raw)
        try fd.truncate(to: 4096)
        guard let p = mmap(nil, 4096, PROT_READ | PROT_WRITE, MAP_SHARED, raw, 0), p != MAP_FAILED else { throw Errno.current }
        base = p
        var rng = SystemRandomNumberGenerator()
        instance = UInt64.random(in: 1...UInt64.max, using: &rng)
        base.storeBytes(of: FeedProtocol.statusMagic, toByteOffset: 0, as: UInt64.self)
        base.storeBytes(of: instance, toByteOffset: FeedProtocol.statusInstanceOffset, as: UInt64.self)
    }

    deinit {
        munmap(base, 4096)
        fd.close()
    }

    /// Publishes the sequence number of the newest event (a release store).
    @inline(__always) func publish(_ sequence: UInt64) {
        pmem_atomic_store64((base + FeedProtocol.statusSequenceOffset).assumingMemoryBound(to: UInt64.self), sequence)
    }
}
