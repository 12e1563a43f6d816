import Foundation
import Glibc
import PmemSystem
@testable import TestSupport
import Testing

/// `serve --max-connections` and `--handshake-timeout` (issue 13), on `pmem-nbd serve`
/// processes, with raw sockets and libnbd.
@Suite(.timeLimit(.minutes(5))) struct LimitTests {
    /// A served pool on a Unix socket with extra `serve` options.
    func serve(_ d: ScratchDirectory, _ options: [String]) throws -> (ServerProcess, String) {
        let socket = d.file("s.sock")
        let p = try ServerProcess(["serve", d.file("pool"), "--create", "64M", "-U", socket, "--control", "none", "--feed", "none"] + options)
        #expect(p.waitForSocket(socket), "server did not start: \(p.stderrText)")
        return (p, socket)
    }

    /// True when the server closes `raw` before sending anything (within 2 s).
    func closedAtOnce(_ raw: RawClient) -> Bool {
        var tv = timeval(tv_sec: 2, tv_usec: 0)
        setsockopt(raw.fd.rawValue, SOL_SOCKET, SO_RCVTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
        var b: UInt8 = 0
        let r = Glibc.read(raw.fd.rawValue, &b, 1)
        return r == 0 || (r < 0 && errno == ECONNRESET)
    }

    /// With `--max-connections 3`, three clients in their handshake fill the server; a fourth
    /// (raw or libnbd) is closed at once, and the three finish their handshakes and do I/O
    /// undisturbed. When one leaves, a new client is served again.
    @Test(.timeLimit(.minutes(2))) func clientsBeyondTheLimitAreClosedAtOnce() throws {
        let d = ScratchDirectory()
        let (server, socket) = try serve(d, ["--max-connections", "3", "-v"])
        var served: [RawClient] = []
        for _ in 0..<3 {
            let raw = try RawClient(unix: socket)
            _ = try raw.greet()
            served.append(raw)
        }
        for _ in 0..<5 {
            let extra = try RawClient(unix: socket)
            #expect(closedAtOnce(extra), "a client over the limit got an answer")
        }
        #expect(throws: (any Error).self, "libnbd over the limit") {
            let c = try NBDClient()
            try c.connect(unix: socket)
        }
        for (i, raw) in served.enumerated() {
            _ = try raw.go()
            try raw.send(RawClient.request(type: 1, cookie: 1, offset: UInt64(i) << 12, length: 3) + [UInt8(i), 7, 7])
            #expect(try raw.reply().map { $0.cookie == 1 && $0.error == 0 } == true, "served client \(i)")
        }
        served.removeLast()
        // The connection's thread notices the close and ends; then there is room again.
        var c: NBDClient?
        for _ in 0..<100 where c == nil {
            c = try? connectWhenReady(socket, timeout: 0.1)
            if c == nil { usleep(50_000) }
        }
        #expect(try c?.pread(count: 3, offset: 4096) == [1, 7, 7])
        let status = server.stop()
        #expect(status == 0)
        #expect(server.stderrText.contains("3 connections are being served"), "\(server.stderrText)")
    }

    /// The default is 100, as qemu-nbd's: 100 clients idle in their handshake, the 101st is
    /// closed at once; `--max-connections 0` lifts the limit.
    @Test(.timeLimit(.minutes(2))) func theDefaultLimitIs100AndZeroMeansNone() throws {
        for (options, limited) in [([String](), true), (["--max-connections", "0"], false)] {
            let d = ScratchDirectory()
            let (server, socket) = try serve(d, options)
            var held: [RawClient] = []
            for _ in 0..<100 {
                let raw = try RawClient(unix: socket)
                _ = try raw.greet()
                held.append(raw)
            }
            let extra = try RawClient(unix: socket)
            if limited {
                #expect(closedAtOnce(extra), "the 101st client was served")
            } else {
                #expect(try extra.greet().count == 18, "no limit: the 101st client is greeted")
            }
            held.removeAll()
            #expect(server.stop() == 0)
        }
    }

    /// `--handshake-timeout 2`: a client that keeps sending — one byte of an option every
    /// 0.3 s — is still disconnected about 2 s after it connected (a deadline for the whole
    /// handshake, not for each read). A libnbd client meanwhile connects and works, and stays
    /// connected past the deadline (transmission has no such limit).
    @Test(.timeLimit(.minutes(2))) func theHandshakeHasADeadline() throws {
        let d = ScratchDirectory()
        let (server, socket) = try serve(d, ["--handshake-timeout", "2", "-v"])
        let trickle = try RawClient(unix: socket)
        let started = Date()
        _ = try trickle.greet()
        let option = RawClient.option(1, Array(repeating: 0x61, count: 64))
        var sent = 0
        var closedAfter: Double?
        for byte in option {
            if (try? trickle.send([byte])) == nil { closedAfter = Date().timeIntervalSince(started); break }
            sent += 1
            var p = pollfd(fd: trickle.fd.rawValue, events: Int16(POLLIN), revents: 0)
            if poll(&p, 1, 300) > 0 {
                // Data or end of stream: the server must have hung up (no reply is due yet).
                #expect(trickle.isClosedByServer())
                closedAfter = Date().timeIntervalSince(started)
                break
            }
        }
        #expect(closedAfter.map { $0 >= 1.5 && $0 < 6 } == true, "closed after \(String(describing: closedAfter)) s, \(sent) bytes sent")
        // A libnbd client works, also beyond the handshake deadline.
        let c = try connectWhenReady(socket)
        try c.pwrite([1, 2, 3], offset: 0)
        usleep(2_500_000)
        #expect(try c.pread(count: 3, offset: 0) == [1, 2, 3])
        #expect(server.stop() == 0)
        #expect(server.stderrText.contains("handshake not finished within 2 s"), "\(server.stderrText)")
    }

    /// Without the option the deadline is 10 s: a client silent after the greeting is
    /// disconnected between 9 and 15 s after it connected.
    @Test(.timeLimit(.minutes(2))) func theDefaultHandshakeDeadlineIs10Seconds() throws {
        let d = ScratchDirectory()
        let (server, socket) = try serve(d, [])
        let idle = try RawClient(unix: socket)
        let started = Date()
        _ = try idle.receive(18)
        var tv = timeval(tv_sec: 30, tv_usec: 0)
        setsockopt(idle.fd.rawValue, SOL_SOCKET, SO_RCVTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
        #expect(idle.isClosedByServer())
        let after = Date().timeIntervalSince(started)
        #expect(after > 9 && after < 15, "closed after \(after) s")
        #expect(server.stop() == 0)
    }
}
