import Foundation
import Glibc
import PmemPool
import PmemVolumes
@testable import TestSupport
import Testing

/// The `pmem-nbd` executable: create, info, serve (Unix, TCP, stdio, socket activation),
/// clean shutdown, and refusing damaged pools.
@Suite(.timeLimit(.minutes(5))) struct CLITests {
    @Test func createAndInfo() throws {
        let d = ScratchDirectory()
        let pool = d.file("p.pool")
        let c = try run([pmemNBDBinary, "create", pool, "--size", "64M", "--name", "data"])
        #expect(c.status == 0, "\(c.stderr)")
        let info = try run([pmemNBDBinary, "info", pool, "--json"])
        #expect(info.status == 0)
        let json = try JSONSerialization.jsonObject(with: Data(info.stdout.utf8)) as? [String: Any]
        #expect((json?["pool_size"] as? NSNumber)?.intValue == 64 << 20)
        #expect(json?["persistence"] as? String == "page")
        #expect(json?["exports"] as? [String] == ["data"])
        #expect((json?["uuid"] as? String)?.count == 36)
        let text = try run([pmemNBDBinary, "info", pool])
        #expect(text.stdout.contains("persistence:  page"))
        // The pool file is sparse.
        var st = stat()
        stat(pool, &st)
        #expect(st.st_blocks * 512 < 4 << 20)
        // Creating over it is refused.
        let again = try run([pmemNBDBinary, "create", pool, "--size", "64M"])
        #expect(again.status != 0 && again.stderr.contains("refusing"))
    }

    @Test func serveOnUnixSocketAndStopCleanlyOnSIGTERM() throws {
        let d = ScratchDirectory()
        let pool = d.file("p.pool"), sock = d.file("s.sock"), pid = d.file("pid")
        let server = try ServerProcess(["serve", pool, "--create", "32M", "-U", sock, "--pidfile", pid])
        #expect(server.waitForSocket(sock))
        // The pid file comes last, once the control socket and the feed are up too.
        for _ in 0..<250 where !FileManager.default.fileExists(atPath: pid) { usleep(20_000) }
        #expect((try? String(contentsOfFile: pid, encoding: .utf8))?.trimmingCharacters(in: .whitespacesAndNewlines) == "\(server.pid)")
        let c = try connectWhenReady(sock)
        try c.pwrite(pattern(4096, seed: 12), offset: 4096)
        // SIGTERM with a client still connected: the server finishes and exits 0.
        #expect(server.stop(signal: SIGTERM) == 0)
        #expect(!FileManager.default.fileExists(atPath: pid))
        #expect(!FileManager.default.fileExists(atPath: sock))
        // What was written is in the pool.
        let again = try ServerProcess(["serve", pool, "-U", sock, "-r"])
        #expect(again.waitForSocket(sock))
        let r = try connectWhenReady(sock)
        #expect(try r.isReadOnly)
        #expect(try r.pread(count: 4096, offset: 4096) == pattern(4096, seed: 12))
        #expect(again.stop(signal: SIGINT) == 0)
    }

    @Test func serveOnTCP() throws {
        let d = ScratchDirectory()
        let pool = d.file("p.pool")
        try PoolEngine.create(path: pool, size: 16 << 20)
        let port = UInt16.random(in: 20_000...60_000)
        let server = try ServerProcess(["serve", pool, "-p", "\(port)", "--bind", "127.0.0.1"])
        defer { _ = server.stop() }
        var connected: NBDClient?
        for _ in 0..<200 where connected == nil {
            let c = try NBDClient()
            if (try? c.connect(tcp: "127.0.0.1", port: port)) != nil { connected = c } else { usleep(20_000) }
        }
        guard let c = connected else { Issue.record("no TCP listener on \(port): \(server.stderrText)"); return }
        try c.pwrite([1, 2, 3], offset: 0)
        #expect(try c.pread(count: 3, offset: 0) == [1, 2, 3])
    }

    @Test func stdioModeWithConnectCommandAndNbdinfo() throws {
        let d = ScratchDirectory()
        let pool = d.file("p.pool")
        try PoolEngine.create(path: pool, size: 16 << 20)
        let c = try NBDClient()
        try c.connect(command: [pmemNBDBinary, "serve", pool, "--stdio"])
        try c.pwrite(pattern(512, seed: 13), offset: 0)
        #expect(try c.pread(count: 512, offset: 0) == pattern(512, seed: 13))
        try c.shutdown()
        if haveTool("nbdinfo") {
            // nbdinfo runs the server itself with socket activation, with and without -s.
            usleep(200_000)
            let size = try PoolEngine.open(path: pool, readOnly: true, lock: false).records()[0].size
            for extra in [["-s"], []] {
                let r = try run(["nbdinfo", "--size", "--", "[", pmemNBDBinary, "serve", pool] + extra + ["]"])
                #expect(r.status == 0, "\(r.stderr)")
                #expect(r.stdout.trimmingCharacters(in: .whitespacesAndNewlines) == "\(size)")
            }
        }
    }

    @Test(.enabled(if: FileManager.default.isExecutableFile(atPath: "/usr/bin/python3")))
    func systemdSocketActivation() throws {
        let d = ScratchDirectory()
        let pool = d.file("p.pool"), sock = d.file("act.sock")
        try PoolEngine.create(path: pool, size: 16 << 20)
        // Exactly what systemd does: a listening socket on fd 3, LISTEN_PID = the server's pid.
        let launcher = """
        import os, socket, sys
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(sys.argv[1]); s.listen(16)
        if s.fileno() != 3: os.dup2(s.fileno(), 3)
        os.set_inheritable(3, True)
        os.environ["LISTEN_FDS"] = "1"; os.environ["LISTEN_PID"] = str(os.getpid())
        os.execv(sys.argv[2], sys.argv[2:])
        """
        let server = try ServerProcess(["/usr/bin/python3", "-c", launcher, sock, pmemNBDBinary, "serve", pool, "-v", "-v"], launcher: true)
        defer { _ = server.stop() }
        #expect(server.waitForSocket(sock))
        var c: NBDClient?
        for _ in 0..<100 where c == nil {
            let h = try NBDClient()
            if (try? h.connect(unix: sock)) != nil { c = h } else { usleep(50_000) }
        }
        guard let c else { Issue.record("could not connect to the activated socket"); return }
        try c.pwrite([7], offset: 0)
        #expect(try c.pread(count: 1, offset: 0) == [7])
        #expect(server.stop() == 0)
    }

    @Test func damagedPoolsAreRefusedNotReformatted() throws {
        let d = ScratchDirectory()
        let pool = d.file("p.pool")
        func serveFails(_ expect: String) throws {
            let before = try Data(contentsOf: URL(fileURLWithPath: pool))
            let r = try run([pmemNBDBinary, "serve", pool, "--create", "16M", "-U", d.file("x.sock")], timeout: 20)
            #expect(r.status != 0)
            #expect(r.stderr.contains(expect), "stderr: \(r.stderr)")
            let after = try Data(contentsOf: URL(fileURLWithPath: pool))
            #expect(before == after, "the file was modified")
            let info = try run([pmemNBDBinary, "info", pool])
            #expect(info.status != 0 && info.stderr.contains(expect))
        }
        // Bad checksum.
        try PoolEngine.create(path: pool, size: 16 << 20)
        try patch(pool, at: 40, [0x55])
        try serveFails("checksum mismatch")
        // Foreign magic.
        try Data("QFI\u{fb}not a pool at all".utf8 + [UInt8](repeating: 1, count: 4096)).write(to: URL(fileURLWithPath: pool))
        try serveFails("foreign magic")
        // Empty (zeroed) file.
        try Data(count: 1 << 20).write(to: URL(fileURLWithPath: pool))
        try serveFails("no pool header")
        // Truncated.
        try FileManager.default.removeItem(atPath: pool)
        try PoolEngine.create(path: pool, size: 16 << 20)
        truncate(pool, 8 << 20)
        try serveFails("truncated")
        // Version from the future (with a valid checksum).
        try FileManager.default.removeItem(atPath: pool)
        try PoolEngine.create(path: pool, size: 16 << 20)
        var header = try Array(Data(contentsOf: URL(fileURLWithPath: pool)).prefix(256))
        header[8] = 99
        for i in 248..<256 { header[i] = 0 }
        let crc = header.withUnsafeBytes { PersistentMemoryCRC($0) }
        withUnsafeBytes(of: UInt64(crc).littleEndian) { for i in 0..<8 { header[248 + i] = $0[i] } }
        try patch(pool, at: 0, header)
        try serveFails("version 99")
        // A pool of the previous format version is refused the same way.
        header[8] = 1
        for i in 248..<256 { header[i] = 0 }
        let crc1 = header.withUnsafeBytes { PersistentMemoryCRC($0) }
        withUnsafeBytes(of: UInt64(crc1).littleEndian) { for i in 0..<8 { header[248 + i] = $0[i] } }
        try patch(pool, at: 0, header)
        try serveFails("version 1 is not supported")
        // A tiny file.
        try Data([1, 2, 3]).write(to: URL(fileURLWithPath: pool))
        try serveFails("too small")
    }

    @Test func secondServerOnTheSamePoolIsRefused() throws {
        let d = ScratchDirectory()
        let pool = d.file("p.pool"), sock = d.file("a.sock")
        let first = try ServerProcess(["serve", pool, "--create", "16M", "-U", sock])
        defer { _ = first.stop() }
        #expect(first.waitForSocket(sock))
        let second = try run([pmemNBDBinary, "serve", pool, "-U", d.file("b.sock")], timeout: 20)
        #expect(second.status != 0 && second.stderr.contains("in use"))
    }

    /// A command against a served pool goes to its control socket without first waiting for
    /// the pool's lock (it waited a full second for it: `lockExclusive(patience: 1)`). The real
    /// figure (a few milliseconds) is in PERFORMANCE.md, measured by `scripts/bench
    /// --page-speed`; the bound here only has to fail when the command waits for the lock.
    @Test func commandsAgainstAServedPoolDoNotWaitForItsLock() throws {
        let d = ScratchDirectory()
        let pool = d.file("p.pool"), sock = d.file("s.sock")
        let server = try ServerProcess(["serve", pool, "--create", "64M", "-U", sock])
        #expect(server.waitForSocket(sock))
        let c = try connectWhenReady(sock)
        var times: [Double] = []
        for i in 0..<5 {
            try c.pwrite(pattern(65_536, seed: UInt64(i)), offset: UInt64(i) << 16)
            let start = Date()
            let r = try run([pmemNBDBinary, "snapshot", "create", "--pool", pool, "pmem0@s\(i)"])
            times.append(Date().timeIntervalSince(start))
            #expect(r.status == 0, "\(r.stderr)")
        }
        let list = try run([pmemNBDBinary, "volume", "list", "--pool", pool])
        #expect(list.status == 0 && list.stdout.contains("pmem0@s4"), "\(list.stdout) \(list.stderr)")
        times.sort()
        print("snapshot create against a served pool: median \(Int(times[2] * 1000)) ms, \(times.map { Int($0 * 1000) }) ms")
        #expect(times[2] < 0.5, "median \(times[2]) s: the command waited for the pool's lock")
        #expect(server.stop() == 0)
    }
}
