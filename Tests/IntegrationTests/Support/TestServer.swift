import Foundation
import Glibc
import NBDServer
import NBDTLS
import NBDWire
import PmemNBD
import PmemFeed
import PmemPool
import PmemVolumes
import PmemSystem
@testable import TestSupport

/// A pool served in this process on a Unix socket.
final class TestServer {
    let scratch = ScratchDirectory()
    let poolPath: String
    let socketPath: String
    let pool: Pool
    var engine: PoolEngine { pool.engine }
    let volume: Volume
    let server: Server
    /// The mapping-change feed, when asked for.
    var hub: FeedHub?
    var feed: FeedServer?
    var media: MediaErrors?
    var feedPath: String { scratch.file("s.feed") }

    /// A pool of `size` bytes whose volume `vol0` is `volumeSize` (default: size less 16 MiB).
    init(size: UInt64 = 80 << 20, volumeSize: UInt64? = nil, readOnly: Bool = false, persistence: PersistenceMode = .page,
         exportName: String? = nil, withFeed: Bool = false, recallDeadline: Double = 2, ackDeadline: Double = 10,
         badBlocks: String? = nil, ringCapacity: Int = 65_536,
         tls: (mode: Negotiator.TLSMode, credentials: TLSCredentials)? = nil, handshakeTimeoutSeconds: Int? = nil) throws {
        poolPath = scratch.file("pool")
        socketPath = scratch.file("s.sock")
        try PoolEngine.create(path: poolPath, size: size, volumeName: "vol0", volumeSize: volumeSize ?? (size - (16 << 20)))
        pool = try Pool.open(path: poolPath, readOnly: readOnly, persistence: persistence)
        volume = pool.volume(named: "vol0")!
        server = Server(exports: PoolExports(pool: pool, readOnly: readOnly, defaultName: exportName))
        if let tls {
            server.tlsMode = tls.mode
            server.tlsCredentials = tls.credentials
        }
        if let handshakeTimeoutSeconds { server.handshakeTimeoutSeconds = handshakeTimeoutSeconds }
        try server.listen(on: [Socket.listenUnix(path: socketPath)])
        pool.onVolumeChange { [server] id in server.disconnect { $0.volumeID == id } }
        if withFeed {
            let hub = try FeedHub(pool: pool, recallDeadline: recallDeadline, ackDeadline: ackDeadline, ringCapacity: ringCapacity)
            self.hub = hub
            feed = try FeedServer(path: scratch.file("s.feed"), hub: hub)
            feed?.start()
            media = MediaErrors(hub: hub, file: badBlocks, poolPath: poolPath)
            media?.start()
        }
    }

    var uri: String { "nbd+unix:///?socket=\(socketPath)" }
    func uri(export: String) -> String { "nbd+unix:///\(export)?socket=\(socketPath)" }

    /// A connected libnbd client.
    func client(_ configure: (NBDClient) throws -> Void = { _ in }) throws -> NBDClient {
        let c = try NBDClient()
        try configure(c)
        try c.connect(unix: socketPath)
        return c
    }

    deinit {
        media?.stop()
        feed?.stop()
        server.shutdown(timeoutSeconds: 10)
        try? pool.close()
    }
}
