import Dispatch
import Glibc
@testable import NBDServer
import PmemSystem
@testable import TestSupport
import Testing

/// A write's payload scattered over blocks that do not follow each other (free space after
/// random writes): `ReceiveBuffer.move(scatter:)` puts every byte where its vector says, whether
/// it was buffered already, comes in with one `readv(2)`, or trickles in from a slow client.
@Suite(.timeLimit(.minutes(2))) struct ScatterReceiveTests {
    /// Vectors of random sizes (zero-length, partial and whole blocks, runs) at shuffled places
    /// in `arena`, in payload order; returns them and their total.
    static func vectors(in arena: UnsafeMutableRawBufferPointer, seed: UInt64) -> ([iovec], Int) {
        var rng = SplitMix64(seed: seed)
        let blocks = arena.count / 4096
        var order = Array(0..<blocks)
        for i in stride(from: blocks - 1, to: 0, by: -1) { order.swapAt(i, Int(rng.next() % UInt64(i + 1))) }
        var result: [iovec] = []
        var total = 0
        for b in order {
            let base = arena.baseAddress! + b * 4096
            switch rng.next() % 5 {
            case 0: result.append(iovec(iov_base: base, iov_len: 0))
            case 1:
                let head = Int(rng.next() % 4096)
                result.append(iovec(iov_base: base + head, iov_len: 4096 - head))
                total += 4096 - head
            default:
                result.append(iovec(iov_base: base, iov_len: 4096))
                total += 4096
            }
        }
        return (result, total)
    }

    @Test(arguments: [(false, false), (true, false), (false, true), (true, true)])
    func payloadLandsWhereEachVectorSays(nonTemporal: Bool, slowClient: Bool) throws {
        // A receiver that fails early closes its end: the sender then gets EPIPE, not a signal.
        signal(SIGPIPE, SIG_IGN)
        let (a, b) = try Socket.pair()
        defer { a.close() }
        let header = 28
        let arenaSize = 1 << 20
        let arena = UnsafeMutableRawBufferPointer.allocate(byteCount: arenaSize, alignment: 4096)
        defer { arena.deallocate() }
        memset(arena.baseAddress!, 0xEE, arenaSize)
        var (vecs, total) = ScatterReceiveTests.vectors(in: arena, seed: slowClient ? 7 : 3)
        let expected = vecs.map { $0 }
        let payload = pattern(header + total, seed: 11)
        let done = DispatchSemaphore(value: 0)
        OSThread.spawn(name: "scatter-sender") {
            var rng = SplitMix64(seed: 5)
            var sent = 0
            payload.withUnsafeBytes { bytes in
                while sent < bytes.count {
                    let n = min(bytes.count - sent, slowClient ? 1 + Int(rng.next() % 9000) : 200_000)
                    let w = try? b.write(UnsafeRawBufferPointer(rebasing: bytes[sent..<(sent + n)]))
                    guard let w, w > 0 else { break }
                    sent += w
                    if slowClient && rng.next() % 4 == 0 { usleep(200) }
                }
            }
            b.close()
            done.signal()
        }
        let receive = ReceiveBuffer(transport: Transport(input: a, output: a), capacity: 64 * 1024)
        // The header and whatever came with it are buffered first, as the request loop does.
        #expect(try receive.fill(atLeast: header))
        receive.consume(header)
        var blocked = 0
        try vecs.withUnsafeMutableBufferPointer { v in
            try receive.move(scatter: v, nonTemporal: nonTemporal, beforeBlocking: { blocked += 1 }, afterBlocking: {})
        }
        done.wait()
        var offset = header
        var wrong = 0
        for v in expected where v.iov_len > 0 {
            let got = UnsafeRawBufferPointer(start: v.iov_base, count: v.iov_len)
            if !got.elementsEqual(payload[offset..<(offset + v.iov_len)]) { wrong += 1 }
            offset += v.iov_len
        }
        #expect(wrong == 0, "\(wrong) of \(expected.count) vectors hold the wrong bytes")
        #expect(offset == payload.count)
        #expect(vecs.allSatisfy { $0.iov_len == 0 }, "every vector is advanced to its end")
        #expect(blocked > 0, "the payload did not all come buffered (nothing was read into the vectors)")
        // Negative control: the check above tells two vectors' contents apart.
        let first = expected.first { $0.iov_len == 4096 }!, second = expected.last { $0.iov_len == 4096 }!
        #expect(memcmp(first.iov_base, second.iov_base, 4096) != 0)
    }

    @Test func aClientThatVanishesMidPayloadIsAReset() throws {
        let (a, b) = try Socket.pair()
        defer { a.close() }
        let arena = UnsafeMutableRawBufferPointer.allocate(byteCount: 256 << 10, alignment: 4096)
        defer { arena.deallocate() }
        var (vecs, total) = ScatterReceiveTests.vectors(in: arena, seed: 9)
        // Less than the socket's buffer holds: nothing reads it before the close.
        let sent = pattern(min(total / 2, 16 * 1024), seed: 1)
        #expect(total > 64 * 1024, "the payload is large enough to be read with readv")
        try sent.withUnsafeBytes { try b.writeAll($0) }
        b.close()
        let receive = ReceiveBuffer(transport: Transport(input: a, output: a), capacity: 64 * 1024)
        #expect(throws: Errno.connectionReset) {
            try vecs.withUnsafeMutableBufferPointer { v in
                try receive.move(scatter: v, nonTemporal: false, beforeBlocking: {}, afterBlocking: {})
            }
        }
    }
}
