import FeedWire
import Glibc
import PmemPool
import PmemSystem
import PmemVolumes

/// The heart of the mapping-change feed. As the volumes' `MappingObserver` it numbers every
/// change, publishes the number in the status page *before* the map changes, keeps the recent
/// events in a ring for subscribers (and for resuming after a reconnect), pins blocks that a
/// read-lease holder may still be reading, and recalls write leases before anything moves
/// their blocks — fencing a holder that misses the deadline.
public final class FeedHub: MappingObserver, @unchecked Sendable {
    let pool: Pool
    let engine: PoolEngine
    let status: StatusPage
    /// Seconds a write-lease holder has to return a recalled lease.
    public let recallDeadline: Double
    /// Seconds a read-lease holder may leave an event that pinned a block unacknowledged.
    public let ackDeadline: Double
    /// Guards everything below; its condition wakes session writers and recall waiters.
    let cond = PosixCondition()
    private(set) var sequence: UInt64 = 0
    private var ring: [FeedEvent?]
    private var ringStart: UInt64 = 1
    var sessions: [UInt64: FeedSession] = [:]
    private var nextSessionID: UInt64 = 1
    var leases: [UInt64: Lease] = [:]
    /// The read leases of `leases`, by map leaf.
    private var readLeases = ReadLeaseIndex()
    /// Wakes the reaper early (to stop); it is not woken by every event.
    private let reaperWake = PosixCondition()
    private var nextLeaseID: UInt64 = 1
    private var writeLeaseCount = 0
    private var moves: [UInt64: (volume: UInt64, first: UInt64, count: UInt64)] = [:]
    /// The moves of `moves` that are relocations in progress — the copy-on-write before a
    /// write lease, or moving a fenced lease's blocks away. A relocation reads its range and
    /// writes it back elsewhere, so it holds the range alone: it begins when no other move of
    /// the range is under way (for a fence: none has changed anything yet, they all wait for
    /// the lease), and no move of the range begins until it ends — else a write acknowledged
    /// between its read and its write-back would be undone, or a snapshot would share blocks
    /// a fenced holder still stores into.
    private var relocations: Set<UInt64> = []
    private var nextMoveID: UInt64 = 1
    private var stopping = false

    /// Events kept for subscribers that fall behind or reconnect.
    public let ringCapacity: Int
    /// Test hooks (package access only).
    package let testHooks = Locked(FeedTestHooks())

    public init(pool: Pool, recallDeadline: Double = 2, ackDeadline: Double = 10, ringCapacity: Int = 65_536) throws {
        self.pool = pool
        self.engine = pool.engine
        self.recallDeadline = recallDeadline
        self.ackDeadline = ackDeadline
        self.ringCapacity = ringCapacity
        status = try StatusPage()
        ring = Array(repeating: nil, count: ringCapacity)
        OSThread.spawn(name: "pmem-feed-reap") { [self] in reaper() }
    }

    /// Stops the reaper and wakes every waiter.
    public func stop() {
        cond.withLock {
            stopping = true
            cond.broadcast()
        }
        reaperWake.withLock { reaperWake.broadcast() }
    }

    var now: Double { MonotonicClock.seconds() }

    // MARK: events

    /// Appends an event (lock held): numbers it, publishes the number, keeps it in the ring.
    @discardableResult
    private func append(_ make: (UInt64) -> FeedEvent) -> UInt64 {
        sequence += 1
        status.publish(sequence)
        let slot = Int(sequence % UInt64(ringCapacity))
        ring[slot] = make(sequence)
        if sequence - ringStart >= UInt64(ringCapacity) { ringStart = sequence - UInt64(ringCapacity) + 1 }
        cond.broadcast()
        return sequence
    }

    /// Events from `from` on (lock held); nil when they have left the ring (resync needed).
    func events(from: UInt64, max: Int) -> [FeedEvent]? {
        if from < ringStart { return nil }
        var out: [FeedEvent] = []
        var s = from
        while s <= sequence && out.count < max {
            if let e = ring[Int(s % UInt64(ringCapacity))] { out.append(e) }
            s += 1
        }
        return out
    }

    var oldestRetained: UInt64 { ringStart }

    public func willRemap(volume: UInt64, first: UInt64, old: UnsafeBufferPointer<UInt64>, new: UnsafeBufferPointer<UInt64>,
                          reason: MappingChangeReason) {
        cond.lock()
        defer { cond.unlock() }
        let seq = append { s in
            FeedEvent(sequence: s, kind: .remap, reason: RemapReason(rawValue: reason.rawValue) ?? .other, volume: volume,
                      first: first, entries: (0..<old.count).map { (old[$0], new[$0]) })
        }
        // A block a read-lease holder may be reading stays put until it acknowledges.
        guard !readLeases.isEmpty, !old.isEmpty else { return }
        let t = now
        let last = first + UInt64(old.count) - 1
        for leaf in (first >> 9)...(last >> 9) {
            guard let over = readLeases.leases(volume: volume, leaf: leaf) else { continue }
            let a = max(first, leaf << 9), b = min(last, (leaf << 9) | 511)
            for lease in over where !lease.session.fenced {
                let lo = max(a, lease.first), hi = min(b, lease.first + lease.count - 1)
                guard lo <= hi else { continue }
                for v in lo...hi {
                    let i = Int(v - first)
                    guard old[i] != 0 && old[i] != new[i] else { continue }
                    pool.pin(old[i])
                    lease.session.pins.append(Pin(sequence: seq, block: old[i], lease: lease.id, since: t))
                }
            }
        }
    }

    public func volumeChanged(_ change: VolumeChange, volume: UInt64, aux: UInt64) {
        cond.lock()
        defer { cond.unlock() }
        let kind = FeedEventKind(rawValue: change.rawValue) ?? .resized
        let seq = append { FeedEvent(sequence: $0, kind: kind, volume: volume, aux: aux) }
        if change == .rollback || change == .volumeDeleted || change == .snapshotDeleted {
            // The map whose blocks are about to be released: the volume's (rolled back or
            // deleted), or the snapshot's — not its volume's. Pool operations publish this
            // before the deleter may touch that map (Pool's deleter holds), so every session
            // with a read lease on it keeps all frees back (through its read epoch) until it
            // acknowledges this event; its leases on that map end.
            let doomed = change == .snapshotDeleted ? aux : volume
            let t = now
            for s in sessions.values where !s.fenced && s.hasReadLease(on: doomed) { s.holdFrees(until: seq, at: t) }
            for lease in leases.values where lease.volume == doomed { lease.expires = 0 }
        }
    }

    /// A media error: the physical block and its owners.
    func mediaError(block: UInt64, owners: [(UInt64, UInt64)]) {
        cond.withLock { _ = append { FeedEvent(sequence: $0, kind: .mediaError, volume: 0, first: block, entries: owners) } }
    }

    // MARK: moves and write leases

    public func beginMove(volume: UInt64, first: UInt64, count: UInt64) {
        var fenced: [FencedWrite] = []
        cond.lock()
        _ = addMove(volume: volume, first: first, count: count)
        while writeLeaseCount > 0 && !stopping {
            let conflicting = leases.values.filter { $0.mode == .write && !$0.returned && $0.overlaps(volume: volume, first: first, count: count) }
            if conflicting.isEmpty { break }
            var pendingDeadline = Double.infinity
            for lease in conflicting {
                if lease.recallDeadline == nil {
                    lease.recallDeadline = now + recallDeadline
                    lease.session.send(FeedMessages.recall(lease: lease.id, deadlineMs: UInt32(recallDeadline * 1000)))
                }
                pendingDeadline = min(pendingDeadline, lease.recallDeadline!)
            }
            if now >= pendingDeadline {
                for lease in conflicting where lease.recallDeadline! <= now {
                    fenced += fence(lease.session)
                }
                continue
            }
            _ = cond.wait(seconds: max(0.001, pendingDeadline - now))
        }
        cond.unlock()
        // Blocks a fenced holder may still store into are moved away from the volume (outside
        // the lock: this writes through the volume, which reports back here), then it is told.
        finishFence(fenced)
        // A relocation of this range may be under way (a copy-on-write for a lease being
        // granted, or another thread moving the blocks of a lease it fenced for a recall both
        // were waiting for): nothing may move the range before it is done.
        cond.withLock {
            while !stopping && relocations.contains(where: { moves[$0].map { $0.volume == volume && $0.first < first + count && first < $0.first + $0.count } ?? false }) {
                _ = cond.wait(seconds: 0.05)
            }
        }
    }

    public func endMove(volume: UInt64, first: UInt64, count: UInt64) {
        cond.withLock {
            if let id = moves.first(where: { $0.value == (volume, first, count) && !relocations.contains($0.key) })?.key { moves[id] = nil }
            cond.broadcast()
        }
    }

    /// A fenced write lease whose blocks are being moved away from its volume; FENCED is sent
    /// once they are.
    struct FencedWrite: @unchecked Sendable {
        let lease: Lease
        /// Kept alive until told (it may disconnect during the relocation).
        let session: FeedSession
        /// The move that keeps new write leases off the range meanwhile.
        let move: UInt64
    }

    /// Voids every lease of a session that missed a recall or acknowledgement deadline (lock
    /// held): the session is told at once (FENCED for lease 0), and so is each read lease;
    /// write leases are returned, and told by `finishFence` (outside the lock) once their
    /// blocks are moved away.
    func fence(_ s: FeedSession, because reason: String = "missed a recall deadline") -> [FencedWrite] {
        guard !s.fenced else { return [] }
        s.fenced = true
        Log.warning("feed: client \(s.id) (\(s.name)) \(reason); fencing it")
        // The session itself, whatever leases it still holds (the model's FIX 2): its pins and
        // hold go below, so a block it lent out may be reused — a session whose leases a
        // rollback or deletion already ended would otherwise hear nothing.
        s.send(FeedMessages.fenced(lease: 0))
        var writes: [FencedWrite] = []
        for lease in leases.values where lease.session === s {
            if lease.mode == .write {
                // The blocks it may still write into are never reused while it is connected,
                // and no other write lease is granted over them before they leave the volume.
                for b in lease.blocks { pool.pin(b); s.fencedPins.append(b) }
                let move = addMove(volume: lease.volume, first: lease.first, count: lease.count)
                relocations.insert(move)
                writes.append(FencedWrite(lease: lease, session: s, move: move))
            } else {
                s.send(FeedMessages.fenced(lease: lease.id))
            }
            dropLease(lease)
        }
        // A fenced session's reads are no longer protected: its pins and its hold on frees go.
        s.releasePins(through: .max)
        s.endFreeHold()
        cond.broadcast()
        return writes
    }

    /// Moves each fenced write lease's blocks away from its volume (lock not held), then sends
    /// FENCED: from then on nothing the holder stores reaches any volume or snapshot. While the
    /// pool is too full for the copy, it tries again every 50 ms — moves of the range wait
    /// meanwhile, and FENCED is not sent: the blocks are still the volume's.
    func finishFence(_ writes: [FencedWrite]) {
        for w in writes {
            var waited = false
            while !relocate(w.lease) && !cond.withLock({ stopping }) {
                if !waited {
                    Log.error("feed: the pool is too full to move a fenced lease's blocks (\(w.lease.count) needed); operations on that range wait until space is freed")
                    waited = true
                }
                usleep(50_000)
            }
            cond.withLock {
                moves[w.move] = nil
                relocations.remove(w.move)
                w.session.send(FeedMessages.fenced(lease: w.lease.id))
                cond.broadcast()
            }
        }
    }

    /// Copies a fenced write lease's blocks to new ones, so the volume no longer uses blocks
    /// the fenced holder can still store into; false when the pool is full (try again).
    func relocate(_ lease: Lease) -> Bool {
        guard let volume = pool.volume(id: lease.volume) else { return true }
        do {
            try volume.relocate(first: lease.first, count: lease.count, reason: .fence)
        } catch {
            if error.kind == .noSpace { return false }
            Log.error("feed: relocating blocks of a fenced lease failed: \(error.message)")
        }
        return true
    }

    /// Registers a move of a range (lock held): no write lease is granted over it until
    /// `moves[id]` is removed.
    private func addMove(volume: UInt64, first: UInt64, count: UInt64) -> UInt64 {
        let id = nextMoveID
        nextMoveID += 1
        moves[id] = (volume, first, count)
        return id
    }

    /// Removes a lease (lock held) and releases what it held.
    func dropLease(_ lease: Lease) {
        guard leases.removeValue(forKey: lease.id) != nil else { return }
        if lease.mode == .read { readLeases.remove(lease) }
        if lease.mode == .write { writeLeaseCount -= 1 }
        // Its pins stay until the holder acknowledges the events that took them.
        cond.broadcast()
    }

    // MARK: granting

    /// Grants a lease and queues the reply (`reply` is called with the hub locked, so the
    /// client hears of the lease before any later event). Returns the refusal otherwise.
    func grant(_ s: FeedSession, mode: LeaseMode, volumeID: UInt64, first: UInt64, count: UInt64, duration: Double,
               reply: (Lease, UInt64, [UInt64]) -> Void) -> Result<(Lease, UInt64, [UInt64]), FeedDenial> {
        guard let volume = pool.volume(id: volumeID) else { return .failure(FeedDenial("no volume with id \(volumeID)")) }
        guard count > 0, count <= UInt64(FeedProtocol.maxRangeBlocks), first < volume.size >> 12, count <= (volume.size >> 12) - first else {
            return .failure(FeedDenial("range outside the volume"))
        }
        if mode == .write && volume.readOnly { return .failure(FeedDenial("\(volume.name) is read-only")) }
        for attempt in 0..<4 {
            if mode == .write {
                // No other write lease, no move in progress over the range.
                let busy = cond.withLock { () -> Result<UInt64, FeedDenial> in
                    if s.fenced { return .failure(FeedDenial("this client is fenced")) }
                    if s.closed { return .failure(FeedDenial("the session is closed")) }
                    if leases.values.contains(where: { $0.mode == .write && $0.overlaps(volume: volumeID, first: first, count: count) }) {
                        return .failure(FeedDenial("another write lease covers part of the range"))
                    }
                    var waited = false
                    while moves.values.contains(where: { $0.volume == volumeID && $0.first < first + count && first < $0.first + $0.count }) && !stopping {
                        if !waited {
                            waited = true
                            testHooks.withLock { $0.writeGrantWaitsForMove }?()
                        }
                        _ = cond.wait(seconds: 0.05)
                    }
                    // The copy-on-write below holds the range alone.
                    let move = addMove(volume: volumeID, first: first, count: count)
                    relocations.insert(move)
                    return .success(move)
                }
                guard case .success(let relocation) = busy else {
                    if case .failure(let why) = busy { return .failure(why) }
                    continue
                }
                // Blocks shared with snapshots or clones (or holes) get blocks of their own first
                // (through the volume as it is now: the wait may have spanned a rollback).
                let copied = Result { () throws(PoolError) in
                    guard let current = pool.volume(id: volumeID) else { throw PoolError(.notFound, "no volume with id \(volumeID)") }
                    try current.makeExclusive(first: first, count: count)
                }
                cond.withLock {
                    moves[relocation] = nil
                    relocations.remove(relocation)
                    cond.broadcast()
                }
                if case .failure(let error) = copied { return .failure(FeedDenial(error.message)) }
            }
            // The volume as it is now (a rollback while this waited replaced its record's map
            // and perhaps its size; its old object may be stale).
            guard let volume = pool.volume(id: volumeID) else { return .failure(FeedDenial("no volume with id \(volumeID)")) }
            var conflict = false
            let result: (Lease, UInt64, [UInt64])? = volume.withMapLocked {
                cond.withLock {
                    if s.fenced || s.closed { return nil }
                    // Deleted since it was looked up: its deletion event may already have gone
                    // out, so a lease now would protect nothing.
                    if !volume.isLive { return nil }
                    if mode == .write && moves.values.contains(where: { $0.volume == volumeID && $0.first < first + count && first < $0.first + $0.count }) {
                        return nil
                    }
                    // Checked again (the model's FIX 1): another session may have been granted
                    // a write lease over the range while this one waited for the moves or did
                    // its copy-on-write — it passed the first check before that grant.
                    if mode == .write && leases.values.contains(where: { $0.mode == .write && $0.overlaps(volume: volumeID, first: first, count: count) }) {
                        conflict = true
                        return nil
                    }
                    let blocks: [UInt64]?
                    do {
                        blocks = mode == .write ? try volume.exclusiveBlocks(first: first, count: count) : try volume.currentBlocks(first: first, count: count)
                    } catch { return nil }
                    guard let blocks else { return nil }
                    let lease = Lease(id: nextLeaseID, mode: mode, volume: volumeID, first: first, count: count,
                                      expires: now + duration, session: s)
                    nextLeaseID += 1
                    lease.blocks = mode == .write ? blocks : []
                    leases[lease.id] = lease
                    if mode == .read { readLeases.insert(lease) }
                    if mode == .write { writeLeaseCount += 1 }
                    reply(lease, sequence, blocks)
                    return (lease, sequence, blocks)
                }
            }
            if let result { return .success(result) }
            if conflict { return .failure(FeedDenial("another write lease covers part of the range")) }
            if s.fenced { return .failure(FeedDenial("this client is fenced")) }
            if s.closed { return .failure(FeedDenial("the session is closed")) }
            if !volume.isLive { return .failure(FeedDenial("no volume with id \(volumeID)")) }
            _ = attempt
        }
        return .failure(FeedDenial("the range kept changing; try again"))
    }

    /// The mapping of a range with the sequence number it is consistent with; `reply` is called
    /// with the hub locked (so it precedes later events).
    func map(volumeID: UInt64, first: UInt64, count: UInt64, reply: (UInt64, [UInt64]) -> Void) -> Result<(UInt64, [UInt64]), FeedDenial> {
        guard let volume = pool.volume(id: volumeID) else { return .failure(FeedDenial("no volume with id \(volumeID)")) }
        guard count <= UInt64(FeedProtocol.maxRangeBlocks), first < volume.size >> 12, count <= (volume.size >> 12) - first else {
            return .failure(FeedDenial("range outside the volume"))
        }
        return volume.withMapLocked {
            do throws(PoolError) {
                let blocks = try volume.currentBlocks(first: first, count: count)
                return try cond.withLock { () throws(PoolError) in
                    guard volume.isLive else { throw PoolError(.notFound, "no volume with id \(volumeID)") }
                    reply(sequence, blocks)
                    return .success((sequence, blocks))
                }
            } catch { return .failure(FeedDenial(error.message)) }
        }
    }

    // MARK: sessions

    func register(_ s: FeedSession) -> UInt64 {
        cond.withLock {
            let id = nextSessionID
            nextSessionID += 1
            sessions[id] = s
            pool.setObserver(self)
            return id
        }
    }

    func unregister(_ s: FeedSession) {
        cond.withLock {
            s.closed = true
            sessions[s.id] = nil
            for lease in leases.values where lease.session === s { dropLease(lease) }
            s.releasePins(through: .max)
            for b in s.fencedPins { pool.unpin(b) }
            s.fencedPins = []
            s.endFreeHold()
            // Events keep being recorded after the last subscriber leaves, so one that
            // reconnects can resume from its sequence number.
            cond.broadcast()
        }
    }

    /// `finishFence` on a thread of its own: the reaper must go on fencing (a full pool may be
    /// waiting for it to release another session's pins).
    private func finishFenceElsewhere(_ writes: [FencedWrite]) {
        guard !writes.isEmpty else { return }
        OSThread.spawn(name: "pmem-feed-fence") { [self] in finishFence(writes) }
    }

    /// Expires leases and releases what they held.
    private func reaper() {
        while true {
            reaperWake.withLock { _ = reaperWake.wait(seconds: 0.2) }
            cond.lock()
            if stopping { break }
            let t = now
            for lease in leases.values where lease.expires <= t {
                if lease.mode == .write && !lease.returned && lease.recallDeadline == nil {
                    // An expired write lease is recalled like any other: it must be returned.
                    lease.recallDeadline = t + recallDeadline
                    lease.session.send(FeedMessages.recall(lease: lease.id, deadlineMs: UInt32(recallDeadline * 1000)))
                    continue
                }
                if lease.mode == .write, let d = lease.recallDeadline, d > t, !lease.returned { continue }
                if lease.mode == .write && !lease.returned {
                    finishFenceElsewhere(fence(lease.session))
                    continue
                }
                dropLease(lease)
            }
            // A holder that sits on pinned blocks (never acknowledges) would keep them from
            // reuse forever: past the deadline it is fenced and its pins go.
            for session in sessions.values where !session.fenced {
                // The oldest event it owes an acknowledgement for: one that pinned a block, or
                // one that holds every free back.
                let since = min(session.pins.oldest?.since ?? .infinity, session.holdSince ?? .infinity)
                if t - since > ackDeadline {
                    finishFenceElsewhere(fence(session, because: "left an event unacknowledged for \(Int(t - since)) s"))
                }
            }
            cond.unlock()
        }
        cond.unlock()
    }

    /// What the feed holds right now (for metrics).
    public struct Counts: Sendable, Equatable {
        /// Connected subscribers, and how many of them are fenced.
        public var subscribers = 0
        public var fencedSubscribers = 0
        public var readLeases = 0
        public var writeLeases = 0
        /// Old blocks kept from reuse until a read-lease holder acknowledges.
        public var pinnedBlocks = 0
        /// The last event's sequence number.
        public var sequence: UInt64 = 0
        public var leases: Int { readLeases + writeLeases }
    }

    public var counts: Counts {
        cond.withLock {
            var c = Counts()
            c.subscribers = sessions.count
            c.fencedSubscribers = sessions.values.filter { $0.fenced }.count
            c.writeLeases = writeLeaseCount
            c.readLeases = leases.count - writeLeaseCount
            c.pinnedBlocks = sessions.values.reduce(0) { $0 + $1.pins.count }
            c.sequence = sequence
            return c
        }
    }
}

/// Callbacks tests install to force interleavings; nil in production.
package struct FeedTestHooks: Sendable {
    /// After a lease is granted and its reply queued, before the session reads its next
    /// request: (lease id, mode).
    package var afterGrant: (@Sendable (UInt64, LeaseMode) -> Void)?
    /// A write grant that found no other write lease over its range waits for a move of the
    /// range to end (called once per wait, hub locked: it must not use the hub).
    package var writeGrantWaitsForMove: (@Sendable () -> Void)?
    package init() {}
}

/// Why a request was refused.
struct FeedDenial: Error {
    let reason: String
    init(_ reason: String) { self.reason = reason }
}
