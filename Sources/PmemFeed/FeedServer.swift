import Glibc
import PmemSystem

/// Accepts feed subscribers on a Unix socket (mode 0600; only root and the server's user).
public final class FeedServer: @unchecked Sendable {
    public let path: String
    let hub: FeedHub
    let listener: FileDescriptor
    private let wake: EventFD

    public init(path: String, hub: FeedHub) throws {
        self.path = path
        self.hub = hub
        listener = try Socket.listenUnix(path: path, backlog: 64)
        chmod(path, 0o600)
        wake = try EventFD()
    }

    public func start() {
        OSThread.spawn(name: "pmem-feed") { [self] in
            do { try acceptLoop() } catch { Log.error("feed socket: \(error)") }
        }
    }

    public func stop() {
        wake.signal()
        Socket.shutdown(listener)
        unlink(path)
        hub.stop()
    }

    private func acceptLoop() throws(Errno) {
        let epoll = try Epoll()
        try epoll.add(listener, token: 0)
        try epoll.add(wake.fd, token: 1)
        while true {
            let ready = try epoll.wait()
            if ready.contains(1) { return }
            guard let client = try? Socket.accept(listener) else { continue }
            var uid: UInt32 = 0
            var pid: Int32 = 0
            if pmem_peer_credentials(client.rawValue, &uid, &pid) != 0 || (uid != 0 && uid != getuid()) {
                Log.warning("feed socket: refusing uid \(uid)")
                client.close()
                continue
            }
            FeedSession(hub: hub, fd: client).start()
        }
    }
}

import CPmemSupport
