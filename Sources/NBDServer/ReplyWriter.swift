import Glibc
import NBDWire
import PmemSystem
import Synchronization

/// Gathers a batch of replies as an iovec list — headers in a small arena, read data as
/// pointers straight into pool memory — and sends it with one `writev(2)`.
///
/// One lock serialises the byte stream: the reader thread holds it from the first reply it
/// queues until the batch is sent, so a reply split over several `writev` calls is never
/// interleaved with a reply a worker sends for an offloaded command.
///
/// After STARTTLS the same iovecs go through the TLS session instead of `writev` (see `Transport`).
final class ReplyWriter: @unchecked Sendable {
    /// Plain or TLS; switched by the handshake thread before any other thread sends.
    let transport: Transport
    /// The arena, then the iovecs, in a mapping of their own, unmapped with the writer (see
    /// `AnonymousRegion` for why not malloc).
    private let memory: AnonymousRegion
    private let iov: UnsafeMutablePointer<iovec>
    private let iovCapacity = ReplyWriter.iovMax
    private var iovCount = 0
    private let arena: UnsafeMutableRawPointer
    private let arenaCapacity = 64 * 1024
    private var arenaUsed = 0
    /// Serialises the byte stream (see above).
    private let mutex = PosixMutex()
    private var holding = false
    /// Set once a send fails: the peer is gone, later sends are dropped. Written under the
    /// stream's lock (by the reader thread or a worker), read without it by the reader thread.
    private let sendFailed = Atomic<Bool>(false)
    var failed: Bool { sendFailed.load(ordering: .acquiring) }

    /// IOV_MAX on Linux.
    static let iovMax = 1024
    /// Zeroes for holes in simple replies and DF reads (never written).
    nonisolated(unsafe) static let zeroes: UnsafeRawPointer = UnsafeRawPointer(calloc(1, zeroesSize)!)
    static let zeroesSize = 1 << 20

    init(transport: Transport) {
        self.transport = transport
        memory = AnonymousRegion(byteCount: arenaCapacity + ReplyWriter.iovMax * MemoryLayout<iovec>.stride)
        arena = memory.base
        iov = (memory.base + arenaCapacity).bindMemory(to: iovec.self, capacity: ReplyWriter.iovMax)
    }

    @inline(__always) private func acquireForBatch() {
        if !holding {
            mutex.lock()
            holding = true
        }
    }

    /// Reserves `n` bytes of header space and queues them; returns where to encode.
    @inline(__always)
    func header(_ n: Int) -> UnsafeMutableRawPointer {
        acquireForBatch()
        if arenaUsed + n > arenaCapacity || iovCount == iovCapacity { send(keepLock: true) }
        let p = arena + arenaUsed
        arenaUsed += n
        // Extend the previous iovec when it ends where this header starts.
        if iovCount > 0, iov[iovCount - 1].iov_base + iov[iovCount - 1].iov_len == UnsafeMutableRawPointer(p) {
            iov[iovCount - 1].iov_len += n
        } else {
            iov[iovCount] = iovec(iov_base: p, iov_len: n)
            iovCount += 1
        }
        return p
    }

    /// Queues bytes that stay valid until the batch is sent (pool memory, zeroes).
    @inline(__always)
    func data(_ p: UnsafeRawPointer, _ n: Int) {
        acquireForBatch()
        if n == 0 { return }
        if iovCount == iovCapacity { send(keepLock: true) }
        iov[iovCount] = iovec(iov_base: UnsafeMutableRawPointer(mutating: p), iov_len: n)
        iovCount += 1
    }

    /// Queues `n` zero bytes.
    func zeroes(_ n: Int) {
        var left = n
        while left > 0 {
            let k = min(left, ReplyWriter.zeroesSize)
            data(ReplyWriter.zeroes, k)
            left -= k
        }
    }

    /// Queues bytes copied into the arena (error messages).
    func copy(_ bytes: [UInt8]) {
        var at = 0
        while at < bytes.count {
            let k = min(bytes.count - at, 4096)
            let p = header(k)
            bytes.withUnsafeBytes { p.copyMemory(from: $0.baseAddress! + at, byteCount: k) }
            at += k
        }
    }

    /// Sends everything queued and releases the stream.
    func flush() {
        guard holding else { return }
        send(keepLock: false)
    }

    private func send(keepLock: Bool) {
        if iovCount > 0 && !failed {
            if !sendAll(iov, iovCount) { sendFailed.store(true, ordering: .releasing) }
        }
        iovCount = 0
        arenaUsed = 0
        if !keepLock {
            holding = false
            mutex.unlock()
        }
    }

    /// Sends a complete reply from another thread (offloaded commands).
    func sendNow(_ bytes: [UInt8]) {
        mutex.lock()
        defer { mutex.unlock() }
        guard !failed else { return }
        bytes.withUnsafeBytes { b in
            var v = iovec(iov_base: UnsafeMutableRawPointer(mutating: b.baseAddress!), iov_len: b.count)
            if !sendAll(&v, 1) { sendFailed.store(true, ordering: .releasing) }
        }
    }

    /// Sends the iovecs through the transport. False if the peer is gone.
    @inline(__always)
    private func sendAll(_ vec: UnsafeMutablePointer<iovec>, _ count: Int) -> Bool { transport.send(vec, count) }
}
