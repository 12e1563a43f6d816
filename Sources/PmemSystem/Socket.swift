import CPmemSupport
import Glibc

/// Socket system calls over `FileDescriptor`.
public enum Socket {
    /// `socket(AF_UNIX, SOCK_STREAM)`, `bind(2)` and `listen(2)` on a path. An existing
    /// socket file at the path is replaced only if nothing answers on it.
    public static func listenUnix(path: String, backlog: Int32 = 128) throws(Errno) -> FileDescriptor {
        if path.utf8.count >= MemoryLayout.size(ofValue: sockaddr_un().sun_path) { throw Errno(rawValue: ENAMETOOLONG) }
        if (try? connectUnix(path: path))?.close() != nil { throw Errno.exists }
        unlink(path)
        let fd = try retryOnInterrupt { Glibc.socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0) }
        let sock = FileDescriptor(rawValue: fd)
        do {
            var addr = unixAddress(path)
            _ = try retryOnInterrupt {
                withUnsafePointer(to: &addr) { p in
                    p.withMemoryRebound(to: sockaddr.self, capacity: 1) { Glibc.bind(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
                }
            }
            _ = try retryOnInterrupt { Glibc.listen(fd, backlog) }
        } catch {
            sock.close()
            throw error
        }
        return sock
    }

    /// `connect(2)` to a Unix socket path.
    public static func connectUnix(path: String) throws(Errno) -> FileDescriptor {
        let fd = try retryOnInterrupt { Glibc.socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0) }
        var addr = unixAddress(path)
        let r = withUnsafePointer(to: &addr) { p in
            p.withMemoryRebound(to: sockaddr.self, capacity: 1) { Glibc.connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        if r != 0 {
            let e = Errno.current
            Glibc.close(fd)
            throw e
        }
        return FileDescriptor(rawValue: fd)
    }

    /// TCP listening sockets for a host (numeric or name) and port, one per resolved address.
    public static func listenTCP(host: String, port: UInt16, backlog: Int32 = 128) throws(Errno) -> [FileDescriptor] {
        var hints = addrinfo()
        hints.ai_family = AF_UNSPEC
        hints.ai_socktype = Int32(SOCK_STREAM.rawValue)
        hints.ai_flags = AI_PASSIVE | AI_ADDRCONFIG
        var res: UnsafeMutablePointer<addrinfo>?
        let rc = getaddrinfo(host.isEmpty ? nil : host, String(port), &hints, &res)
        if rc != 0 { throw Errno(rawValue: rc == EAI_SYSTEM ? Glibc.errno : EADDRNOTAVAIL) }
        defer { freeaddrinfo(res) }
        var fds: [FileDescriptor] = []
        var lastError = Errno(rawValue: EADDRNOTAVAIL)
        var p = res
        while let ai = p {
            p = ai.pointee.ai_next
            let fd = Glibc.socket(ai.pointee.ai_family, ai.pointee.ai_socktype | Int32(SOCK_CLOEXEC.rawValue), ai.pointee.ai_protocol)
            if fd < 0 { lastError = .current; continue }
            var one: Int32 = 1
            setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, socklen_t(MemoryLayout<Int32>.size))
            if ai.pointee.ai_family == AF_INET6 {
                setsockopt(fd, Int32(IPPROTO_IPV6), IPV6_V6ONLY, &one, socklen_t(MemoryLayout<Int32>.size))
            }
            if Glibc.bind(fd, ai.pointee.ai_addr, ai.pointee.ai_addrlen) != 0 || Glibc.listen(fd, backlog) != 0 {
                lastError = .current
                Glibc.close(fd)
                continue
            }
            fds.append(FileDescriptor(rawValue: fd))
        }
        if fds.isEmpty { throw lastError }
        return fds
    }

    /// `connect(2)` over TCP to a numeric or named host.
    public static func connectTCP(host: String, port: UInt16) throws(Errno) -> FileDescriptor {
        var hints = addrinfo()
        hints.ai_family = AF_UNSPEC
        hints.ai_socktype = Int32(SOCK_STREAM.rawValue)
        var res: UnsafeMutablePointer<addrinfo>?
        if getaddrinfo(host, String(port), &hints, &res) != 0 { throw Errno(rawValue: EHOSTUNREACH) }
        defer { freeaddrinfo(res) }
        var lastError = Errno(rawValue: ECONNREFUSED)
        var p = res
        while let ai = p {
            p = ai.pointee.ai_next
            let fd = Glibc.socket(ai.pointee.ai_family, ai.pointee.ai_socktype | Int32(SOCK_CLOEXEC.rawValue), ai.pointee.ai_protocol)
            if fd < 0 { lastError = .current; continue }
            if Glibc.connect(fd, ai.pointee.ai_addr, ai.pointee.ai_addrlen) == 0 {
                _ = pmem_tcp_nodelay(fd)
                return FileDescriptor(rawValue: fd)
            }
            lastError = .current
            Glibc.close(fd)
        }
        throw lastError
    }

    /// The port a listening socket is bound to (for `--port 0`).
    public static func boundPort(_ fd: FileDescriptor) -> UInt16? {
        if case .inet(_, let port) = localAddress(fd) { return port }
        return nil
    }

    /// The local address of a socket.
    public enum LocalAddress: Equatable, Sendable {
        /// A Unix socket's path (empty for an unnamed or abstract socket).
        case unix(String)
        /// A numeric IPv4 or IPv6 host and a port.
        case inet(host: String, port: UInt16)
    }

    /// `getsockname(2)`, decoded (`getnameinfo(NI_NUMERICHOST)` for addresses); nil for other
    /// families or on error.
    public static func localAddress(_ fd: FileDescriptor) -> LocalAddress? {
        var storage = sockaddr_storage()
        var len = socklen_t(MemoryLayout<sockaddr_storage>.size)
        let r = withUnsafeMutablePointer(to: &storage) { p in
            p.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(fd.rawValue, $0, &len) }
        }
        guard r == 0 else { return nil }
        switch Int32(storage.ss_family) {
        case AF_UNIX:
            return withUnsafePointer(to: &storage) { p in
                p.withMemoryRebound(to: sockaddr_un.self, capacity: 1) { un in
                    withUnsafeBytes(of: un.pointee.sun_path) { bytes in
                        let pathLength = min(bytes.count, max(0, Int(len) - MemoryLayout<sa_family_t>.size))
                        let path = bytes.prefix(pathLength)
                        if path.first == 0 { return .unix("") }
                        return .unix(String(decoding: path.prefix { $0 != 0 }, as: UTF8.self))
                    }
                }
            }
        case AF_INET, AF_INET6:
            var host = [CChar](repeating: 0, count: Int(NI_MAXHOST))
            let ok = withUnsafePointer(to: &storage) { p in
                p.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                    getnameinfo($0, len, &host, socklen_t(host.count), nil, 0, NI_NUMERICHOST)
                }
            }
            let inet4 = Int32(storage.ss_family) == AF_INET
            let port = withUnsafePointer(to: &storage) { p -> UInt16 in
                inet4
                    ? p.withMemoryRebound(to: sockaddr_in.self, capacity: 1) { UInt16(bigEndian: $0.pointee.sin_port) }
                    : p.withMemoryRebound(to: sockaddr_in6.self, capacity: 1) { UInt16(bigEndian: $0.pointee.sin6_port) }
            }
            guard ok == 0 else { return nil }
            return .inet(host: String(decoding: host.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self), port: port)
        default:
            return nil
        }
    }

    /// Sets `SO_RCVTIMEO` and `SO_SNDTIMEO` (0 for none).
    public static func setTimeouts(_ fd: FileDescriptor, seconds: Int) {
        var tv = timeval(tv_sec: seconds, tv_usec: 0)
        setsockopt(fd.rawValue, SOL_SOCKET, SO_RCVTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
        setsockopt(fd.rawValue, SOL_SOCKET, SO_SNDTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
    }

    /// Whether a descriptor is a socket of type SOCK_STREAM that is listening (`SO_ACCEPTCONN`).
    public static func isListening(_ fd: FileDescriptor) -> Bool {
        var v: Int32 = 0
        var len = socklen_t(MemoryLayout<Int32>.size)
        return getsockopt(fd.rawValue, SOL_SOCKET, SO_ACCEPTCONN, &v, &len) == 0 && v != 0
    }

    /// `accept4(SOCK_CLOEXEC)`.
    public static func accept(_ fd: FileDescriptor) throws(Errno) -> FileDescriptor {
        let c = try retryOnInterrupt { pmem_accept(fd.rawValue) }
        return FileDescriptor(rawValue: c)
    }

    /// `shutdown(2)`.
    public static func shutdown(_ fd: FileDescriptor, read: Bool = true, write: Bool = true) {
        let how: Int32 = read && write ? Int32(SHUT_RDWR) : (read ? Int32(SHUT_RD) : Int32(SHUT_WR))
        _ = Glibc.shutdown(fd.rawValue, how)
    }

    /// Sets TCP_NODELAY where the descriptor is a TCP socket (ignored elsewhere).
    public static func setNoDelay(_ fd: FileDescriptor) { _ = pmem_tcp_nodelay(fd.rawValue) }

    /// The peer of a connected socket for log messages (`getpeername(2)`): "host:port"
    /// (numeric, `getnameinfo`), "unix socket", or "unknown".
    public static func peerName(_ fd: FileDescriptor) -> String {
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

    /// The peer of a Unix socket (`getsockopt(SO_PEERCRED)`); nil on error.
    public static func peerCredentials(_ fd: FileDescriptor) -> (uid: UInt32, pid: Int32)? {
        var uid: UInt32 = 0
        var pid: Int32 = 0
        guard pmem_peer_credentials(fd.rawValue, &uid, &pid) == 0 else { return nil }
        return (uid, pid)
    }

    /// `sendmsg(2)` with `MSG_NOSIGNAL` of one buffer, with up to 4 descriptors attached
    /// (`SCM_RIGHTS`; more are left out): the number of bytes sent, which may be short.
    public static func send(_ fd: FileDescriptor, _ bytes: UnsafeRawBufferPointer, descriptors: [FileDescriptor] = []) throws(Errno) -> Int {
        let raw = descriptors.map(\.rawValue)
        return try retryOnInterrupt {
            raw.withUnsafeBufferPointer { f in pmem_send_with_fds(fd.rawValue, bytes.baseAddress, bytes.count, f.baseAddress, Int32(f.count)) }
        }
    }

    /// `recvmsg(2)` with `MSG_CMSG_CLOEXEC` into a buffer, taking up to `maxDescriptors`
    /// (at most 4) descriptors passed with it (`SCM_RIGHTS`; any beyond are closed): the
    /// number of bytes received (0 at the end of the stream) and the descriptors, which the
    /// caller owns.
    public static func receive(_ fd: FileDescriptor, into buffer: UnsafeMutableRawBufferPointer,
                               maxDescriptors: Int = 4) throws(Errno) -> (count: Int, descriptors: [FileDescriptor]) {
        var fds = [Int32](repeating: -1, count: max(0, min(4, maxDescriptors)))
        var nfds: Int32 = 0
        let n = try retryOnInterrupt {
            fds.withUnsafeMutableBufferPointer { f in
                pmem_recv_with_fds(fd.rawValue, buffer.baseAddress, buffer.count, f.baseAddress, Int32(f.count), &nfds)
            }
        }
        return (n, fds.prefix(Int(nfds)).map { FileDescriptor(rawValue: $0) })
    }

    /// `socketpair(AF_UNIX, SOCK_STREAM)`.
    public static func pair() throws(Errno) -> (FileDescriptor, FileDescriptor) {
        var fds: [Int32] = [0, 0]
        _ = try retryOnInterrupt { socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0, &fds) }
        return (FileDescriptor(rawValue: fds[0]), FileDescriptor(rawValue: fds[1]))
    }

    private static func unixAddress(_ path: String) -> sockaddr_un {
        var addr = sockaddr_un()
        addr.sun_family = sa_family_t(AF_UNIX)
        withUnsafeMutableBytes(of: &addr.sun_path) { dst in
            let bytes = Array(path.utf8)
            for i in 0..<min(bytes.count, dst.count - 1) { dst[i] = bytes[i] }
        }
        return addr
    }
}
