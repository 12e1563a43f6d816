import NBDServer
import NBDWire
import PmemPool
import PmemSystem
import PmemVolumes

/// A volume (or snapshot) as the NBD server's storage: forwards to `Volume`, translating its
/// segments and extent status, and its `PoolError`s into the NBD errors that answer them.
public final class VolumeExport: BlockVolume, @unchecked Sendable {
    public let volume: Volume

    public init(_ volume: Volume) { self.volume = volume }

    /// The volume's table id (what `Pool.onVolumeChange` names).
    public var volumeID: UInt64 { volume.id }
    public var name: String { volume.name }
    public var size: UInt64 { volume.size }
    public var readOnly: Bool { volume.readOnly }
    public var flushIsCheap: Bool { volume.flushIsCheap }

    @inline(__always)
    public func read(offset: UInt64, length: Int, _ body: (NBDServer.Segment) -> Void) throws(StorageError) {
        do {
            try volume.read(offset: offset, length: length) { s in
                switch s {
                case .data(let p, let n): body(.data(p, n))
                case .hole(let n): body(.hole(n))
                }
            }
        } catch { throw Self.nbdError(error) }
    }

    public func write(offset: UInt64, length: Int, fua: Bool, from source: inout some ByteSource) throws(StorageError) {
        do { try volume.write(offset: offset, length: length, fua: fua, from: &source) } catch { throw Self.nbdError(error) }
    }

    public func writeZeroes(offset: UInt64, length: UInt64, mayTrim: Bool, fast: Bool, fua: Bool) throws(StorageError) {
        do { try volume.writeZeroes(offset: offset, length: length, mayTrim: mayTrim, fast: fast, fua: fua) } catch {
            throw Self.nbdError(error)
        }
    }

    public func trim(offset: UInt64, length: UInt64, fua: Bool) throws(StorageError) {
        do { try volume.trim(offset: offset, length: length, fua: fua) } catch { throw Self.nbdError(error) }
    }

    public func flush() throws(StorageError) {
        do { try volume.flush() } catch { throw Self.nbdError(error) }
    }

    public func cache(offset: UInt64, length: UInt64) throws(StorageError) {
        do { try volume.cache(offset: offset, length: length) } catch { throw Self.nbdError(error) }
    }

    public func makeReadGuard() -> any NBDServer.ReadGuard { volume.makeReadGuard() }

    /// The `pmem-nbd:sharing` context: bit 0 set where a block is shared with a snapshot or a
    /// clone (its next write through this volume will copy).
    public static let sharingContext = "pmem-nbd:sharing"
    /// `qemu:dirty-bitmap:SNAP`: bit 0 set where the volume differs from its snapshot SNAP.
    public static let dirtyBitmapPrefix = "qemu:dirty-bitmap:"

    /// The metadata contexts an export of `volume` offers: `base:allocation`,
    /// `pmem-nbd:sharing`, and for a volume `qemu:dirty-bitmap:SNAP` for each of its snapshots.
    static func metaContexts(for volume: Volume) -> [String] {
        ["base:allocation", sharingContext] + volume.snapshots.map { dirtyBitmapPrefix + $0.name }
    }

    public func status(context: String, offset: UInt64, length: UInt64, _ body: (UInt64, UInt32) -> Bool) throws(StorageError) {
        do throws(PoolError) {
            if context == "base:allocation" {
                return try volume.allocation(offset: offset, length: length) { n, s in body(n, s.rawValue) }
            }
            if context == Self.sharingContext {
                return try volume.sharing(offset: offset, length: length) { n, shared in body(n, shared ? 1 : 0) }
            }
            guard context.hasPrefix(Self.dirtyBitmapPrefix),
                  let snap = volume.snapshots.first(where: { Self.dirtyBitmapPrefix + $0.name == context }) else {
                throw PoolError(.invalid, "unknown meta context \(context)")
            }
            try volume.changes(since: snap, offset: offset, length: length) { n, dirty in body(n, dirty ? 1 : 0) }
        } catch { throw Self.nbdError(error) }
    }

    /// The NBD error that answers a pool error: ENOSPC for no space (the pool is full, or the
    /// range is past the end), EPERM for read-only, ENOTSUP for a FAST_ZERO that would not be
    /// fast, EINVAL for invalid requests, EIO for everything else. A failed payload source
    /// ends the connection.
    static func nbdError(_ error: PoolError) -> StorageError {
        let code: NBDErrno
        switch error.kind {
        case .noSpace: code = .noSpace
        case .readOnly: code = .permission
        case .notSupported: code = .notSupported
        case .invalid, .notFound, .exists: code = .invalid
        case .badPool, .io, .system: code = .io
        case .source: return StorageError(.io, error.message, sourceFailed: true)
        }
        return StorageError(code, error.message)
    }

    /// Transmission flags an export of this volume advertises.
    static func transmissionFlags(for volume: Volume, readOnly: Bool) -> TransmissionFlags {
        var flags: TransmissionFlags = [.hasFlags, .sendFlush, .sendFUA, .sendCache, .canMultiConn]
        if readOnly || volume.readOnly {
            flags.insert(.readOnly)
        } else {
            flags.formUnion([.sendTrim, .sendWriteZeroes, .sendFastZero])
        }
        return flags
    }
}

extension PmemPool.ReadGuard: NBDServer.ReadGuard {}
