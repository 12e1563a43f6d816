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
