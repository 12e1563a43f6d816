import Glibc
import PmemSystem

/// Accepts connections on a set of listening sockets from one thread (`epoll_wait` over the
/// sockets and an eventfd that `stop()` signals).
final class Listener: @unchecked Sendable {
    let sockets: [FileDescriptor]
    let wake: EventFD
    unowned let server: Server
    private let done = WaitGroup()

    init(sockets: [FileDescriptor], server: Server) throws(Errno) {
        self.sockets = sockets
        self.wake = try EventFD()
        self.server = server
    }

    func start() {
        done.enter()
        OSThread.spawn(name: "nbd-accept") { [self] in
            defer { done.leave() }
            do { try loop() } catch { Log.error("accept loop: \(error)") }
        }
    }

    private func loop() throws(Errno) {
        let epoll = try Epoll()
        try epoll.add(wake.fd, token: UInt64.max)
        for (i, s) in sockets.enumerated() {
            try s.setNonBlocking(true)
            try epoll.add(s, token: UInt64(i))
        }
        while true {
            // Woken at least twice a second to disconnect handshakes past their deadline.
            let ready = try epoll.wait(timeoutMilliseconds: 500)
            server.expireHandshakes()
            for token in ready {
                if token == UInt64.max { return }
                let s = sockets[Int(token)]
                while true {
                    do {
                        let c = try Socket.accept(s)
                        try? c.setNonBlocking(false)
                        server.accepted(c, peer: peerName(c))
                    } catch {
                        if error == .wouldBlock { break }
                        if error.rawValue == EMFILE || error.rawValue == ENFILE {
                            Log.warning("accept: \(error); pausing")
                            usleep(100_000)
                            break
                        }
                        if error.rawValue == ECONNABORTED || error.rawValue == EPROTO { continue }
                        Log.warning("accept: \(error)")
                        break
                    }
                }
            }
        }
    }

    /// Stops accepting and closes the listening sockets.
    func stop() {
        wake.signal()
        done.wait(timeoutSeconds: 5)
        for s in sockets { s.close() }
        wake.close()
    }

    private func peerName(_ fd: FileDescriptor) -> String {
        var storage = sockaddr_storage()
        var len = socklen_t(MemoryLayout<sockaddr_storage>.size)
        let r = withUnsafeMutablePointer(to: &storage) { p in
            p.withMemoryRebound(to: sockaddr.self, capacity: 1) { getpeername(fd.rawValue, $0, &len) }
        }
        guard r == 0 else { return "unknown" }
        var host = [CChar](repeating: 0, count: Int(NI_MAXHOST))
        var serv = [CChar](repeating: 0, count: Int(NI_MAXSERV))
        if Int32(storage.ss_family) == AF_UNIX { return "unix socket" }
        let ok = withUnsafePointer(to: &storage) { p in
            p.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                getnameinfo($0, len, &host, socklen_t(host.count), &serv, socklen_t(serv.count), NI_NUMERICHOST | NI_NUMERICSERV)
            }
        }
        guard ok == 0 else { return "unknown" }
        func text(_ c: [CChar]) -> String { String(decoding: c.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self) }
        return text(host) + ":" + text(serv)
    }
}
