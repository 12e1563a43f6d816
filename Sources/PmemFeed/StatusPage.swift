import FeedWire
import Glibc
import PmemSystem

/// A 4 KiB shared-memory page (a memfd handed to each subscriber) holding the global event
/// sequence number. The server raises it before it changes any mapping, so a DAX reader that
/// reads it before and after copying a block knows whether anything moved meanwhile.
final class StatusPage: @unchecked Sendable {
    let fd: FileDescriptor
    private let region: MappedRegion
    private let base: UnsafeMutableRawPointer
    let instance: UInt64

    init() throws(Errno) {
        let fd = try FileDescriptor.anonymousFile(name: "pmem-nbd-feed-status")
        do {
            try fd.truncate(to: 4096)
            region = try MappedRegion.mapShared(fd, length: 4096, writable: true)
        } catch {
            fd.close()
            throw error
        }
        self.fd = fd
        base = region.base
        var rng = SystemRandomNumberGenerator()
        instance = UInt64.random(in: 1...UInt64.max, using: &rng)
        base.storeBytes(of: FeedProtocol.statusMagic, toByteOffset: 0, as: UInt64.self)
        base.storeBytes(of: instance, toByteOffset: FeedProtocol.statusInstanceOffset, as: UInt64.self)
    }

    deinit { fd.close() }

    /// Publishes the sequence number of the newest event (a release store).
    @inline(__always) func publish(_ sequence: UInt64) {
        SharedWord.store((base + FeedProtocol.statusSequenceOffset).assumingMemoryBound(to: UInt64.self), sequence)
    }
}
