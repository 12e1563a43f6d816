import CLibNBD
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
///
/// Thread-safe: any number of threads may read, lend blocks, take write leases and list
/// volumes at once over the one feed connection (replies are matched by request id).
/// Docs/FEED.md states what it guarantees (G1–G9).
public final class DAXPool: @unchecked Sendable {
    package let connection: FeedConnection
    /// The pool's mapping and the status page's (each unmapped when the pool goes).
    private let poolRegion: MappedRegion
    private let statusRegion: MappedRegion
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
    private var replies: [UInt64: Reply] = [:]
    private var nextRequest: UInt64 = 1
    /// Requests in flight: what their reply is for. The feed thread acts on a grant before it
    /// reads the next frame (a read lease's region goes into the map, a write lease is
    /// registered), so the events and recalls that follow it always find it.
    private var pending: [UInt64: Pending] = [:]
    /// Requests whose caller gave up waiting: a lease granted to one is given back.
    private var abandoned: Set<UInt64> = []
    var volumes: [FeedVolume] = []
    /// A volume or snapshot was created or deleted since `volumes` was fetched.
    private var volumesStale = false
    /// Every id a volume list named: ids are never reused, so one missing from a later list
    /// was deleted.
    private var known: Set<UInt64> = []
    /// Ids of deleted volumes and snapshots (from events, and from lists after a resync).
    var gone: Set<UInt64> = []
    /// RESYNCs seen, and how many of them a volume list fetched afterwards has covered (events
    /// lost in a resync may have been deletions).
    private var resyncs = 0
    private var verifiedResyncs = 0
    var writeLeases: [UInt64: DAXWriteLease] = [:]
    /// Blocks lent out by `withMappedBlock`, by the sequence number processed when lent (count).
    var borrows: [UInt64: Int] = [:]
    private var acknowledged: UInt64 = 0
    private var closed = false
    /// Set once the server fenced this connection: it grants no more leases on it.
    public private(set) var isFenced = false
    private var nbd: [String: OpaquePointer] = [:]
    /// libnbd handles replaced after their connection dropped; another thread may still be in
    /// a call on one, so they are closed only when the pool goes.
    private var retiredNBD: [OpaquePointer] = []

    /// Statistics (read under the pool's lock: other threads update them).
    public var daxReads: Int { cond.withLock { reads } }
    public var retries: Int { cond.withLock { retried } }
    public var fallbacks: Int { cond.withLock { nbdReads } }
    private var reads = 0, retried = 0, nbdReads = 0

    /// Read leases last this long and are renewed when less than a third is left.
    public var leaseDuration: Double = 60
    /// Seconds a request waits for its reply before failing (a lease granted later is given
    /// back at once).
    public var requestTimeout: Double {
        get { cond.withLock { timeout } }
        set { cond.withLock { timeout = newValue } }
    }
    private var timeout: Double = 30
    /// Test hooks (package access only).
    package let testHooks = Locked(DAXTestHooks())

    enum Pending {
        case plain
        case region(RegionKey)
        case write(volume: UInt64, first: UInt64, onRecall: @Sendable () -> Void)
    }

    struct Reply {
        var type: UInt16
        var payload: [UInt8]
        var lease: DAXWriteLease?
    }

    public init(feed: String, nbd: String? = nil, writable: Bool = false, name: String = "pmem-dax") throws {
        connection = try FeedConnection(path: feed, name: name)
        guard let poolFD = connection.poolFD, let statusFD = connection.statusFD else {
            throw DAXError("the feed did not hand over the pool (is it served from a file or DAX device?)")
        }
        let w = connection.welcome!
        if writable && !w.writable { throw DAXError("the server does not allow write leases") }
        self.writable = writable
        length = Int(w.poolSize)
        do { poolRegion = try MappedRegion.mapShared(poolFD, length: length, writable: writable) } catch {
            throw DAXError("cannot map the pool: \(error)")
        }
        base = poolRegion.base
        do { statusRegion = try MappedRegion.mapShared(statusFD, length: 4096, writable: false) } catch {
            throw DAXError("cannot map the feed status page: \(error)")
        }
        let s = statusRegion.base
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
        for (_, h) in nbd { nbd_close(h) }
        for h in retiredNBD { nbd_close(h) }
    }

    /// Disconnects from the feed. Write leases still held are given back first: each holder's
    /// `onRecall` runs, running store sections end, the blocks are flushed and the lease
    /// returned (waiting up to two seconds for the server to confirm); read leases end with
    /// the connection.
    public func close() {
        let held = cond.withLock { writeLeases.values.filter { $0._state == .held } }
        for lease in held { lease.recall() }
        cond.withLock {
            let deadline = MonotonicClock.seconds() + 2
            while !writeLeases.isEmpty && !closed && MonotonicClock.seconds() < deadline { _ = cond.wait(seconds: 0.1) }
            closed = true
            cond.broadcast()
        }
        connection.close()
    }

    /// The feed's current sequence number (an acquire load of the shared status page).
    @inline(__always) var publishedSequence: UInt64 { SharedWord.load(status) }

    // MARK: volumes

    /// Fetches the list of volumes and snapshots.
    public func refreshVolumes() throws {
        let resyncsBefore = cond.withLock { resyncs }
        let reply = try request { id in try connection.listVolumes(id) }
        let list = try FeedConnection.decodeVolumeList(reply.payload).volumes
        cond.withLock {
            let ids = Set(list.map(\.id))
            gone.formUnion(known.subtracting(ids))
            known.formUnion(ids)
            volumes = list.filter { !gone.contains($0.id) }
            volumesStale = false
            verifiedResyncs = max(verifiedResyncs, resyncsBefore)
        }
    }

    /// The volume or snapshot that has this export name (`vol`, `vol@snap`) now: every event
    /// published before the call is taken into account, so a name deleted and created again
    /// gives the new one. The handle reads that record, by its id, for its whole life.
    public func volume(named name: String) throws -> DAXVolume {
        try waitProcessed(publishedSequence)
        let cached = cond.withLock { () -> FeedVolume? in
            volumesStale ? nil : volumes.first { $0.name == name && !gone.contains($0.id) }
        }
        if let cached { return DAXVolume(pool: self, info: cached) }
        try refreshVolumes()
        guard let v = cond.withLock({ volumes.first { $0.name == name && !gone.contains($0.id) } }) else {
            throw DAXError("no volume named '\(name)'")
        }
        return DAXVolume(pool: self, info: v)
    }

    /// Throws unless the volume or snapshot `id` is known to exist as of the events processed
    /// so far (after a resync, the volume list is fetched again to find out).
    func checkAlive(_ id: UInt64, _ name: String) throws {
        if cond.withLock({ resyncs != verifiedResyncs }) { try refreshVolumes() }
        if cond.withLock({ gone.contains(id) }) { throw DAXError("\(name) (id \(id)) was deleted") }
    }

    // MARK: requests

    /// Sends a request and waits for the reply with its id (a DENIED becomes an error).
    func request(_ kind: Pending = .plain, _ send: (UInt64) throws -> Void) throws -> Reply {
        let id = cond.withLock { () -> UInt64 in
            defer { nextRequest += 1 }
            pending[nextRequest] = kind
            return nextRequest
        }
        do { try send(id) } catch {
            cond.withLock { _ = pending.removeValue(forKey: id) }
            throw error
        }
        cond.lock()
        defer { cond.unlock() }
        let deadline = MonotonicClock.seconds() + timeout
        while true {
            if let r = replies.removeValue(forKey: id) {
                if r.type == FeedMessage.leaseDenied.rawValue {
                    var reader = FeedReader(r.payload)
                    _ = try? reader.u64()
                    throw DAXError("refused: \((try? reader.string()) ?? "?")")
                }
                return r
            }
            if closed {
                pending[id] = nil
                throw DAXError("the feed connection closed")
            }
            let left = deadline - MonotonicClock.seconds()
            if left <= 0 {
                // The reply may still come: the feed thread drops it then (and gives a
                // granted write lease back).
                abandoned.insert(id)
                throw DAXError("the feed did not answer within \(Int(timeout)) s")
            }
            _ = cond.wait(seconds: min(1, left))
        }
    }

    // MARK: the feed

    private func receiveLoop() {
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
            case .mapReply, .leaseGranted, .leaseDenied, .reverseReply, .volumes:
                var r = FeedReader(payload)
                let id = (try? r.u64()) ?? 0
                let giveBack = cond.withLock { () -> UInt64? in
                    guard let kind = pending.removeValue(forKey: id) else { return nil }
                    let gaveUp = abandoned.remove(id) != nil
                    var reply = Reply(type: type, payload: payload, lease: nil)
                    var giveBack: UInt64?
                    if type == FeedMessage.leaseGranted.rawValue, let grant = Grant(payload) {
                        switch kind {
                        case .region(let key):
                            // Into the map before the next frame is read: the events after
                            // the grant apply to it. (Kept even if the caller gave up: it is
                            // renewed or released like any region.)
                            installRegion(key, grant)
                        case .write(let volume, let first, let onRecall):
                            let lease = DAXWriteLease(pool: self, id: grant.lease, volume: volume, first: first, blocks: grant.blocks,
                                                      onRecall: onRecall)
                            if gaveUp {
                                lease._state = .releasing
                                lease.notified = true
                                giveBack = grant.lease
                            }
                            // Registered before the next frame: a RECALL right behind the
                            // grant reaches the holder.
                            writeLeases[grant.lease] = lease
                            reply.lease = lease
                        case .plain:
                            break
                        }
                    }
                    if !gaveUp { replies[id] = reply }
                    cond.broadcast()
                    return giveBack
                }
                if let giveBack { try? connection.release(giveBack) }
            case .recall:
                var r = FeedReader(payload)
                let id = (try? r.u64()) ?? 0
                if let lease = cond.withLock({ writeLeases[id] }) {
                    // On its own thread: `onRecall` may block, or use this pool (which needs
                    // this thread to read replies).
                    OSThread.spawn(name: "pmem-dax-recall") { lease.recall() }
                } else {
                    // Given back already (a RELEASE crossed the RECALL): answering is harmless.
                    try? connection.returnLease(id)
                }
            case .released:
                var r = FeedReader(payload)
                let id = (try? r.u64()) ?? 0
                cond.withLock {
                    if let lease = writeLeases.removeValue(forKey: id) { lease._state = .returned }
                    cond.broadcast()
                }
            case .fenced:
                var r = FeedReader(payload)
                let id = (try? r.u64()) ?? 0
                let lease = cond.withLock { () -> DAXWriteLease? in
                    // Lease 0: the connection itself was fenced (sent whatever leases it still
                    // held): nothing it maps is protected any more, reads go through NBD.
                    isFenced = true
                    for (k, reg) in regions where id == 0 || reg.lease == id {
                        reg.valid = false
                        regions[k] = nil
                    }
                    let lease = writeLeases.removeValue(forKey: id)
                    lease?._state = .fenced
                    cond.broadcast()
                    return lease
                }
                // The holder is told (if a recall has not told it already).
                if let lease { OSThread.spawn(name: "pmem-dax-fenced") { lease.notify() } }
            case .resync:
                // Events were lost: every region is rebuilt from fresh leases; the skipped
                // events are acknowledged (nothing maps through them any more). They may have
                // deleted volumes: the next use of a handle fetches the list again.
                let ack = cond.withLock { () -> UInt64? in
                    for (_, reg) in regions { reg.valid = false }
                    regions.removeAll()
                    resyncs += 1
                    volumesStale = true
                    var r = FeedReader(payload)
                    processed = max(processed, (try? r.u64()) ?? processed)
                    cond.broadcast()
                    return acknowledgeable()
                }
                if let ack { try? connection.ack(ack) }
            default:
                break
            }
            // Nothing more waiting on the socket: everything that arrived has been applied.
            if !connection.hasPendingInput, let ack = cond.withLock({ acknowledgeable() }) { try? connection.ack(ack) }
        }
        // The connection is gone, and with it every lease: holders are told.
        let lost = cond.withLock { () -> [DAXWriteLease] in
            closed = true
            let lost = Array(writeLeases.values)
            for lease in lost { lease._state = .lost }
            writeLeases.removeAll()
            cond.broadcast()
            return lost
        }
        for lease in lost { lease.notify() }
    }

    /// A GRANTED frame's fields.
    struct Grant {
        var lease: UInt64
        var durationMs: UInt32
        var sequence: UInt64
        var blocks: [UInt64]

        init?(_ payload: [UInt8]) {
            var r = FeedReader(payload)
            guard let _ = try? r.u64(), let lease = try? r.u64(), let _ = try? r.u8(), let _ = try? r.u8(), let _ = try? r.u16(),
                  let ms = try? r.u32(), let seq = try? r.u64(), let _ = try? r.u64(), let _ = try? r.u64(),
                  let n = try? r.u32(), let _ = try? r.u32(), Int(n) <= r.remaining / 8 else { return nil }
            var blocks: [UInt64] = []
            blocks.reserveCapacity(Int(n))
            for _ in 0..<n {
                guard let b = try? r.u64() else { return nil }
                blocks.append(b)
            }
            self.lease = lease
            durationMs = ms
            sequence = seq
            self.blocks = blocks
        }
    }

    /// Installs a granted read lease's region (lock held), ending the lease it replaces.
    private func installRegion(_ key: RegionKey, _ grant: Grant) {
        if let old = regions[key] {
            old.valid = false
            try? connection.release(old.lease)
        }
        regions[key] = Region(lease: grant.lease, since: grant.sequence, expires: MonotonicClock.seconds() + Double(grant.durationMs) / 1000,
                              blocks: grant.blocks)
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
            // The map replaced or gone: the volume's, or for a snapshot deletion the snapshot's.
            let doomed = e.kind == .snapshotDeleted ? e.aux : e.volume
            for (k, r) in regions where k.volume == doomed {
                r.valid = false
                regions[k] = nil
            }
            if e.kind == .volumeDeleted || e.kind == .snapshotDeleted {
                gone.insert(doomed)
                volumesStale = true
            }
        case .volumeCreated, .snapshotCreated:
            volumesStale = true
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
                cond.withLock { nbdReads += 1 }
                return
            }
            let message = String(cString: nbd_get_error())
            if attempt == 1 || nbd_aio_is_dead(h) == 0 && nbd_aio_is_closed(h) == 0 { throw DAXError("libnbd: \(message)") }
            cond.withLock {
                if nbd[export] == h {
                    nbd[export] = nil
                    retiredNBD.append(h)
                }
            }
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
            reads += 1
            self.retried += retried
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
