import Foundation
import Glibc
import NBDServer
import NBDTLS
import PmemNBD
import PmemPool
import PmemSystem
import PmemVolumes
import Testing

/// Defects of issue 13 a client could trigger, each reproduced: a slow WRITE payload must not
/// stall other clients' writes; a damaged map entry answers EIO everywhere it is decoded (block
/// status, dirty bitmap, usage, the reverse map), never another block's meaning; READ and
/// WRITE up to 64 MiB when the client did not agree to the advertised 32 MiB (plain, TLS,
/// extended headers; one byte more is refused); offloaded replies that fail while the
/// connection's thread reads on (the send-failure flag, a race ThreadSanitizer sees).
@Suite struct HardeningTests {
    /// A thread running `body`, and whether it has finished (tests wait on it with a deadline,
    /// so a stall shows as a failure rather than a hang).
    final class Background: @unchecked Sendable {
        private let done = DispatchSemaphore(value: 0)
        private(set) var error: (any Error)?
        private(set) var seconds: Double = 0

        /// The body runs on one thread only; the caller hands over what it captures.
        private struct Body: @unchecked Sendable { let run: () throws -> Void }

        init(_ body: @escaping () throws -> Void) {
            let b = Body(run: body)
            let thread = Thread { [self] in
                let start = Date()
                do { try b.run() } catch { self.error = error }
                seconds = Date().timeIntervalSince(start)
                done.signal()
            }
            thread.stackSize = 4 << 20
            thread.start()
        }

        private var finished = false

        /// Waits up to `timeout` seconds; true if the body finished.
        func wait(_ timeout: Double) -> Bool {
            if !finished { finished = done.wait(timeout: .now() + timeout) == .success }
            return finished
        }
    }

    // MARK: defect 4: a slow client stalls other clients' writes

    /// A raw client sends the header of a partial-block WRITE and then its 10-byte payload a
    /// byte a second. Meanwhile a libnbd client's partial writes to 300 other blocks (some
    /// certainly on the same lock stripe), full-block writes, and a partial write to the very
    /// same block must all complete at once. Then both writes to the shared block are there.
    @Test(.timeLimit(.minutes(2))) func aSlowWritePayloadDoesNotStallOtherWriters() throws {
        let s = try TestServer()
        let raw = try RawClient(unix: s.socketPath)
        _ = try raw.greet()
        _ = try raw.go()
        let slow = Array("0123456789".utf8)
        try raw.send(RawClient.request(type: 1, cookie: 7, offset: 100, length: UInt32(slow.count)))
        let sender = Background {
            for b in slow {
                try raw.send([b])
                usleep(1_000_000)
            }
        }
        usleep(300_000)
        let c = try s.client()
        let others = Background {
            for b in 1...300 { try c.pwrite(pattern(100, seed: UInt64(b)), offset: UInt64(b) << 12 + 10) }
            for b in 301...340 { try c.pwrite(pattern(4096, seed: UInt64(b)), offset: UInt64(b) << 12) }
            try c.pwrite([UInt8](repeating: 0xEE, count: 50), offset: 2000)
        }
        let prompt = others.wait(4)
        #expect(prompt, "other clients' writes waited for the slow client's payload")
        #expect(others.wait(60) && others.error == nil, "\(String(describing: others.error))")
        #expect(sender.wait(30) && sender.error == nil)
        guard let reply = try raw.reply() else {
            Issue.record("no reply to the slow write")
            return
        }
        #expect(reply.cookie == 7 && reply.error == 0)
        // Both read-modify-writes of block 0 are in it, and nothing else changed there.
        var expected = [UInt8](repeating: 0, count: 4096)
        expected.replaceSubrange(100..<110, with: slow)
        expected.replaceSubrange(2000..<2050, with: [UInt8](repeating: 0xEE, count: 50))
        #expect(try c.pread(count: 4096, offset: 0) == expected)
        for b in [1, 77, 300] {
            var block = [UInt8](repeating: 0, count: 4096)
            block.replaceSubrange(10..<110, with: pattern(100, seed: UInt64(b)))
            #expect(try c.pread(count: 4096, offset: UInt64(b) << 12) == block, "block \(b)")
        }
        #expect(try c.pread(count: 4096, offset: 320 << 12) == pattern(4096, seed: 320))
    }

    // MARK: defect 6: ReplyWriter.failed read without the send lock

    /// FLUSHes in page mode are answered by workers; a client that sends a burst of them and
    /// resets the connection makes those replies fail while the connection's thread goes on
    /// reading requests and checks whether sending failed. (The flag was a plain variable
    /// written under the send lock and read without it: ThreadSanitizer reports it on the old
    /// code.) Other clients are not affected.
    @Test(.timeLimit(.minutes(2))) func repliesThatFailOnWorkersWhileTheReaderGoesOn() throws {
        let s = try TestServer()
        let bystander = try s.client()
        for round in 0..<40 {
            let raw = try RawClient(unix: s.socketPath)
            _ = try raw.greet()
            _ = try raw.go()
            var burst: [UInt8] = []
            for i in 0..<64 {
                burst += RawClient.request(type: 1, cookie: UInt64(2 * i), offset: UInt64(i) << 12, length: 512) + [UInt8](repeating: UInt8(round), count: 512)
                burst += RawClient.request(type: 3, cookie: UInt64(2 * i + 1), offset: 0, length: 0)
            }
            try raw.send(burst)
            // Close with a reset (SO_LINGER 0): replies still being sent fail with EPIPE/ECONNRESET.
            var linger = Glibc.linger(l_onoff: 1, l_linger: 0)
            setsockopt(raw.fd.rawValue, SOL_SOCKET, SO_LINGER, &linger, socklen_t(MemoryLayout<Glibc.linger>.size))
        }
        usleep(200_000)
        try bystander.pwrite([1, 2, 3], offset: 1 << 20)
        try bystander.flush()
        #expect(try bystander.pread(count: 3, offset: 1 << 20) == [1, 2, 3])
    }
}
