import CPmemSupport
import Glibc

/// An epoll instance watching descriptors for readability (`epoll_create1(EPOLL_CLOEXEC)`).
public struct Epoll: ~Copyable {
    public let fd: FileDescriptor

    public init() throws(Errno) {
        fd = FileDescriptor(rawValue: try retryOnInterrupt { pmem_epoll_create() })
    }

    deinit { fd.close() }

    /// `epoll_ctl(EPOLL_CTL_ADD, EPOLLIN)` with a caller-chosen token.
    public func add(_ watched: FileDescriptor, token: UInt64) throws(Errno) {
        _ = try retryOnInterrupt { pmem_epoll_add(fd.rawValue, watched.rawValue, token) }
    }

    /// `epoll_wait(2)`: the tokens of ready descriptors (empty on timeout).
    public func wait(timeoutMilliseconds: Int32 = -1) throws(Errno) -> [UInt64] {
        var tokens = [UInt64](repeating: 0, count: 16)
        let n = try retryOnInterrupt { tokens.withUnsafeMutableBufferPointer { pmem_epoll_wait(fd.rawValue, $0.baseAddress, 16, timeoutMilliseconds) } }
        return Array(tokens.prefix(Int(n)))
    }
}

/// An eventfd used to wake a thread blocked in `epoll_wait` (`eventfd(EFD_CLOEXEC|EFD_NONBLOCK)`).
public struct EventFD: Sendable {
    public let fd: FileDescriptor

    public init() throws(Errno) {
        fd = FileDescriptor(rawValue: try retryOnInterrupt { pmem_eventfd() })
    }

    /// Adds one to the counter, making the descriptor readable.
    public func signal() { _ = pmem_eventfd_signal(fd.rawValue) }

    public func close() { fd.close() }
}
