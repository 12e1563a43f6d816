import Foundation
import Glibc
import PmemSystem
import Testing

/// Connection churn against a `pmem-nbd serve` process (a crash is then a failed test, not a
/// dead test runner): clients that close at once, send garbage, a 1 GiB option header, stop
/// mid-handshake or mid-WRITE, or reset while replies are queued, with bursts of half-open
/// connections that all close together — while a libnbd client writes and verifies. The
/// server must stay up, the verifying client see no error and no wrong byte, and SIGTERM stop
/// it cleanly. (Issue 13, defect 1: the accept thread named each new thread through its
/// `pthread_t` after `pthread_create` returned; a detached connection thread that had already
/// ended, its stack unmapped, made that a SIGSEGV.)
@Suite(.serialized, .timeLimit(.minutes(5))) struct ChurnTests {
    /// A generator with state of its own per thread (SystemRandomNumberGenerator has no
    /// storage: ThreadSanitizer sees every thread's `inout` use of it at one address).
    struct XorShift: RandomNumberGenerator {
        var state: UInt64
        init() { state = UInt64.random(in: 1...UInt64.max) }
        mutating func next() -> UInt64 {
            state ^= state << 13
            state ^= state >> 7
            state ^= state << 17
            return state
        }
    }

    /// One kind of misbehaving client per call, chosen by `kind`.
    static func misbehave(_ socket: String, kind: Int, held: inout [RawClient], rng: inout some RandomNumberGenerator) {
        guard let raw = try? RawClient(unix: socket) else { return }
        var tv = timeval(tv_sec: 2, tv_usec: 0)
        setsockopt(raw.fd.rawValue, SOL_SOCKET, SO_RCVTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
        switch kind {
        case 0:
            break // close at once
        case 1:
            _ = try? raw.receive(18)
        case 2:
            try? raw.send((0..<Int.random(in: 1...300, using: &rng)).map { _ in UInt8.random(in: 0...255, using: &rng) })
        case 3:
            _ = try? raw.greet()
            try? raw.send(RawClient.be(UInt64(0x4948_4156_454F_5054)) + RawClient.be(UInt32(1)) + RawClient.be(UInt32(1 << 30)))
        case 4:
            // Half-open: greeted, half an option sent, then silence (closed with the burst).
            _ = try? raw.greet()
            try? raw.send(RawClient.be(UInt64(0x4948_4156_454F_5054)) + [0, 0])
            held.append(raw)
        case 5:
            // Mid-WRITE: the header and part of the payload.
            guard (try? raw.greet()) != nil, (try? raw.go()) != nil else { return }
            try? raw.send(RawClient.request(type: 1, cookie: 1, offset: 4096, length: 65536) + [UInt8](repeating: 1, count: 1000))
        default:
            // Replies queued, then a reset.
            guard (try? raw.greet()) != nil, (try? raw.go()) != nil else { return }
            var burst: [UInt8] = []
            for i in 0..<32 { burst += RawClient.request(type: 0, cookie: UInt64(i), offset: UInt64(i) << 16, length: 65536) }
            try? raw.send(burst)
            var linger = Glibc.linger(l_onoff: 1, l_linger: 0)
            setsockopt(raw.fd.rawValue, SOL_SOCKET, SO_LINGER, &linger, socklen_t(MemoryLayout<Glibc.linger>.size))
        }
    }

    @Test(.timeLimit(.minutes(3))) func connectionChurnBesideAVerifyingClient() throws {
        // The clients write to sockets the server closes: EPIPE, not the end of the test runner.
        signal(SIGPIPE, SIG_IGN)
        let d = ScratchDirectory()
        let socket = d.file("s.sock")
        // No cache of thread stacks in the server: a thread's stack is unmapped as soon as another
        // thread starts or ends after it ended, so touching the `pthread_t` of an ended thread
        // (defect 1) faults at once instead of once in a while.
        let server = try ServerProcess(["serve", d.file("pool"), "--create", "96M", "-U", socket, "--control", "none", "--feed", "none"],
                                       environment: ["GLIBC_TUNABLES": "glibc.pthread.stack_cache_size=0"])
        #expect(server.waitForSocket(socket), "server did not start: \(server.stderrText)")
        let verifier = try connectWhenReady(socket)

        final class Shared: @unchecked Sendable {
            let stop = Locked(false)
            let churned = Locked(0)
        }
        let shared = Shared()
        let workers = 4
        let group = DispatchGroup()
        for w in 0..<workers {
            group.enter()
            Thread {
                defer { group.leave() }
                var rng = XorShift()
                var held: [RawClient] = []
                var n = 0
                while !shared.stop.withLock({ $0 }) {
                    Self.misbehave(socket, kind: Int.random(in: 0...6, using: &rng), held: &held, rng: &rng)
                    n += 1
                    // Bursts: up to 20 half-open connections per worker, then all closed together
                    // (many connection threads ending at once, their stacks released together).
                    if held.count >= 20 || (n % 97 == 0) { held.removeAll() }
                }
                held.removeAll()
                shared.churned.withLock { $0 += n }
                _ = w
            }.start()
        }
        // The verifying client: writes a pattern to a block of its own region and reads it back.
        var verified = 0, failures: [String] = []
        let deadline = Date().addingTimeInterval(8)
        var rng = XorShift()
        while Date() < deadline {
            let block = UInt64.random(in: 0..<1024, using: &rng)
            let seed = UInt64.random(in: 0..<UInt64.max, using: &rng)
            do {
                try verifier.pwrite(pattern(4096, seed: seed), offset: (16 << 20) + block << 12)
                if try verifier.pread(count: 4096, offset: (16 << 20) + block << 12) != pattern(4096, seed: seed) {
                    failures.append("block \(block): wrong data")
                }
                verified += 1
            } catch {
                failures.append("\(error)")
                break
            }
        }
        shared.stop.withLock { $0 = true }
        #expect(group.wait(timeout: .now() + 60) == .success, "churn workers did not stop")
        let churned = shared.churned.withLock { $0 }
        print("churn: \(churned) misbehaving connections, \(verified) verified writes")
        #expect(failures.isEmpty, "verifying client: \(failures.prefix(5))")
        #expect(verified > 50)
        #expect(churned > 500, "the churn ran")
        #expect(server.process.isRunning, "the server died: \(server.stderrText)")
        try? verifier.shutdown()
        let status = server.stop()
        let stderr = server.stderrText
        #expect(status == 0, "exit status \(status): \(stderr)")
        #expect(!stderr.contains("Fatal") && !stderr.contains("Sanitizer"), "\(stderr)")
    }
}
