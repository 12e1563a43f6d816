import Dispatch
import Glibc
import NBDWire
import PmemSystem
import Synchronization

/// One client connection, served by its own thread: the handshake, then the transmission
/// phase (see HandshakePhase.swift and TransmissionPhase.swift).
final class Connection: @unchecked Sendable {
    let id: UInt64
    let input: FileDescriptor
    let output: FileDescriptor
    let server: Server
    let peer: String
    /// The byte stream, plain or TLS (see Transport.swift).
    let transport: Transport
    let receive: ReceiveBuffer
    let replies: ReplyWriter
    /// Request counters (see RequestMetrics.swift).
    let metrics: ConnectionMetrics
    /// Offloaded commands still running (FLUSH, FUA syncs).
    let offloaded = WaitGroup()
    /// The volume being served, once transmission started.
    private(set) var volume: (any BlockVolume)?
    /// The name of its export (under `server.connectionLock`, like `volume`).
    private(set) var exportName: String?
    /// When the connection was accepted (seconds since the Unix epoch).
    let since: Double
    /// When the handshake must be over (monotonic nanoseconds); 0 when there is no deadline
    /// (or the handshake is over), `expired` once the accept thread disconnected the client,
    /// `closing` once this connection's thread is about to close its descriptors.
    let handshakeDeadline = Atomic<UInt64>(0)
    static let expired = UInt64.max, closing = UInt64.max - 1

    init(id: UInt64, input: FileDescriptor, output: FileDescriptor, server: Server, peer: String) {
        self.id = id
        self.input = input
        self.output = output
        self.server = server
        self.peer = peer
        transport = Transport(input: input, output: output)
        receive = ReceiveBuffer(transport: transport, capacity: 256 * 1024)
        replies = ReplyWriter(transport: transport)
        metrics = ConnectionMetrics(timed: server.measuresLatency)
        var ts = timespec()
        clock_gettime(CLOCK_REALTIME, &ts)
        since = Double(ts.tv_sec) + Double(ts.tv_nsec) / 1e9
    }

    /// Thread entry: runs the connection to its end and closes it.
    func run() {
        Log.debug("connection \(id) from \(peer)")
        defer {
            // From here the accept thread leaves the descriptors alone (it shuts a socket down
            // under the same lock, so never one that is closed, or reused by then).
            server.connectionLock.withLock { handshakeDeadline.store(Connection.closing, ordering: .relaxed) }
            // Release the reply stream first: offloaded commands need it to send their replies.
            replies.flush()
            offloaded.wait()
            // Only this thread is left to send: close TLS in order when the stream still works.
            if !replies.failed { transport.closeTLS() }
            if input == output {
                input.close()
            } else {
                input.close()
                output.close()
            }
            server.connectionEnded(self)
            Log.debug("connection \(id) closed")
        }
        do {
            guard let session = try negotiate() else { return }
            // The deadline no longer applies; if it passed meanwhile the socket is shut down.
            guard handshakeDeadline.exchange(0, ordering: .acquiringAndReleasing) != Connection.expired else { return }
            guard let volume = server.exports.volume(for: session.export) else {
                Log.warning("connection \(id): export '\(session.export.name)' vanished")
                return
            }
            server.connectionLock.withLock {
                self.volume = volume
                self.exportName = session.export.name
            }
            try transmit(session: session, volume: volume)
        } catch {
            Log.debug("connection \(id): \(error)")
        }
    }

    /// Sends handshake bytes directly (no batching needed), through TLS once it is up.
    func sendHandshake(_ bytes: [UInt8]) throws(Errno) { try transport.send(bytes) }

    /// Interrupts blocking reads so the thread drains and exits (server shutdown). Not once
    /// the thread is closing its descriptors: the number may already name another file.
    func interrupt() {
        server.connectionLock.withLock {
            if handshakeDeadline.load(ordering: .relaxed) != Connection.closing { Socket.shutdown(input, read: true, write: false) }
        }
    }

    /// Disconnects the client if its handshake deadline passed before `now`: shuts the socket
    /// down both ways, so a read or a send blocked in the handshake fails at once. True when
    /// this call did it (the connection's thread then ends; it closes the descriptor).
    /// Called with `server.connectionLock` held.
    func expireHandshake(now: UInt64) -> Bool {
        let deadline = handshakeDeadline.load(ordering: .relaxed)
        guard deadline != 0, deadline < Connection.closing, now >= deadline,
              handshakeDeadline.compareExchange(expected: deadline, desired: Connection.expired, ordering: .acquiringAndReleasing).exchanged
        else { return false }
        Socket.shutdown(input)
        if output != input { Socket.shutdown(output) }
        return true
    }
}
