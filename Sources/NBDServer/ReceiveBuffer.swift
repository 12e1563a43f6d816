import Glibc
import PmemSystem

/// A connection's input: one buffer filled by large `read(2)` calls so that many requests
/// (the kernel and libnbd pipeline up to 128 or more) are parsed per system call. After
/// STARTTLS the bytes come decrypted from the TLS session instead (see `Transport`).
/// Owned by the connection's reader thread only.
final class ReceiveBuffer {
    /// Plain until STARTTLS, which happens with nothing left buffered from before it.
    let transport: Transport
    /// The buffer's own mapping, unmapped with it (see `AnonymousRegion` for why not malloc).
    private let memory: AnonymousRegion
    let base: UnsafeMutableRawPointer
    let capacity: Int
    /// Unconsumed bytes are `[start, end)`.
    private(set) var start = 0
    private(set) var end = 0

    init(transport: Transport, capacity: Int) {
        self.transport = transport
        self.capacity = capacity
        memory = AnonymousRegion(byteCount: capacity)
        base = memory.base
    }

    @inline(__always) var available: Int { end - start }
    @inline(__always) var readPointer: UnsafeRawPointer { UnsafeRawPointer(base + start) }

    @inline(__always) func consume(_ n: Int) {
        start += n
        if start == end { start = 0; end = 0 }
    }

    /// One `read(2)` on the descriptor, or one TLS record's worth through the session.
    @inline(__always)
    private func readSome(into buffer: UnsafeMutableRawBufferPointer) throws(Errno) -> Int {
        try transport.receive(into: buffer)
    }

    /// Reads until at least `n` bytes are buffered (`n` ≤ capacity). Returns false at end of
    /// stream before that. Reads as much as the kernel has, to batch requests.
    func fill(atLeast n: Int) throws(Errno) -> Bool {
        precondition(n <= capacity)
        if available >= n { return true }
        if capacity - start < n {
            if available > 0 { memmove(base, base + start, available) }
            end = available
            start = 0
        }
        while available < n {
            let got = try readSome(into: UnsafeMutableRawBufferPointer(start: base + end, count: capacity - end))
            if got == 0 { return false }
            end += got
        }
        return true
    }

    /// Copies the next `n` buffered-or-read bytes into an array (handshake use).
    func take(_ n: Int) throws(Errno) -> [UInt8]? {
        guard try fill(atLeast: n) else { return nil }
        let bytes = [UInt8](UnsafeRawBufferPointer(start: readPointer, count: n))
        consume(n)
        return bytes
    }

    /// Reads and throws away `n` bytes of the stream (an oversized or rejected payload), so
    /// the next header is found where the client put it. False at end of stream.
    func discard(_ n: UInt64) throws(Errno) -> Bool {
        var left = n
        while left > 0 {
            if available == 0 {
                guard try fill(atLeast: 1) else { return false }
            }
            let k = Int(min(UInt64(available), left))
            consume(k)
            left -= UInt64(k)
        }
        return true
    }

    /// Moves `destination.count` bytes of the stream into `destination`: buffered bytes are
    /// copied, large remainders are read straight into the destination (no extra copy).
    func move(into destination: UnsafeMutableRawBufferPointer, nonTemporal: Bool,
              beforeBlocking: () -> Void, afterBlocking: () -> Void) throws(Errno) {
        var done = 0
        let total = destination.count
        while done < total {
            if available > 0 {
                let k = min(available, total - done)
                let dst = destination.baseAddress! + done
                if nonTemporal {
                    PersistentMemory.copyNonTemporal(to: dst, from: readPointer, count: k)
                } else {
                    dst.copyMemory(from: readPointer, byteCount: k)
                }
                consume(k)
                done += k
                continue
            }
            beforeBlocking()
            defer { afterBlocking() }
            let left = total - done
            // Large remainders go straight to the destination, except for persistent memory:
            // there a non-temporal copy from this (cache-hot) buffer beats writing back every
            // line the kernel stored.
            if left >= 64 * 1024 && !nonTemporal {
                let got = try readSome(into: UnsafeMutableRawBufferPointer(start: destination.baseAddress! + done, count: left))
                if got == 0 { throw Errno.connectionReset }
                done += got
            } else if !(try fill(atLeast: 1)) {
                throw Errno.connectionReset
            }
        }
    }

    /// Moves the next bytes of the stream into each of `vectors` in turn (the vectors are
    /// advanced as they fill): buffered bytes are copied, and once the buffer is empty a large
    /// remainder is read with `readv(2)` straight into the vectors, one system call for a
    /// payload scattered over many blocks. Persistent memory copies through the buffer, as
    /// `move(into:)` does. Returns the bytes moved (the vectors' total).
    @discardableResult
    func move(scatter vectors: UnsafeMutableBufferPointer<iovec>, nonTemporal: Bool,
              beforeBlocking: () -> Void, afterBlocking: () -> Void) throws(Errno) -> Int {
        var v = 0
        let count = vectors.count
        var left = 0
        for k in 0..<count { left += vectors[k].iov_len }
        let total = left
        while v < count {
            let len = vectors[v].iov_len
            if len == 0 { v += 1; continue }
            if available > 0 {
                let k = min(available, len)
                let dst = vectors[v].iov_base!
                if nonTemporal {
                    PersistentMemory.copyNonTemporal(to: dst, from: readPointer, count: k)
                } else {
                    dst.copyMemory(from: readPointer, byteCount: k)
                }
                consume(k)
                vectors[v].iov_base = dst + k
                vectors[v].iov_len = len - k
                left -= k
                continue
            }
            beforeBlocking()
            defer { afterBlocking() }
            if left >= 64 * 1024 && !nonTemporal {
                var got = try transport.receive(vectors: vectors.baseAddress! + v, count: count - v)
                if got == 0 { throw Errno.connectionReset }
                left -= got
                while got > 0 {
                    let n = min(got, vectors[v].iov_len)
                    vectors[v].iov_base = vectors[v].iov_base! + n
                    vectors[v].iov_len -= n
                    got -= n
                    if vectors[v].iov_len == 0 { v += 1 }
                }
            } else if !(try fill(atLeast: 1)) {
                throw Errno.connectionReset
            }
        }
        return total
    }
}
