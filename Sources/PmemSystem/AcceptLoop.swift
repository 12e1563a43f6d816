import Glibc

/// The one accept loop: a thread that waits in `epoll_wait` on listening sockets and an
/// eventfd, accepts every pending connection (`accept4(SOCK_CLOEXEC)`, the new socket in
/// blocking mode), applies the peer policy and hands each one to `accepted`. `stop` wakes the
/// thread through the eventfd, joins it, and closes the listening sockets and the eventfd.
///
/// Used by the NBD listener, the metrics endpoint, the feed socket and the control socket.
public final class AcceptLoop: @unchecked Sendable {
    /// Who may connect.
    public enum PeerPolicy: Sendable {
        /// Anyone who reaches the socket.
        case anyone
        /// Unix sockets: only root and this process's user (`SO_PEERCRED`); others are closed
        /// at once with a warning.
        case rootOrOwnUser
    }

    public let sockets: [FileDescriptor]
    private let name: String
    private let label: String
    private let policy: PeerPolicy
    private let tickMilliseconds: Int32
    private let tick: (@Sendable () -> Void)?
    private let accepted: @Sendable (FileDescriptor) -> Void
    private let wake: EventFD
    private let done = WaitGroup()
    private let state = Locked((started: false, stopped: false))

    /// - Parameters:
    ///   - sockets: listening sockets; the loop owns them from now on (`stop` closes them).
    ///   - name: the thread's name.
    ///   - label: how log messages name this endpoint.
    ///   - tickMilliseconds: with `tick`, the longest wait between calls of `tick` (which also
    ///     runs after every wake-up).
    ///   - accepted: called on the loop's thread with each accepted connection, which it owns.
    public init(sockets: [FileDescriptor], name: String, label: String, policy: PeerPolicy = .anyone,
                tickMilliseconds: Int32 = -1, tick: (@Sendable () -> Void)? = nil,
                accepted: @escaping @Sendable (FileDescriptor) -> Void) throws(Errno) {
        self.sockets = sockets
        self.name = name
        self.label = label
        self.policy = policy
        self.tickMilliseconds = tick == nil ? -1 : tickMilliseconds
        self.tick = tick
        self.accepted = accepted
        wake = try EventFD()
    }

    /// Starts the thread.
    public func start() {
        state.withLock { $0.started = true }
        done.enter()
        OSThread.spawn(name: name) { [self] in
            defer { done.leave() }
            do { try loop() } catch { Log.error("\(label): \(error)") }
        }
    }

    /// Stops accepting: wakes the thread and waits up to `timeoutSeconds` for it to end, then
    /// closes the listening sockets and the eventfd. A thread that does not end in time (an
    /// `accepted` that blocks) keeps its descriptors, which are then left open rather than
    /// closed under it. Calling it again does nothing.
    public func stop(timeoutSeconds: Double = 10) {
        let (started, stopped) = state.withLock { s in
            defer { s.stopped = true }
            return (s.started, s.stopped)
        }
        guard !stopped else { return }
        wake.signal()
        if started && !done.wait(timeoutSeconds: timeoutSeconds) {
            Log.warning("\(label): the accept thread did not end within \(timeoutSeconds) s; its sockets stay open")
            return
        }
        for s in sockets { s.close() }
        wake.close()
    }

    private func loop() throws(Errno) {
        let epoll = try Epoll()
        try epoll.add(wake.fd, token: UInt64.max)
        for (i, s) in sockets.enumerated() {
            try s.setNonBlocking(true)
            try epoll.add(s, token: UInt64(i))
        }
        while true {
            let ready = try epoll.wait(timeoutMilliseconds: tickMilliseconds)
            tick?()
            if ready.contains(UInt64.max) { return }
            for token in ready { drain(sockets[Int(token)]) }
        }
    }

    /// Accepts until the listening socket has nothing pending.
    private func drain(_ s: FileDescriptor) {
        while true {
            do {
                let c = try Socket.accept(s)
                try? c.setNonBlocking(false)
                if case .rootOrOwnUser = policy {
                    let uid = Socket.peerCredentials(c)?.uid
                    if uid == nil || (uid != 0 && uid != getuid()) {
                        Log.warning("\(label): refusing uid \(uid.map { String($0) } ?? "unknown")")
                        c.close()
                        continue
                    }
                }
                accepted(c)
            } catch {
                if error == .wouldBlock { return }
                if error.rawValue == EMFILE || error.rawValue == ENFILE {
                    Log.warning("\(label): accept: \(error); pausing")
                    usleep(100_000)
                    return
                }
                if error.rawValue == ECONNABORTED || error.rawValue == EPROTO { continue }
                Log.warning("\(label): accept: \(error)")
                return
            }
        }
    }
}
