import CLibNBD
import CPmemSupport
import FeedWire
import Glibc
import PmemFeedClient
import PmemSystem

public struct DAXError: Error, CustomStringConvertible {
    public var description: String
    public init(_ d: String) { description = d }
}

/// A local process's direct view of a served pool: it maps the pool (from the descriptor the
/// feed hands over), follows the mapping-change feed, holds read leases on what it reads, and
/// reads blocks straight from pool memory. A read is validated against the feed's sequence
/// number, read before and after the copy from the shared status page: if any mapping changed
/// meanwhile, the read is checked against the events and retried if its block moved. Leased
/// blocks are never reused before this client acknowledges their move, so a copy can be stale
/// but never someone else's data. Ranges it cannot map are read through NBD (libnbd).
public final class DAXPool: @unchecked Sendable {
    let connection: FeedConnection
    let base: UnsafeMutableRawPointer
    let length: Int
    let status: UnsafeMutablePointer<UInt64>
    let blockArea: Int
    public let writable: Bool
    let nbdSocket: String?

    let cond = PosixCondition()
    /// Everything below is guarded by `cond`.
    var processed: UInt64
    var regions: [RegionKey: Region] = [:]
    private var replies: [UInt64: (UInt16, [UInt8])] = [:]
    private var nextRequest: UInt64 = 1
    var volumes: [FeedVolume] = []
    var writeLeases: [UInt64: DAXWriteLease] = [:]
    /// Blocks lent out by `withMappedBlock`, by the sequence number processed when lent (count).
    var borrows: [UInt64: Int] = [:]
    private var acknowledged: UInt64 = 0
    /// Read-lease requests in flight: request id → the region they are for.
    var pendingRegions: [UInt64: RegionKey] = [:]
    private var closed = false
    private var nbd: [String: OpaquePointer] = [:]

    /// Statistics.
    public private(set) var daxReads = 0
    public private(set) var retries = 0
    public private(set) var fallbacks = 0

    /// Read leases last this long and are renewed when less than a third is left.
    public var leaseDuration: Double = 60
    /// Test hooks (package access only).
    package let testHooks = Locked(DAXTestHooks())

    public init(feed: String, nbd: String? = nil, writable: Bool = false, name: String = "pmem-dax") throws {
        connection = try FeedConnection(path: feed, name: name)
        guard let poolFD = connection.poolFD, let statusFD = connection.statusFD else {
            throw DAXError("the feed did not hand over the pool (is it served from a file or DAX device?)")
        }
        let w = connection.welcome!
        if writable && !w.writable { throw DAXError("the server does not allow write leases") }
        self.writable = writable
        length = Int(w.poolSize)
        guard let p = mmap(nil, length, PROT_READ | (writable ? PROT_WRITE : 0), MAP_SHARED, poolFD.rawValue, 0), p != MAP_FAILED else {
            throw DAXError("cannot map the pool: \(Errno.current)")
        }
        base = p
        guard let s = mmap(nil, 4096, PROT_READ, MAP_SHARED, statusFD.rawValue, 0), s != MAP_FAILED else {
            throw DAXError("cannot map the feed status page: \(Errno.current)")
        }
        guard s.load(as: UInt64.self) == FeedProtocol.statusMagic else { throw DAXError("the feed status page is not valid") }
        status = (s + FeedProtocol.statusSequenceOffset).assumingMemoryBound(to: UInt64.self)
        blockArea = Int(w.blockAreaOffset)
        processed = w.sequence
        nbdSocket = nbd
        try connection.subscribe(volume: 0, from: w.sequence + 1)
        OSThread.spawn(name: "pmem-dax-feed") { [self] in receiveLoop() }
        try refreshVolumes()
    }

    deinit {
        munmap(base, length)
        munmap(UnsafeMutableRawPointer(status) - FeedProtocol.statusSequenceOffset, 4096)
        for (_, h) in nbd { nbd_close(h) }
    }

    /// Disconnects from the feed (leases end with it).
    public func close() {
        cond.withLock { closed = true; cond.broadcast() }
        connection.close()
    }

    /// The feed's current sequence number (an acquire load of the shared status page).
    @inline(__always) var publishedSequence: UInt64 { pmem_atomic_load64(status) }

    // MARK: volumes

    public func refreshVolumes() throws {
        let payload = try request { _ in try connection.listVolumes() } match: { $0 == FeedMessage.volumes.rawValue }
        let list = try FeedConnection.decodeVolumes(payload)
        cond.withLock { volumes = list }
    }

    /// A volume or snapshot by export name (`vol`, `vol@snap`).
    public func volume(named name: String) throws -> DAXVolume {
        if let v = cond.withLock({ volumes.first { $0.name == name } }) { return DAXVolume(pool: self, info: v) }
        try refreshVolumes()
        guard let v = cond.withLock({ volumes.first { $0.name == name } }) else { throw DAXError("no volume named '\(name)'") }
        return DAXVolume(pool: self, info: v)
    }

    // MARK: requests

    /// Sends a request and waits for its reply (matched by request id where the reply has one,
    /// else by type).
    func request(region: RegionKey? = nil, _ send: (UInt64) throws -> Void, match: @escaping (UInt16) -> Bool = { _ in true }) throws -> [UInt8] {
        let id = cond.withLock { () -> UInt64 in
            defer { nextRequest += 1 }
            if let region { pendingRegions[nextRequest] = region }
            return nextRequest
        }
        try send(id)
        cond.lock()
        defer { cond.unlock() }
        let deadline = monotonic() + 30
        while true {
            if let r = replies.removeValue(forKey: id) {
                if r.0 == FeedMessage.leaseDenied.rawValue {
                    var reader = FeedReader(r.1)
                    _ = try? reader.u64()
                    throw DAXError("refused: \((try? reader.string()) ?? "?")")
                }
                return r.1
            }
            if let (key, r) = replies.first(where: { $0.key >= 1 << 62 && match($0.value.0) }) {
                replies[key] = nil
                return r.1
            }
            if closed { throw DAXError("the feed connection closed") }
            if monotonic() > deadline { throw DAXError("the feed did not answer") }
            _ = cond.wait(seconds: 1)
        }
    }

    // MARK: the feed

    private func receiveLoop() {
        var unmatched: UInt64 = 1 << 62
        while true {
            guard let (type, payload) = try? connection.receive() else { break }
            switch FeedMessage(rawValue: type) {
            case .events:
                guard let events = try? FeedConnection.decodeEvents(payload), let last = events.last else { continue }
                // Acknowledged once applied (and no borrowed block may have moved): the server
                // may then reuse leased blocks these events moved. Under a stream of events
                // one acknowledgement covers several batches (below), but never more than 4096
                // events wait for one.
                let ack = cond.withLock { () -> UInt64? in
                    for e in events { apply(e) }
                    processed = max(processed, last.sequence)
                    cond.broadcast()
                    return acknowledgeable(minimum: 4096)
                }
                if let ack { try? connection.ack(ack) }
            case .mapReply, .leaseGranted, .leaseDenied, .reverseReply:
                var r = FeedReader(payload)
                let id = (try? r.u64()) ?? 0
                cond.withLock {
                    // A read lease's region goes into the map before the next frame is read:
                    // the events after the grant apply to it.
                    if let key = pendingRegions.removeValue(forKey: id), type == FeedMessage.leaseGranted.rawValue {
                        installRegion(key, grant: payload)
                    }
                    replies[id] = (type, payload)
                    cond.broadcast()
                }
            case .volumes:
                cond.withLock { replies[unmatched] = (type, payload); unmatched += 1; cond.broadcast() }
            case .recall:
                var r = FeedReader(payload)
                let lease = (try? r.u64()) ?? 0
                let handle = cond.withLock { writeLeases[lease] }
                // The holder stops storing and flushes; then the lease goes back.
                handle?.recalled()
                try? connection.returnLease(lease)
                cond.withLock { writeLeases[lease] = nil }
            case .fenced:
                var r = FeedReader(payload)
                let lease = (try? r.u64()) ?? 0
                cond.withLock {
                    writeLeases.removeValue(forKey: lease)?.fenced = true
                    for (k, reg) in regions where reg.lease == lease { regions[k] = nil }
                }
            case .resync:
                // Events were lost: every region is rebuilt from fresh leases; the skipped
                // events are acknowledged (nothing maps through them any more).
                let ack = cond.withLock { () -> UInt64? in
                    for (_, reg) in regions { reg.valid = false }
                    regions.removeAll()
                    var r = FeedReader(payload)
                    processed = max(processed, (try? r.u64()) ?? processed)
                    cond.broadcast()
                    return acknowledgeable()
                }
                if let ack { try? connection.ack(ack) }
            default:
                break
            }
            // Nothing more waiting: acknowledge what has been applied.
            if !connection.hasPendingInput, let ack = cond.withLock({ acknowledgeable() }) { try? connection.ack(ack) }
        }
        cond.withLock { closed = true; cond.broadcast() }
    }

    /// Installs a granted read lease's region (lock held), ending the lease it replaces.
    private func installRegion(_ key: RegionKey, grant payload: [UInt8]) {
        var r = FeedReader(payload)
        guard let _ = try? r.u64(), let lease = try? r.u64(), let _ = try? r.u8(), let _ = try? r.u8(), let _ = try? r.u16(),
              let ms = try? r.u32(), let seq = try? r.u64(), let _ = try? r.u64(), let _ = try? r.u64(),
              let n = try? r.u32(), let _ = try? r.u32() else { return }
        var blocks: [UInt64] = []
        blocks.reserveCapacity(Int(n))
        for _ in 0..<n {
            guard let b = try? r.u64() else { return }
            blocks.append(b)
        }
        if let old = regions[key] {
            old.valid = false
            try? connection.release(old.lease)
        }
        regions[key] = Region(lease: lease, since: seq, expires: monotonic() + Double(ms) / 1000, blocks: blocks)
    }

    /// Applies an event to the local maps (lock held).
    private func apply(_ e: FeedEvent) {
        switch e.kind {
        case .remap:
            for (i, entry) in e.entries.enumerated() {
                let vb = e.first + UInt64(i)
                guard let region = regions[RegionKey(volume: e.volume, index: vb >> 9)], e.sequence > region.since else { continue }
                region.blocks[Int(vb & 511)] = entry.1
                region.changed[Int(vb & 511)] = e.sequence
            }
        case .rollback, .volumeDeleted, .resized, .snapshotDeleted:
            for (k, r) in regions where k.volume == e.volume || (e.kind == .snapshotDeleted && k.volume == e.aux) {
                r.valid = false
                regions[k] = nil
            }
        default:
            break
        }
    }

    /// The sequence number to acknowledge now, if it advanced (lock held): everything
    /// processed, but nothing after the oldest borrow began — a later event may have moved the
    /// borrowed block, which must stay put until the borrower is done.
    func acknowledgeable(minimum: UInt64 = 1) -> UInt64? {
        let limit = min(processed, borrows.keys.min() ?? processed)
        guard limit >= acknowledged + minimum else { return nil }
        acknowledged = limit
        return limit
    }

    /// Ends a borrow that began at `start`, sending an acknowledgement it held back.
    func endBorrow(_ start: UInt64) {
        let ack = cond.withLock { () -> UInt64? in
            if let n = borrows[start], n > 1 { borrows[start] = n - 1 } else { borrows[start] = nil }
            return acknowledgeable()
        }
        if let ack { try? connection.ack(ack) }
    }

    /// Waits until every event up to `sequence` is applied.
    func waitProcessed(_ sequence: UInt64) throws {
        cond.lock()
        defer { cond.unlock() }
        while processed < sequence {
            if closed { throw DAXError("the feed connection closed") }
            _ = cond.wait(seconds: 1)
        }
    }

    // MARK: NBD fallback

    func nbdRead(_ export: String, offset: UInt64, into p: UnsafeMutableRawPointer, count: Int) throws {
        guard let socket = nbdSocket else { throw DAXError("no NBD socket to fall back to") }
        // A connection the server dropped (a rollback or resize disconnects a volume's clients)
        // is replaced once.
        for attempt in 0..<2 {
            let h = try nbdHandle(export, socket: socket)
            if nbd_pread(h, p, count, offset, 0) == 0 {
                cond.withLock { fallbacks += 1 }
                return
            }
            let message = String(cString: nbd_get_error())
            if attempt == 1 || nbd_aio_is_dead(h) == 0 && nbd_aio_is_closed(h) == 0 { throw DAXError("libnbd: \(message)") }
            cond.withLock { nbd[export] = nil }
            nbd_close(h)
        }
    }

    private func nbdHandle(_ export: String, socket: String) throws -> OpaquePointer {
        try cond.withLock { () throws -> OpaquePointer in
            if let h = nbd[export] { return h }
            guard let h = nbd_create() else { throw DAXError("libnbd: \(String(cString: nbd_get_error()))") }
            nbd_set_export_name(h, export)
            guard nbd_connect_unix(h, socket) == 0 else {
                let e = String(cString: nbd_get_error())
                nbd_close(h)
                throw DAXError("libnbd: \(e)")
            }
            nbd[export] = h
            return h
        }
    }

    func countRead(retried: Int) {
        cond.withLock {
            daxReads += 1
            retries += retried
        }
    }
}

/// Callbacks tests install to force interleavings; nil in production.
package struct DAXTestHooks: Sendable {
    /// In `writeLease`, after the grant arrived, before the call returns the handle.
    package var beforeRegisteringWriteLease: (@Sendable () -> Void)?
    package init() {}
}

struct RegionKey: Hashable {
    var volume: UInt64
    var index: UInt64
}

/// 512 consecutive blocks (one map leaf) under a read lease: their physical blocks and the
/// sequence number of each one's last move.
final class Region {
    let lease: UInt64
    /// Events up to this sequence number are already in `blocks`.
    let since: UInt64
    var expires: Double
    var blocks: [UInt64]
    var changed: [UInt64]
    var valid = true

    init(lease: UInt64, since: UInt64, expires: Double, blocks: [UInt64]) {
        self.lease = lease
        self.since = since
        self.expires = expires
        self.blocks = blocks
        changed = Array(repeating: 0, count: blocks.count)
    }
}

func monotonic() -> Double {
    var ts = timespec()
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return Double(ts.tv_sec) + Double(ts.tv_nsec) / 1e9
}
