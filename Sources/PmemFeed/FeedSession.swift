import FeedWire
import Glibc
import PmemPool
import PmemSystem
import PmemVolumes

/// One subscriber: a reader thread reads its requests and handles those that never wait
/// (ACK, RELEASE, RETURN, SUBSCRIBE) at once; a worker thread answers the others (LEASE, MAP,
/// REVERSE, VOLUMES) in order — a LEASE may wait for a snapshot that waits for a RETURN on
/// this very connection; a writer thread sends replies and the subscribed events, batched.
final class FeedSession: @unchecked Sendable {
    unowned let hub: FeedHub
    let fd: FileDescriptor
    private(set) var id: UInt64 = 0
    var name = "?"
    /// All state below is guarded by the hub's lock.
    var fenced = false
    /// Set when the session is unregistered: nothing may be granted to it any more (its
    /// worker may still be answering a LEASE when its reader sees the client go).
    var closed = false
    var pins = PinQueue()
    var fencedPins: [UInt64] = []
    /// Volume subscribed to (0 = all), and the next event to send; nil before SUBSCRIBE.
    var subscription: UInt64 = 0
    var cursor: UInt64?
    var acked: UInt64 = 0
    private var outbox: [[UInt8]] = []
    private var closing = false
    /// Holds back every free in the pool while the client has not acknowledged a volume-wide change.
    private let freeHold: ReadGuard
    private var holdUntil: UInt64 = 0
    /// When the free hold began (monotonic seconds); nil when there is none.
    private(set) var holdSince: Double?
    /// Requests for the worker thread, in order (guarded by `work`).
    private let work = PosixCondition()
    private var queue: [(FeedMessage, [UInt8])] = []
    private var workerStopping = false
    /// Requests a client may have waiting before the reader stops reading more.
    static let maxQueuedRequests = 4096

    init(hub: FeedHub, fd: FileDescriptor) {
        self.hub = hub
        self.fd = fd
        freeHold = hub.engine.makeReadGuard()
    }

    func start() {
        id = hub.register(self)
        OSThread.spawn(name: "pmem-feed-w\(id)") { [self] in writer() }
        OSThread.spawn(name: "pmem-feed-q\(id)") { [self] in worker() }
        OSThread.spawn(name: "pmem-feed-r\(id)") { [self] in reader() }
    }

    // MARK: lock-held helpers (called by the hub with its lock held)

    func send(_ frame: [UInt8]) {
        outbox.append(frame)
        hub.cond.broadcast()
    }

    func hasReadLease(on volume: UInt64) -> Bool {
        hub.leases.values.contains { $0.session === self && $0.mode == .read && $0.volume == volume }
    }

    func releasePins(through seq: UInt64) {
        let pool = hub.pool
        pins.removeThrough(seq) { released in pool.unpin(released.lazy.map(\.block)) }
    }

    func holdFrees(until seq: UInt64, at time: Double) {
        holdUntil = max(holdUntil, seq)
        if holdSince == nil { holdSince = time }
        freeHold.enter()
    }

    func endFreeHold() {
        holdUntil = 0
        holdSince = nil
        freeHold.exit()
    }

    private func acknowledge(_ seq: UInt64) {
        guard !fenced else { return }
        acked = max(acked, seq)
        releasePins(through: acked)
        if holdUntil != 0 && acked >= holdUntil { endFreeHold() }
    }

    // MARK: threads

    private func writer() {
        let hub = self.hub
        while true {
            hub.cond.lock()
            var frames: [[UInt8]] = []
            while true {
                if closing { hub.cond.unlock(); return }
                frames = outbox
                outbox = []
                if let c = cursor, c <= hub.sequence {
                    if let events = hub.events(from: c, max: 4096) {
                        let mine = events.filter { subscription == 0 || $0.volume == subscription || $0.kind == .mediaError }
                        cursor = (events.last?.sequence ?? c) + 1
                        if !mine.isEmpty { frames.append(FeedMessages.events(mine)) }
                    } else {
                        // Fell behind the ring: the client must rebuild its map.
                        frames.append(FeedMessages.resync(sequence: hub.sequence))
                        cursor = hub.sequence + 1
                    }
                }
                if !frames.isEmpty { break }
                _ = hub.cond.wait(seconds: 1)
            }
            hub.cond.unlock()
            for f in frames {
                let ok = f.withUnsafeBytes { b in (try? Socket.send(fd, b)) == b.count }
                if !ok { close(); return }
            }
        }
    }

    private func reader() {
        defer { close() }
        do {
            while true {
                guard let header = readExactly(FeedProtocol.headerSize) else { return }
                let h = try FeedFrameHeader.decode(header)
                guard let payload = readExactly(h.length) else { return }
                guard let type = FeedMessage(rawValue: h.type) else {
                    hub.cond.withLock { send(FeedMessages.error("unknown message type \(h.type)")) }
                    continue
                }
                switch type {
                case .mapQuery, .reverseQuery, .lease, .listVolumes:
                    // May wait (for the map lock, a move, a recall): the worker answers, in order.
                    let accepted = work.withLock { () -> Bool in
                        while queue.count >= FeedSession.maxQueuedRequests && !workerStopping { _ = work.wait(seconds: 1) }
                        if workerStopping { return false }
                        queue.append((type, payload))
                        work.broadcast()
                        return true
                    }
                    if !accepted { return }
                default:
                    try handle(type, FeedReader(payload))
                }
            }
        } catch {
            hub.cond.withLock { send(FeedMessages.error("malformed request: \(error)")) }
        }
    }

    /// Answers queued requests in order until the session closes.
    private func worker() {
        while true {
            let next = work.withLock { () -> (FeedMessage, [UInt8])? in
                while queue.isEmpty && !workerStopping { _ = work.wait(seconds: 1) }
                if workerStopping { return nil }
                work.broadcast()
                return queue.removeFirst()
            }
            guard let (type, payload) = next else { return }
            do {
                try handle(type, FeedReader(payload))
            } catch {
                hub.cond.withLock { send(FeedMessages.error("malformed request: \(error)")) }
                close()
                return
            }
        }
    }

    /// The next `n` bytes; nil when the client is gone (end of stream or a broken connection).
    private func readExactly(_ n: Int) -> [UInt8]? { (try? fd.readExactly(n)) ?? nil }

    func close() {
        hub.cond.withLock {
            if closing { return }
            closing = true
            hub.cond.broadcast()
        }
        work.withLock {
            workerStopping = true
            queue = []
            work.broadcast()
        }
        Socket.shutdown(fd)
        hub.unregister(self)
    }

    // MARK: requests

    private func handle(_ type: FeedMessage, _ payload: FeedReader) throws {
        var r = payload
        switch type {
        case .hello:
            let version = try r.u32()
            _ = try r.u32()
            name = (try? r.string()) ?? "?"
            guard version == FeedProtocol.version else {
                hub.cond.withLock { send(FeedMessages.error("feed protocol version \(version) is not supported (this server speaks \(FeedProtocol.version))")) }
                return
            }
            sendWelcome()
        case .listVolumes:
            let request = try r.u64()
            // The sequence first: the list then reflects every event up to it (and perhaps
            // some later ones, which the client applies again harmlessly).
            let seq = hub.cond.withLock { hub.sequence }
            let all = hub.pool.records()
            let list = all.filter { $0.kind == .volume || $0.kind == .snapshot }.map {
                (id: $0.id, parent: $0.parent, size: $0.size, kind: UInt8($0.kind.rawValue), name: Pool.exportName($0, in: all) ?? $0.name)
            }
            hub.cond.withLock { send(FeedMessages.volumes(request: request, sequence: seq, list)) }
        case .subscribe:
            let volume = try r.u64(), from = try r.u64()
            hub.cond.withLock {
                subscription = volume
                if from == 0 {
                    cursor = hub.sequence + 1
                } else if from < hub.oldestRetained {
                    send(FeedMessages.resync(sequence: hub.sequence))
                    cursor = hub.sequence + 1
                } else {
                    cursor = from
                }
            }
        case .mapQuery:
            let request = try r.u64(), volume = try r.u64(), first = try r.u64(), count = UInt64(try r.u32())
            let result = hub.map(volumeID: volume, first: first, count: count) { seq, blocks in
                send(FeedMessages.mapReply(request: request, sequence: seq, volume: volume, first: first, blocks: blocks))
            }
            if case .failure(let why) = result { hub.cond.withLock { send(FeedMessages.denied(request: request, reason: why.reason)) } }
        case .reverseQuery:
            let request = try r.u64(), block = try r.u64()
            let seq = hub.cond.withLock { hub.sequence }
            let owners = (try? hub.pool.owners(of: block)) ?? []
            hub.cond.withLock { send(FeedMessages.reverseReply(request: request, sequence: seq, block: block, owners: owners)) }
        case .lease:
            let request = try r.u64()
            guard let mode = LeaseMode(rawValue: try r.u8()) else { throw FeedWireError.malformed("lease mode") }
            _ = try r.u8()
            _ = try r.u16()
            let durationMs = min(max(try r.u32(), 1000), 600_000)
            let volume = try r.u64(), first = try r.u64(), count = UInt64(try r.u32())
            let result = hub.grant(self, mode: mode, volumeID: volume, first: first, count: count, duration: Double(durationMs) / 1000) { lease, seq, blocks in
                send(FeedMessages.granted(request: request, lease: lease.id, mode: mode, sequence: seq, durationMs: durationMs,
                                          volume: volume, first: first, blocks: blocks))
            }
            switch result {
            case .failure(let why): hub.cond.withLock { send(FeedMessages.denied(request: request, reason: why.reason)) }
            case .success(let (lease, _, _)): hub.testHooks.withLock { $0.afterGrant }?(lease.id, mode)
            }
        case .release, .returnLease:
            let leaseID = try r.u64()
            hub.cond.withLock {
                // A lease already fenced (or unknown) gets no answer: FENCED went or goes out.
                guard let lease = hub.leases[leaseID], lease.session === self else { return }
                lease.returned = true
                hub.dropLease(lease)
                send(FeedMessages.released(lease: leaseID))
            }
        case .ack:
            let seq = try r.u64()
            hub.cond.withLock { acknowledge(seq) }
        default:
            hub.cond.withLock { send(FeedMessages.error("message \(type) is not a request")) }
        }
    }

    /// WELCOME, with the pool (read-write, for write leases) and the status page attached.
    private func sendWelcome() {
        let engine = hub.engine
        let frame = hub.cond.withLock {
            FeedMessages.welcome(instance: hub.status.instance, sequence: hub.sequence, blockAreaOffset: engine.layout.blockAreaOffset,
                                 blockCount: engine.layout.blockCount, poolSize: engine.layout.poolSize,
                                 uuid: engine.superblock.uuid, writable: !engine.readOnly)
        }
        var fds = [hub.status.fd]
        if let f = engine.media.file, let pool = try? FileDescriptor.open(f.path, engine.readOnly ? O_RDONLY : O_RDWR) {
            fds.insert(pool, at: 0)
            defer { pool.close() }
            sendFrame(frame, fds: fds)
        } else {
            sendFrame(frame, fds: fds)
        }
    }

    /// Sends a frame at once from the reader thread (WELCOME must precede anything else).
    private func sendFrame(_ frame: [UInt8], fds: [FileDescriptor]) {
        hub.cond.withLock {
            _ = frame.withUnsafeBytes { b in try? Socket.send(fd, b, descriptors: fds) }
        }
    }
}
