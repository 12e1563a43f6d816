import Foundation
import Glibc
import PmemSystem
@testable import TestSupport
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

    /// A process's anonymous resident memory in KiB (`RssAnon` in /proc/PID/status).
    static func rssAnon(_ pid: Int32) -> Int? { statusField("RssAnon:", pid) }

    /// A KiB figure of /proc/PID/status.
    static func statusField(_ name: String, _ pid: Int32) -> Int? {
        guard let status = try? String(contentsOfFile: "/proc/\(pid)/status", encoding: .utf8),
              let line = status.split(separator: "\n").first(where: { $0.hasPrefix(name) }) else { return nil }
        return line.split(separator: " ").dropFirst().first.flatMap { Int($0) }
    }

    /// The number of threads of a process.
    static func threadCount(_ pid: Int32) -> Int {
        (try? FileManager.default.contentsOfDirectory(atPath: "/proc/\(pid)/task").count) ?? 0
    }

    /// Rounds of 1,000 connections alive at once — half past the greeting, half negotiated —
    /// all closed together, and the server's anonymous memory after each round once its
    /// connection threads have ended: it must level off. Each connection's 256 KiB receive
    /// buffer and 80 KiB reply arena came from malloc's heaps, where the thousand freed blocks
    /// stayed and the pages each round touched in them stayed resident, other pages each round:
    /// +10-13 MiB a round without end (Docs/RELIABILITY.md, "The long run"; issue 13).
    @Test(.timeLimit(.minutes(2))) func concurrentConnectionsLeaveNoMemoryBehind() throws {
        signal(SIGPIPE, SIG_IGN)
        // Descriptors for a thousand clients here and in the server (which inherits the limit).
        var limit = rlimit()
        getrlimit(__rlimit_resource_t(RLIMIT_NOFILE.rawValue), &limit)
        let want = min(limit.rlim_max, 8192)
        if limit.rlim_cur < want {
            limit.rlim_cur = want
            setrlimit(__rlimit_resource_t(RLIMIT_NOFILE.rawValue), &limit)
            getrlimit(__rlimit_resource_t(RLIMIT_NOFILE.rawValue), &limit)
        }
        let clients = min(1000, Int(limit.rlim_cur) / 2 - 100)
        #expect(clients >= 400, "RLIMIT_NOFILE \(limit.rlim_cur) leaves room for \(clients) clients only")
        let d = ScratchDirectory()
        let socket = d.file("s.sock")
        let server = try ServerProcess(["serve", d.file("pool"), "--create", "64M", "-U", socket, "--control", "none", "--feed", "none",
                                        "--max-connections", "0"])
        #expect(server.waitForSocket(socket), "server did not start: \(server.stderrText)")
        usleep(300_000)
        let idleThreads = Self.threadCount(server.pid)
        var after: [Int] = []
        for round in 0..<6 {
            var held: [RawClient] = []
            for i in 0..<clients {
                let raw = try RawClient(unix: socket)
                _ = try raw.greet()
                if i % 2 == 1 { _ = try raw.go() }
                held.append(raw)
            }
            held.removeAll()
            // Every connection thread gone: each released its connection before it ended.
            let deadline = Date().addingTimeInterval(20)
            while Self.threadCount(server.pid) > idleThreads && Date() < deadline { usleep(20_000) }
            #expect(Self.threadCount(server.pid) <= idleThreads, "round \(round): connection threads left")
            usleep(200_000)
            after.append(Self.rssAnon(server.pid) ?? 0)
        }
        print("RssAnon after each round of \(clients) concurrent connections (KiB): \(after)")
        // Round 1 warms up (thread stacks cached, malloc arenas made); from then on the
        // memory must stay where it is. The old server grew more than 40 MiB over these rounds.
        // Not under AddressSanitizer or ThreadSanitizer (terabytes of address space reserved for
        // their shadow): their allocators keep freed memory in quarantine or caches on purpose.
        let sanitized = (Self.statusField("VmSize:", server.pid) ?? 0) > 1 << 30
        let growth = sanitized ? 0 : after.last! - after[1]
        if sanitized { print("a sanitizer build: RssAnon not bounded") }
        #expect(growth <= 4 * 1024, "RssAnon grew \(growth / 1024) MiB after the second round: \(after.map { $0 / 1024 }) MiB")
        #expect(server.process.isRunning, "the server died: \(server.stderrText)")
        let status = server.stop()
        #expect(status == 0, "exit status \(status): \(server.stderrText)")
    }
}
