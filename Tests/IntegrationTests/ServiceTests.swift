import Foundation
import Glibc
import PmemPool
import PmemSystem
@testable import TestSupport
import Testing

/// Running pmem-nbd the ways nbdkit and qemu-nbd users run servers: `--print-uri`, `--fork`
/// with a pid file, and systemd socket activation with the unit files in Docs/systemd.
@Suite(.timeLimit(.minutes(5))) struct ServiceTests {
    @Test func printURIForUnixAndTCPSockets() throws {
        let d = ScratchDirectory()
        let pool = d.file("p.pool"), sock = d.file("s.sock")
        let server = try ServerProcess(["serve", pool, "--create", "32M", "-U", sock, "-p", "0", "-e", "disk one", "--print-uri"],
                                       captureStdout: true)
        defer { _ = server.stop() }
        let lines = server.readLines(2)
        try #require(lines.count == 2, "stdout: \(lines); stderr: \(server.stderrText)")
        // Unix first, then TCP (the port the kernel chose for -p 0); the name is percent-encoded.
        #expect(lines[0] == "nbd+unix:///disk%20one?socket=\(sock)")
        let prefix = "nbd://localhost:", suffix = "/disk%20one"
        #expect(lines[1].hasPrefix(prefix) && lines[1].hasSuffix(suffix), "\(lines[1])")
        let port = Int(lines[1].dropFirst(prefix.count).dropLast(suffix.count)) ?? 0
        #expect(port > 0 && port < 65536)
        // Each URI reaches the export through libnbd's own URI parser.
        for (i, uri) in lines.enumerated() {
            let c = try NBDClient()
            try c.connect(uri: uri)
            try c.pwrite(pattern(4096, seed: UInt64(40 + i)), offset: UInt64(i) * 4096)
            #expect(try c.pread(count: 4096, offset: UInt64(i) * 4096) == pattern(4096, seed: UInt64(40 + i)))
        }
        if haveTool("nbdinfo") {
            for uri in lines {
                let r = try run(["nbdinfo", "--size", uri])
                #expect(r.status == 0, "\(r.stderr)")
                #expect(UInt64(r.stdout.trimmingCharacters(in: .whitespacesAndNewlines)) ?? 0 > 0)
            }
        }
        // Nothing else was printed on stdout.
        #expect(server.readLines(1, timeout: 0.3).isEmpty)
    }

    @Test func forkReturnsOnceServingAndThePidFileNamesTheDaemon() throws {
        let d = ScratchDirectory()
        let pool = d.file("p.pool"), sock = d.file("s.sock"), pidFile = d.file("server.pid")
        // run() waits for the command and for EOF on its stdout and stderr: it returns only if the
        // daemon let go of them.
        let r = try run([pmemNBDBinary, "serve", pool, "--create", "32M", "-U", sock, "--fork", "--pidfile", pidFile, "--print-uri"], timeout: 60)
        #expect(r.status == 0, "\(r.stderr)")
        #expect(r.stdout == "nbd+unix:///pmem0?socket=\(sock)\n")
        let text = try String(contentsOfFile: pidFile, encoding: .utf8)
        let pid = try #require(Int32(text.trimmingCharacters(in: .whitespacesAndNewlines)))
        #expect(kill(pid, 0) == 0, "the daemon is running")
        // A session leader of its own (setsid).
        let stat = try String(contentsOfFile: "/proc/\(pid)/stat", encoding: .utf8)
        let fields = stat[stat.range(of: ")")!.upperBound...].split(separator: " ")
        #expect(fields.count > 4 && Int32(fields[3]) == pid, "session id is the daemon's pid: \(stat)")
        // No race: the socket answers the moment the command has returned, first try.
        let c = try NBDClient()
        try c.connect(unix: sock)
        try c.pwrite(pattern(4096, seed: 50), offset: 0)
        #expect(try c.pread(count: 4096, offset: 0) == pattern(4096, seed: 50))
        try c.shutdown()
        if haveTool("nbdinfo") {
            let info = try run(["nbdinfo", "--size", "nbd+unix:///?socket=\(sock)"])
            #expect(info.status == 0, "\(info.stderr)")
        }
        // SIGTERM to the pid in the pid file stops it cleanly: it removes its socket and pid file.
        #expect(kill(pid, SIGTERM) == 0)
        let deadline = Date().addingTimeInterval(30)
        while processExists(pid) && Date() < deadline { usleep(20_000) }
        #expect(!processExists(pid), "the daemon stopped")
        #expect(!FileManager.default.fileExists(atPath: pidFile))
        #expect(!FileManager.default.fileExists(atPath: sock))
        // The daemon closed the pool cleanly (its lock is free) with the write in it.
        let reopened = try PoolEngine.open(path: pool, readOnly: true, lock: true)
        #expect(reopened.space.allocated >= 1)
    }

    @Test func forkReportsTheChildsFailureAsItsOwnStatus() throws {
        let d = ScratchDirectory()
        let started = Date()
        let r = try run([pmemNBDBinary, "serve", d.file("missing.pool"), "-U", d.file("s.sock"), "--fork", "--pidfile", d.file("pid")], timeout: 30)
        #expect(r.status == 1)
        #expect(r.stderr.contains("does not exist"), "\(r.stderr)")
        #expect(Date().timeIntervalSince(started) < 20)
        #expect(!FileManager.default.fileExists(atPath: d.file("pid")))
        let both = try run([pmemNBDBinary, "serve", d.file("missing.pool"), "--fork", "--stdio"], timeout: 30)
        #expect(both.status != 0 && both.stderr.contains("--fork and --stdio"))
    }

    // MARK: systemd

    /// The values of `Key=` lines of a unit file.
    func unitValues(_ text: String, _ key: String) -> [String] {
        text.split(separator: "\n").compactMap { line in
            line.hasPrefix(key + "=") ? String(line.dropFirst(key.count + 1)).trimmingCharacters(in: .whitespaces) : nil
        }
    }

    @Test func socketActivationAsSystemdStartsTheUnits() throws {
        let socketUnit = try String(contentsOfFile: repositoryRoot + "/Docs/systemd/pmem-nbd.socket", encoding: .utf8)
        let serviceUnit = try String(contentsOfFile: repositoryRoot + "/Docs/systemd/pmem-nbd.service", encoding: .utf8)
        let listen = unitValues(socketUnit, "ListenStream")
        #expect(listen == ["/run/pmem-nbd.sock", "127.0.0.1:10809"], "TCP on loopback only: NBD is plaintext")
        let exec = try #require(unitValues(serviceUnit, "ExecStart").first).split(separator: " ").map(String.init)
        #expect(Array(exec.prefix(3)) == ["/usr/local/bin/pmem-nbd", "serve", "/var/lib/pmem-nbd/pool"])

        // The same sockets, in the same order, here: the Unix socket at a scratch path and the
        // TCP one on a free port instead of 10809.
        let d = ScratchDirectory()
        try PoolEngine.create(path: d.file("pool"), size: 32 << 20)
        let sock = d.file("pmem-nbd.sock")
        let unixSocket = try Socket.listenUnix(path: sock)
        let tcpSockets = try Socket.listenTCP(host: "127.0.0.1", port: 0)
        defer { unixSocket.close(); for s in tcpSockets { s.close() } }
        let port = try #require(Socket.boundPort(tcpSockets[0]))
        let argv = exec.map { arg -> String in
            if arg == "/usr/local/bin/pmem-nbd" { return pmemNBDBinary }
            return arg.replacingOccurrences(of: "/var/lib/pmem-nbd", with: d.path)
        } + ["--print-uri"]
        let server = try ActivatedProcess(argv, passing: [unixSocket.rawValue, tcpSockets[0].rawValue],
                                          environment: ["LISTEN_FDNAMES": "pmem-nbd.socket:pmem-nbd.socket"],
                                          stderrPath: d.file("stderr"))
        let uris = server.readLines(2)
        #expect(uris == ["nbd+unix:///pmem0?socket=\(sock)", "nbd://localhost:\(port)/pmem0"], "stderr: \(server.stderrText)")
        for (i, uri) in uris.enumerated() {
            let c = try NBDClient()
            try c.connect(uri: uri)
            try c.pwrite(pattern(512, seed: UInt64(60 + i)), offset: UInt64(i) * 512)
            #expect(try c.pread(count: 512, offset: UInt64(i) * 512) == pattern(512, seed: UInt64(60 + i)))
        }
        #expect(server.stop() == 0, "\(server.stderrText)")
        // The socket belongs to systemd: the server must leave its file in place.
        var st = stat()
        #expect(stat(sock, &st) == 0 && (st.st_mode & S_IFMT) == S_IFSOCK)
        #expect(!server.stderrText.contains("error"), "\(server.stderrText)")
    }

    @Test(.enabled(if: haveTool("systemd-socket-activate")))
    func systemdSocketActivateStartsTheServerOnTheFirstConnection() throws {
        let d = ScratchDirectory()
        let pool = d.file("pool"), sock = d.file("act.sock")
        try PoolEngine.create(path: pool, size: 32 << 20)
        let server = try ServerProcess(["/usr/bin/systemd-socket-activate", "-l", sock, "--fdname=pmem-nbd.socket",
                                        pmemNBDBinary, "serve", pool], launcher: true)
        defer { _ = server.stop() }
        #expect(server.waitForSocket(sock))
        // systemd-socket-activate execs the server (same pid) when the first client connects.
        let c = try connectWhenReady(sock)
        try c.pwrite([9, 8, 7], offset: 100)
        #expect(try c.pread(count: 3, offset: 100) == [9, 8, 7])
        let exe = try FileManager.default.destinationOfSymbolicLink(atPath: "/proc/\(server.pid)/exe")
        #expect(exe.hasSuffix("/pmem-nbd"))
        try c.shutdown()
        #expect(server.stop() == 0)
    }

    @Test(.enabled(if: haveTool("systemd-analyze")))
    func unitFilesPassSystemdAnalyzeVerify() throws {
        let d = ScratchDirectory()
        let socketUnit = try String(contentsOfFile: repositoryRoot + "/Docs/systemd/pmem-nbd.socket", encoding: .utf8)
        let serviceUnit = try String(contentsOfFile: repositoryRoot + "/Docs/systemd/pmem-nbd.service", encoding: .utf8)
        try socketUnit.write(toFile: d.file("pmem-nbd.socket"), atomically: true, encoding: .utf8)
        // verify checks that ExecStart's program exists: point it at the one just built.
        try serviceUnit.replacingOccurrences(of: "/usr/local/bin/pmem-nbd", with: pmemNBDBinary)
            .write(toFile: d.file("pmem-nbd.service"), atomically: true, encoding: .utf8)
        let r = try run(["systemd-analyze", "verify", "--man=no", d.file("pmem-nbd.socket"), d.file("pmem-nbd.service")])
        #expect(r.status == 0, "\(r.stderr)")
        #expect(r.stderr.isEmpty, "warnings: \(r.stderr)")
    }
}

/// Whether a process exists and has not exited (a zombie counts as gone).
func processExists(_ pid: Int32) -> Bool {
    guard kill(pid, 0) == 0 else { return false }
    guard let stat = try? String(contentsOfFile: "/proc/\(pid)/stat", encoding: .utf8), let close = stat.range(of: ")") else { return false }
    return !stat[close.upperBound...].hasPrefix(" Z")
}
