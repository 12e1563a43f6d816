import Glibc
import PmemSystem

/// Accepts feed subscribers on a Unix socket (mode 0600; only root and the server's user).
public final class FeedServer: @unchecked Sendable {
    public let path: String
    let hub: FeedHub
    private let loop: AcceptLoop

    public init(path: String, hub: FeedHub) throws {
        self.path = path
        self.hub = hub
        let listener = try Socket.listenUnix(path: path, backlog: 64)
        chmod(path, 0o600)
        do {
            loop = try AcceptLoop(sockets: [listener], name: "pmem-feed", label: "feed socket", policy: .rootOrOwnUser) { client in
                FeedSession(hub: hub, fd: client).start()
            }
        } catch {
            listener.close()
            throw error
        }
    }

    public func start() { loop.start() }

    public func stop() {
        loop.stop()
        unlink(path)
        hub.stop()
    }
}
