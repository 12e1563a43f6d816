import Dispatch
import Glibc
import NBDTLS
import NBDWire
import PmemSystem
import Synchronization

/// The NBD server: accepts connections on listeners and serves each on its own thread.
/// Shutdown stops accepting, lets in-flight requests finish, and waits for connections.
public final class Server: @unchecked Sendable {
    public let exports: any ExportSource
    /// Seconds a client may take from its connection to the end of the handshake (0: no
    /// limit); then it is disconnected (set before listening).
    public var handshakeTimeoutSeconds: Int = 10
    /// Connections served at once (0: no limit); a client beyond it is closed as soon as it is
    /// accepted, and those being served do not notice (set before listening).
    public var maxConnections: Int = 0
    /// Whether connections measure request latency (for metrics; set before listening).
    public var measuresLatency = false
    /// STARTTLS policy (set before listening); TLS stays off without credentials.
    public var tlsMode: Negotiator.TLSMode = .off
    /// Server certificate and/or pre-shared keys, loaded once (set before listening).
    public var tlsCredentials: TLSCredentials?

    private let connections = Locked<[UInt64: Connection]>([:])
    /// Clients closed at once because `maxConnections` were being served.
    private let refusedOverLimit = Atomic<UInt64>(0)
    /// Whether the last accepted client found the server full (to log the change once).
    private let wasFull = Atomic<Bool>(false)
    private let nextID = Atomic<UInt64>(1)
    private let shuttingDown = Atomic<Bool>(false)
    private let active = WaitGroup()
    private var listeners: [AcceptLoop] = []
    /// Counters of connections that ended (own and offloaded), added under `connections`' lock.
    private let retired = CounterBlock(count: MetricSlot.count)
    /// The same, by the export each used (under `connections`' lock).
    private var retiredByExport: [String: CounterBlock] = [:]
    /// When the last ENOSPC warning was logged (monotonic ns), and how many were not since.
    private let noSpaceWarned = Atomic<UInt64>(0)
    private let noSpaceQuiet = Atomic<UInt64>(0)
    /// Seconds between two ENOSPC warnings in the log.
    public var noSpaceWarningInterval: Double = 10

    public init(exports: any ExportSource) {
        self.exports = exports
        // A client that goes away must surface as EPIPE on the send, not kill the process.
        signal(SIGPIPE, SIG_IGN)
    }

    public var isShuttingDown: Bool { shuttingDown.load(ordering: .acquiring) }

    /// Guards what connections publish about themselves (their volume).
    let connectionLock = PosixMutex()

    /// Disconnects every connection serving a volume that matches (after it finishes the
    /// request in progress): used when a volume's contents or size change wholesale.
    public func disconnect(where matches: (any BlockVolume) -> Bool) {
        let open = connections.withLock { Array($0.values) }
        for c in open {
            guard let v = connectionLock.withLock({ c.volume }), matches(v) else { continue }
            Log.info("connection \(c.id): disconnecting, its export changed")
            c.interrupt()
        }
    }

    /// Number of connections being served.
    public var connectionCount: Int { connections.withLock { $0.count } }

    /// Number of connections serving a volume that matches (busy volumes are not deleted
    /// without --force).
    public func connectionCount(where matches: (any BlockVolume) -> Bool) -> Int {
        let open = connections.withLock { Array($0.values) }
        return open.filter { c in connectionLock.withLock({ c.volume }).map(matches) ?? false }.count
    }

    /// The open connections, oldest first (`pmem-nbd connections`).
    public func connectionInfo() -> [ConnectionInfo] {
        let open = connections.withLock { Array($0.values) }.sorted { $0.id < $1.id }
        return open.map { c in
            let export = connectionLock.withLock { c.exportName }
            let (requests, completed) = c.metrics.requestsAndCompleted
            let bytesIn = c.metrics.own.load(MetricSlot.bytesWritten)
            let bytesOut = c.metrics.own.load(MetricSlot.bytesRead)
            return ConnectionInfo(id: c.id, peer: c.peer, export: export, since: c.since, bytesIn: bytesIn, bytesOut: bytesOut,
                                  requests: requests, inFlight: requests >= completed ? requests - completed : 0)
        }
    }

    /// Logs that a request failed for want of free space, at most once per
    /// `noSpaceWarningInterval` (saying how many were not logged in between).
    func warnNoSpace(export: String, command: String, offset: UInt64, length: UInt64) {
        let now = MonotonicClock.nanoseconds()
        let last = noSpaceWarned.load(ordering: .relaxed)
        let interval = UInt64(noSpaceWarningInterval * 1e9)
        guard last == 0 || now &- last >= interval,
              noSpaceWarned.compareExchange(expected: last, desired: now, ordering: .relaxed).exchanged else {
            noSpaceQuiet.add(1, ordering: .relaxed)
            return
        }
        let quiet = noSpaceQuiet.exchange(0, ordering: .relaxed)
        Log.warning("export \(export): the pool is full: \(command) of \(length) bytes at offset \(offset) failed with ENOSPC"
                    + (quiet > 0 ? " (and \(quiet) more since the last warning)" : "")
                    + "; free space by deleting snapshots or volumes, or TRIM")
    }

    /// Starts accepting on listening sockets (Unix, TCP or inherited from systemd).
    public func listen(on sockets: [FileDescriptor]) throws(Errno) {
        // Woken at least twice a second to disconnect handshakes past their deadline.
        let listener = try AcceptLoop(sockets: sockets, name: "nbd-accept", label: "accept loop", tickMilliseconds: 500,
                                      tick: { [unowned self] in expireHandshakes() },
                                      accepted: { [unowned self] c in accepted(c, peer: Socket.peerName(c)) })
        listeners.append(listener)
        listener.start()
    }

    /// Serves one connection on the calling thread (stdin/stdout with `--stdio`).
    public func serveConnection(input: FileDescriptor, output: FileDescriptor, peer: String) {
        let c = register(input: input, output: output, peer: peer)
        c.run()
    }

    /// Serves an accepted socket on a new thread (called by an accept thread).
    func accepted(_ fd: FileDescriptor, peer: String) {
        if isShuttingDown {
            fd.close()
            return
        }
        if maxConnections > 0 {
            let full = connectionCount >= maxConnections
            if wasFull.exchange(full, ordering: .relaxed) != full {
                if full {
                    Log.warning("\(maxConnections) connections are being served (--max-connections): new clients are closed until one ends")
                } else {
                    Log.info("below \(maxConnections) connections again: accepting clients")
                }
            }
            if full {
                refusedOverLimit.add(1, ordering: .relaxed)
                Log.debug("client from \(peer) closed: \(maxConnections) connections are being served")
                fd.close()
                return
            }
        }
        Socket.setNoDelay(fd)
        let c = register(input: fd, output: fd, peer: peer)
        if handshakeTimeoutSeconds > 0 {
            c.handshakeDeadline.store(MonotonicClock.nanoseconds() + UInt64(handshakeTimeoutSeconds) * 1_000_000_000, ordering: .relaxed)
        }
        OSThread.spawn(name: "nbd-conn-\(c.id)") { c.run() }
    }

    /// Clients closed at once because `maxConnections` were being served.
    public var connectionsRefused: UInt64 { refusedOverLimit.load(ordering: .relaxed) }

    /// Disconnects clients whose handshake outlived `handshakeTimeoutSeconds` (called by the
    /// accept thread about twice a second). Their reads and writes fail at once, whatever
    /// they were waiting for: the next byte of an option, a TLS record, room to send a reply.
    func expireHandshakes() {
        guard handshakeTimeoutSeconds > 0 else { return }
        let now = MonotonicClock.nanoseconds()
        let open = connections.withLock { Array($0.values) }
        let expired = connectionLock.withLock { open.filter { $0.expireHandshake(now: now) } }
        for c in expired {
            Log.info("connection \(c.id) from \(c.peer): handshake not finished within \(handshakeTimeoutSeconds) s; disconnecting")
        }
    }

    private func register(input: FileDescriptor, output: FileDescriptor, peer: String) -> Connection {
        let id = nextID.add(1, ordering: .relaxed).oldValue
        let c = Connection(id: id, input: input, output: output, server: self, peer: peer)
        active.enter()
        connections.withLock { $0[id] = c }
        return c
    }

    func connectionEnded(_ c: Connection) {
        connections.withLock {
            _ = $0.removeValue(forKey: c.id)
            // Counted once: either among the live connections or here, never both.
            let export = connectionLock.withLock { c.exportName }
            var byExport: CounterBlock?
            if let export {
                byExport = retiredByExport[export] ?? CounterBlock(count: MetricSlot.count)
                retiredByExport[export] = byExport
            }
            for block in [c.metrics.own, c.metrics.offloaded] {
                for i in 0..<MetricSlot.count {
                    retired.addShared(i, block.load(i))
                    byExport?.addShared(i, block.load(i))
                }
            }
        }
        active.leave()
    }

    /// Request counters summed over live and ended connections (for a metrics scrape).
    public func requestMetrics() -> RequestMetrics {
        var m = RequestMetrics()
        connections.withLock { open in
            m.add(retired)
            for c in open.values {
                m.add(c.metrics.own)
                m.add(c.metrics.offloaded)
            }
            m.connectionsOpen = open.count
        }
        m.connectionsTotal = nextID.load(ordering: .relaxed) - 1
        return m
    }

    /// Request counters by export name (the name each connection asked for), over live and
    /// ended connections: the per-volume metrics. Added up at scrape time, like the totals.
    public func requestMetricsByExport() -> [String: RequestMetrics] {
        var out: [String: RequestMetrics] = [:]
        connections.withLock { open in
            for (export, block) in retiredByExport { out[export, default: RequestMetrics()].add(block) }
            for c in open.values {
                guard let export = connectionLock.withLock({ c.exportName }) else { continue }
                out[export, default: RequestMetrics()].add(c.metrics.own)
                out[export, default: RequestMetrics()].add(c.metrics.offloaded)
            }
        }
        return out
    }

    /// Stops accepting, interrupts idle reads so each connection finishes what it has in
    /// flight, and waits up to `timeoutSeconds` for them to close.
    @discardableResult
    public func shutdown(timeoutSeconds: Double = 30) -> Bool {
        shuttingDown.store(true, ordering: .releasing)
        for l in listeners { l.stop(timeoutSeconds: 5) }
        listeners.removeAll()
        let open = connections.withLock { Array($0.values) }
        for c in open { c.interrupt() }
        return active.wait(timeoutSeconds: timeoutSeconds)
    }
}
