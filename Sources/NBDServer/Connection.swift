import Dispatch
import Glibc
import NBDWire
import PmemPool
import PmemVolumes
import PmemSystem

/// One client connection, served by its own thread: the handshake, then the transmission
/// phase (see HandshakePhase.swift and TransmissionPhase.swift).
final class Connection: @unchecked Sendable {
    let id: UInt64
    let input: FileDescriptor
    let output: FileDescriptor
    let server: Server
    let peer: String
    let receive: ReceiveBuffer
    let replies: ReplyWriter
    /// Request counters (see RequestMetrics.swift).
    let metrics: ConnectionMetrics
    /// Offloaded commands still running (FLUSH, FUA syncs).
    let offloaded = WaitGroup()
    /// The volume being served, once transmission started.
    private(set) var volume: (any BlockVolume)?

    init(id: UInt64, input: FileDescriptor, output: FileDescriptor, server: Server, peer: String) {
        self.id = id
        self.input = input
        self.output = output
        self.server = server
        self.peer = peer
        receive = ReceiveBuffer(fd: input, capacity: 256 * 1024)
        replies = ReplyWriter(fd: output)
        metrics = ConnectionMetrics(timed: server.measuresLatency)
    }

    /// Thread entry: runs the connection to its end and closes it.
    func run() {
        Log.debug("connection \(id) from \(peer)")
        defer {
            // Release the reply stream first: offloaded commands need it to send their replies.
            replies.flush()
            offloaded.wait()
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
            guard let volume = server.exports.volume(for: session.export) else {
                Log.warning("connection \(id): export '\(session.export.name)' vanished")
                return
            }
            server.connectionLock.withLock { self.volume = volume }
            try transmit(session: session, volume: volume)
        } catch {
            Log.debug("connection \(id): \(error)")
        }
    }

    /// Sends handshake bytes directly (no batching needed).
    func sendHandshake(_ bytes: [UInt8]) throws(Errno) {
        try output.writeAll(bytes: bytes)
    }

    /// Interrupts blocking reads so the thread drains and exits (server shutdown).
    func interrupt() {
        Socket.shutdown(input, read: true, write: false)
    }
}
