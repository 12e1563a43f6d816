import Glibc
import NBDTLS
import PmemSystem

/// A connection's byte stream, the one place that knows whether it is plain or TLS: reads and
/// writes go to the descriptors until STARTTLS succeeds, then through the TLS session (like
/// nbdkit swapping a connection's recv/send once). The receive buffer, the reply writer and
/// the handshake all send and receive through it.
///
/// The switch happens once, on the handshake thread, before any other thread sends (offloaded
/// commands start only in the transmission phase) and with nothing buffered from before it.
final class Transport: @unchecked Sendable {
    let input: FileDescriptor
    let output: FileDescriptor
    /// Set once, at STARTTLS.
    private var session: TLSSession?

    init(input: FileDescriptor, output: FileDescriptor) {
        self.input = input
        self.output = output
    }

    /// The stream goes through `session` from now on.
    func startTLS(_ session: TLSSession) {
        precondition(self.session == nil, "STARTTLS twice")
        self.session = session
    }

    var isTLS: Bool { session != nil }

    /// One `read(2)` on the input, or one TLS record's worth through the session.
    @inline(__always)
    func receive(into buffer: UnsafeMutableRawBufferPointer) throws(Errno) -> Int {
        if let session { return try session.receive(into: buffer) }
        return try input.read(into: buffer)
    }

    /// One `readv(2)` into the vectors, or one TLS record's worth into the first of them.
    @inline(__always)
    func receive(vectors: UnsafeMutablePointer<iovec>, count: Int) throws(Errno) -> Int {
        if let session { return try session.receive(into: UnsafeMutableRawBufferPointer(start: vectors[0].iov_base, count: vectors[0].iov_len)) }
        return try input.read(vectors: vectors, count: min(count, ReplyWriter.iovMax))
    }

    /// Sends all of `bytes` (handshake replies).
    func send(_ bytes: [UInt8]) throws(Errno) {
        if let session { return try session.send(bytes) }
        try output.writeAll(bytes: bytes)
    }

    /// Sends all of the iovecs (they may be advanced over partial writes). False if the peer
    /// is gone.
    @inline(__always)
    func send(_ vec: UnsafeMutablePointer<iovec>, _ count: Int) -> Bool {
        guard let session else { return writeAll(vec, count) }
        do { try session.send(vec, count) } catch { return false }
        return true
    }

    /// `writev(2)` until every byte is out, advancing over partial writes.
    private func writeAll(_ vec: UnsafeMutablePointer<iovec>, _ count: Int) -> Bool {
        var v = vec
        var n = count
        while n > 0 {
            let w = Glibc.writev(output.rawValue, v, Int32(min(n, ReplyWriter.iovMax)))
            if w < 0 {
                if errno == EINTR { continue }
                return false
            }
            var left = w
            while n > 0 && left >= v.pointee.iov_len {
                left -= v.pointee.iov_len
                v += 1
                n -= 1
            }
            if n > 0 && left > 0 {
                v.pointee.iov_base += left
                v.pointee.iov_len -= left
            }
        }
        return true
    }

    /// Ends TLS in order (close_notify), waiting at most 5 s for room in the socket (a client
    /// that stopped reading must not hold the thread). Nothing for a plain stream. Only when
    /// no other thread sends any more.
    func closeTLS() {
        guard let session else { return }
        var tv = timeval(tv_sec: 5, tv_usec: 0)
        setsockopt(output.rawValue, SOL_SOCKET, SO_SNDTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
        session.bye()
    }
}
