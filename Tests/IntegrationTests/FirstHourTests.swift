import Foundation
import Glibc
import PmemNBD
import PmemPool
@testable import TestSupport
import Testing

// The first hour of a new user (issue 16), and issue 13 item 7, through the built `pmem-nbd`
// and real clients (nbdinfo, nbdcopy, nbdsh, qemu-img). Processes are started only through
// the helpers below, so the deadline-enforcing process helper can replace them in one place.

/// `pmem-nbd ARGS`, to completion (with a deadline).
@discardableResult
func pmemNBD(_ args: [String], timeout: TimeInterval = 60) throws -> ToolResult {
    try run([pmemNBDBinary] + args, timeout: timeout)
}

/// A program (nbdinfo, qemu-img…), to completion (with a deadline).
@discardableResult
func tool(_ argv: [String], environment: [String: String] = [:], timeout: TimeInterval = 60) throws -> ToolResult {
    try run(argv, environment: environment, timeout: timeout)
}

/// A shell script run in `directory` with its output in files (a server it leaves in the
/// background cannot hold a pipe), with a deadline; what it leaves running is killed.
func shell(_ script: String, in directory: String, timeout: TimeInterval = 60, reap: Bool = true) throws -> ToolResult {
    try runScript("cd '\(directory)'\nexport PATH='\((pmemNBDBinary as NSString).deletingLastPathComponent)':\(systemPath)\n" + script,
                  in: directory, timeout: timeout, reap: reap)
}

/// `pmem-nbd serve ARGS` in the background, waiting for `socket` (nil: do not wait).
func startServer(_ args: [String], socket: String?, captureStdout: Bool = false) throws -> ServerProcess {
    let s = try ServerProcess(["serve"] + args, captureStdout: captureStdout)
    if let socket, !s.waitForSocket(socket) {
        let status = s.stop()
        Issue.record("the server did not listen on \(socket) (status \(status)): \(s.stderrText)")
    }
    return s
}

/// Stops a server with SIGTERM and returns its status and everything it wrote on stderr.
func stopServer(_ s: ServerProcess, signal: Int32 = SIGTERM) -> (status: Int32, stderr: String) {
    let status = s.stop(signal: signal)
    return (status, s.stderrText)
}

func unixURI(_ socket: String, _ export: String = "") -> String { "nbd+unix:///\(export)?socket=\(socket)" }

func json(_ text: String) -> [String: Any] {
    (try? JSONSerialization.jsonObject(with: Data(text.utf8))) as? [String: Any] ?? [:]
}

func fileExists(_ path: String) -> Bool { FileManager.default.fileExists(atPath: path) }

// MARK: - Surprises

@Suite(.timeLimit(.minutes(4))) struct FirstHourSizeTests {
    /// `serve --create 4G` makes a 4 GiB export that a 4 GiB image fits, by qemu-img and by
    /// nbdcopy, and says what it made and where it serves.
    @Test func serveCreateMakesTheExportSizeAskedFor() throws {
        let d = ScratchDirectory()
        let pool = d.file("t.pool"), sock = d.file("s.sock"), image = d.file("four-gig.raw")
        let server = try startServer([pool, "--create", "4G", "-U", sock], socket: sock)
        let size = try tool(["nbdinfo", "--size", unixURI(sock)])
        #expect(size.stdout.trimmingCharacters(in: .whitespacesAndNewlines) == "\(4 << 30)", "\(size.stderr)")
        // A 4 GiB image with data at both ends.
        #expect(try tool(["qemu-img", "create", "-f", "raw", image, "4G"]).status == 0)
        for seek in ["0", "4095"] {
            #expect(try tool(["dd", "if=/dev/urandom", "of=\(image)", "bs=1M", "count=1", "seek=\(seek)", "conv=notrunc"]).status == 0)
        }
        let convert = try tool(["qemu-img", "convert", "-n", "-f", "raw", image, "-O", "raw", unixURI(sock, "pmem0")], timeout: 120)
        #expect(convert.status == 0, "qemu-img: \(convert.stderr)")
        let copy = try tool(["nbdcopy", image, unixURI(sock, "pmem0")], timeout: 120)
        #expect(copy.status == 0, "nbdcopy: \(copy.stderr)")
        let compare = try tool(["qemu-img", "compare", "-f", "raw", "-F", "raw", image, unixURI(sock, "pmem0")], timeout: 120)
        #expect(compare.status == 0, "\(compare.stdout) \(compare.stderr)")
        let (status, stderr) = stopServer(server)
        #expect(status == 0)
        #expect(stderr.contains("pmem-nbd: created \(pool): volume pmem0 of 4 GiB"), "\(stderr)")
        #expect(stderr.contains("pmem-nbd: serving pmem0 (4 GiB) at nbd+unix:///pmem0?socket=\(sock)"), "\(stderr)")
    }

    /// Sizes take qemu-img's forms and round with a note; failed creates leave no file.
    @Test func sizesAndFailedCreates() throws {
        let d = ScratchDirectory()
        func poolSize(_ path: String) throws -> Int? {
            (json(try pmemNBD(["info", path, "--json"]).stdout)["pool_size"] as? NSNumber)?.intValue
        }
        #expect(try pmemNBD(["create", d.file("a.pool"), "--size", "1.5G"]).status == 0)
        #expect(try poolSize(d.file("a.pool")) == 3 << 29)
        #expect(try pmemNBD(["create", d.file("b.pool"), "--size", "4GiB"]).status == 0)
        #expect(try poolSize(d.file("b.pool")) == 4 << 30)
        #expect(try pmemNBD(["create", d.file("m.pool"), "--size", "4096M"]).status == 0)
        #expect(try poolSize(d.file("m.pool")) == 4 << 30)
        let gb = try pmemNBD(["create", d.file("c.pool"), "--size", "4GB"])
        #expect(gb.status == 1 && gb.stderr.contains("write 4G or 4GiB"), "\(gb.stderr)")
        #expect(!fileExists(d.file("c.pool")))
        // --create 0 and a too-small size: a clear error and no file, so a retry works.
        let zero = try pmemNBD(["serve", d.file("z.pool"), "--create", "0", "-U", d.file("z.sock")])
        #expect(zero.status == 1 && zero.stderr.contains("at least 4 KiB"), "\(zero.stderr)")
        #expect(!fileExists(d.file("z.pool")) && !fileExists(d.file("z.sock")))
        let small = try pmemNBD(["create", d.file("d.pool"), "--size", "1M"])
        #expect(small.status == 1 && small.stderr.contains(d.file("d.pool")) && small.stderr.contains("too small"), "\(small.stderr)")
        #expect(!fileExists(d.file("d.pool")))
        let retry = try pmemNBD(["create", d.file("d.pool"), "--size", "8M"])
        #expect(retry.status == 0, "\(retry.stderr)")
        // A volume of 5000 bytes is two blocks, and the command says so.
        let odd = try pmemNBD(["volume", "create", "v", "--size", "5000", "--pool", d.file("a.pool")])
        #expect(odd.status == 0 && odd.stderr.contains("rounded up to 8192 bytes"), "\(odd.stderr)")
        let list = json(try pmemNBD(["volume", "list", "--pool", d.file("a.pool"), "--json"]).stdout)
        let v = (list["volumes"] as? [[String: Any]])?.first { $0["name"] as? String == "v" }
        #expect((v?["size"] as? NSNumber)?.intValue == 8192)
        let bad = try pmemNBD(["volume", "create", "w", "--size", "1e3", "--pool", d.file("a.pool")])
        #expect(bad.status == 1 && bad.stderr.contains("cannot parse size '1e3'"), "\(bad.stderr)")
        // --volume-size alone sizes the pool for it, as serve --create does.
        #expect(try pmemNBD(["create", d.file("e.pool"), "--volume-size", "64M"]).status == 0)
        let e = json(try pmemNBD(["info", d.file("e.pool"), "--json"]).stdout)
        #expect(((e["volumes"] as? [[String: Any]])?.first?["size"] as? NSNumber)?.intValue == 64 << 20)
    }
}

@Suite(.timeLimit(.minutes(4))) struct FirstHourVolumeTests {
    /// A busy volume is not deleted without --force; shrinking needs --shrink; a volume larger
    /// than the pool is allowed with a warning stating the free space; `connections` shows
    /// who is connected.
    @Test func busyShrinkOvercommitAndConnections() throws {
        let d = ScratchDirectory()
        let pool = d.file("p.pool"), sock = d.file("s.sock")
        let server = try startServer([pool, "--create", "64M", "-U", sock], socket: sock)
        defer { _ = stopServer(server) }
        #expect(try pmemNBD(["volume", "create", "db", "--size", "32M", "--pool", pool]).status == 0)
        let client = try connectWhenReady(sock) { try $0.setExportName("db") }
        try client.pwrite(pattern(8192, seed: 1), offset: 0)
        _ = try client.pread(count: 4096, offset: 0)

        let busy = try pmemNBD(["volume", "delete", "db", "--pool", pool])
        #expect(busy.status == 1 && busy.stderr.contains("in use by 1 NBD connection") && busy.stderr.contains("--force"), "\(busy.stderr)")
        #expect(try tool(["nbdinfo", "--size", unixURI(sock, "db")]).stdout.hasPrefix("\(32 << 20)"))

        let connections = json(try pmemNBD(["connections", "--pool", pool, "--json"]).stdout)
        let rows = connections["connections"] as? [[String: Any]] ?? []
        let row = rows.first { $0["export"] as? String == "db" }
        #expect(row != nil, "\(connections)")
        #expect((row?["bytes_in"] as? NSNumber)?.intValue == 8192 && (row?["bytes_out"] as? NSNumber)?.intValue == 4096)
        #expect((row?["requests"] as? NSNumber)?.intValue == 2 && (row?["in_flight"] as? NSNumber)?.intValue == 0)
        #expect((row?["peer"] as? String)?.isEmpty == false && ((row?["since"] as? NSNumber)?.doubleValue ?? 0) > 1_700_000_000)
        let table = try pmemNBD(["connections", "--pool", pool])
        #expect(table.status == 0 && table.stdout.contains("PEER") && table.stdout.contains("db") && table.stdout.contains("8 KiB"), "\(table.stdout)")

        let shrink = try pmemNBD(["volume", "resize", "db", "--size", "16M", "--pool", pool])
        #expect(shrink.status == 1 && shrink.stderr.contains("--shrink"), "\(shrink.stderr)")
        #expect(try client.pread(count: 4096, offset: 30 << 20).count == 4096, "the client was left alone")
        let huge = try pmemNBD(["volume", "resize", "db", "--size", "100T", "--pool", pool])
        #expect(huge.status == 0 && huge.stderr.contains("overcommitted") && huge.stderr.contains("are free"), "\(huge.stderr)")
        #expect(try tool(["nbdinfo", "--size", unixURI(sock, "db")]).stdout.hasPrefix("\(100 << 40)"))
        #expect(try pmemNBD(["volume", "resize", "db", "--size", "16M", "--shrink", "--pool", pool]).status == 0)
        #expect(try tool(["nbdinfo", "--size", unixURI(sock, "db")]).stdout.hasPrefix("\(16 << 20)"))

        let again = try connectWhenReady(sock) { try $0.setExportName("db") }
        _ = try again.pread(count: 512, offset: 0)
        let forced = try pmemNBD(["volume", "delete", "db", "--force", "--pool", pool])
        #expect(forced.status == 0, "\(forced.stderr)")
        var dropped = false
        for _ in 0..<100 where !dropped {
            dropped = (try? again.pread(count: 512, offset: 0)) == nil
            if !dropped { usleep(20_000) }
        }
        #expect(dropped, "the client of a force-deleted volume is disconnected")
        let none = try pmemNBD(["connections", "--pool", d.file("unserved.pool")])
        #expect(none.status == 1 && none.stderr.contains("not being served"), "\(none.stderr)")
    }

    /// Rollback under nbdsh: the same connection reads the snapshot's contents afterwards
    /// (the README used to say clients "reconnect"; they stay connected).
    @Test(.enabled(if: haveTool("nbdsh"))) func rollbackKeepsNbdshConnected() throws {
        let d = ScratchDirectory()
        let pool = d.file("p.pool"), sock = d.file("s.sock")
        let server = try startServer([pool, "--create", "32M", "-U", sock], socket: sock)
        defer { _ = stopServer(server) }
        let script = """
        import os, subprocess
        pmem, pool = os.environ["PMEM"], os.environ["POOL"]
        def cli(*args):
            subprocess.run([pmem, *args, "--pool", pool], check=True, stdout=subprocess.DEVNULL)
        h.pwrite(b"A" * 8192, 0)
        cli("snapshot", "create", "pmem0@s")
        h.pwrite(b"B" * 8192, 0)
        h.pwrite(b"b" * 4096, 1 << 20)
        cli("snapshot", "rollback", "pmem0@s")
        assert h.pread(8192, 0) == b"A" * 8192, "after rollback the connection reads the snapshot"
        assert h.pread(4096, 1 << 20) == bytes(4096)
        h.pwrite(b"C" * 4096, 4096)
        h.flush()
        assert h.pread(4096, 4096) == b"C" * 4096
        print("rollback-ok")
        """
        let r = try tool(["nbdsh", "-u", unixURI(sock, "pmem0"), "-c", script], environment: ["PMEM": pmemNBDBinary, "POOL": pool])
        #expect(r.status == 0 && r.stdout.contains("rollback-ok"), "\(r.stdout) \(r.stderr)")
        // The written block is there for a new client too.
        let c = try connectWhenReady(sock)
        #expect(try c.pread(count: 4096, offset: 4096) == [UInt8](repeating: UInt8(ascii: "C"), count: 4096))
    }

    /// One-step import and export of images: raw and qcow2, offline and through a server;
    /// sparse; an existing file is not overwritten; a failed import leaves no volume.
    @Test(.enabled(if: haveTool("qemu-img") && haveTool("qemu-io"))) func importAndExportImages() throws {
        let d = ScratchDirectory()
        let pool = d.file("p.pool"), sock = d.file("s.sock")
        let qcow = d.file("disk.qcow2"), raw = d.file("disk.raw")
        #expect(try tool(["qemu-img", "create", "-f", "qcow2", qcow, "32M"]).status == 0)
        #expect(try tool(["qemu-io", "-f", "qcow2", "-c", "write -P 0xab 1M 64k", "-c", "write -P 0xcd 30M 4k", qcow]).status == 0)
        #expect(try tool(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", qcow, raw]).status == 0)
        #expect(try pmemNBD(["create", pool, "--size", "256M"]).status == 0)

        // Offline: the CLI runs a private server for qemu-img.
        let imported = try pmemNBD(["volume", "create", "vm", "--from", qcow, "--pool", pool], timeout: 120)
        #expect(imported.status == 0 && imported.stdout.contains("created volume vm (32 MiB) from \(qcow) (qcow2"), "\(imported.stdout) \(imported.stderr)")
        #expect(try pmemNBD(["volume", "create", "r", "--from", raw, "--pool", pool], timeout: 120).status == 0)
        let list = json(try pmemNBD(["volume", "list", "--pool", pool, "--json"]).stdout)["volumes"] as? [[String: Any]] ?? []
        let vm = list.first { $0["name"] as? String == "vm" }
        #expect((vm?["size"] as? NSNumber)?.intValue == 32 << 20)
        #expect(((vm?["referenced"] as? NSNumber)?.intValue ?? .max) <= 128 << 10, "sparse: only the written blocks (\(vm ?? [:]))")
        let out = d.file("out.raw")
        #expect(try pmemNBD(["volume", "export", "vm", out, "--pool", pool], timeout: 120).status == 0)
        #expect(try tool(["qemu-img", "compare", qcow, out]).status == 0)
        var st = stat()
        stat(out, &st)
        #expect(st.st_size == 32 << 20 && st.st_blocks * 512 < 1 << 20, "the exported raw file is sparse")
        let exists = try pmemNBD(["volume", "export", "vm", out, "--pool", pool])
        #expect(exists.status == 1 && exists.stderr.contains("exists") && exists.stderr.contains("--force"), "\(exists.stderr)")
        #expect(try pmemNBD(["volume", "export", "vm", out, "--force", "--pool", pool], timeout: 120).status == 0)
        let missing = try pmemNBD(["volume", "create", "ghost", "--from", d.file("nope.qcow2"), "--pool", pool])
        #expect(missing.status == 1 && missing.stderr.contains("nope.qcow2"), "\(missing.stderr)")
        let garbage = d.file("garbage.img")
        try Data(count: 100).write(to: URL(fileURLWithPath: garbage))
        let short = try pmemNBD(["volume", "create", "g", "--from", garbage, "--format", "qcow2", "--pool", pool])
        #expect(short.status == 1)
        let after = json(try pmemNBD(["volume", "list", "--pool", pool, "--json"]).stdout)["volumes"] as? [[String: Any]] ?? []
        #expect(!after.contains { ["ghost", "g"].contains($0["name"] as? String ?? "") }, "failed imports leave no volume")

        // Online: through the running server's socket.
        let server = try startServer([pool, "-U", sock], socket: sock)
        defer { _ = stopServer(server) }
        #expect(try pmemNBD(["volume", "create", "vm2", "--from", qcow, "--pool", pool], timeout: 120).status == 0)
        #expect(try tool(["qemu-img", "compare", "-F", "raw", qcow, unixURI(sock, "vm2")]).status == 0)
        let q2 = d.file("out.qcow2")
        #expect(try pmemNBD(["volume", "export", "vm2", q2, "--format", "qcow2", "--pool", pool], timeout: 120).status == 0)
        #expect(try tool(["qemu-img", "compare", qcow, q2]).status == 0)
        #expect(json(try tool(["qemu-img", "info", "--output=json", q2]).stdout)["format"] as? String == "qcow2")
    }

    /// `snapshot create` says what a name may be; `snapshot list VOL --json` lists VOL's
    /// snapshots only (issue 13 item 7), and an unknown VOL is an error.
    @Test func snapshotNamesAndLists() throws {
        let d = ScratchDirectory()
        let pool = d.file("p.pool")
        #expect(try pmemNBD(["create", pool, "--size", "64M"]).status == 0)
        let spaced = try pmemNBD(["snapshot", "create", "pmem0@a b", "--pool", pool])
        #expect(spaced.status == 1 && spaced.stderr.contains("1 to 63 bytes") && spaced.stderr.contains("spaces"), "\(spaced.stderr)")
        let noAt = try pmemNBD(["snapshot", "create", "a b", "--pool", pool])
        #expect(noAt.status == 1 && noAt.stderr.contains("VOL@SNAP") && noAt.stderr.contains("1 to 63 bytes"), "\(noAt.stderr)")
        #expect(try pmemNBD(["volume", "create", "db", "--size", "8M", "--pool", pool]).status == 0)
        #expect(try pmemNBD(["snapshot", "create", "pmem0@a", "--pool", pool]).status == 0)
        #expect(try pmemNBD(["snapshot", "create", "db@b", "--pool", pool]).status == 0)
        let listed = json(try pmemNBD(["snapshot", "list", "db", "--json", "--pool", pool]).stdout)
        #expect((listed["volumes"] as? [[String: Any]])?.map { $0["name"] as? String } == ["db@b"], "\(listed)")
        let all = json(try pmemNBD(["snapshot", "list", "--json", "--pool", pool]).stdout)
        #expect((all["volumes"] as? [[String: Any]])?.map { $0["name"] as? String } == ["pmem0@a", "db@b"], "\(all)")
        let text = try pmemNBD(["snapshot", "list", "db", "--pool", pool])
        #expect(text.stdout.contains("db@b") && !text.stdout.contains("pmem0@a"))
        let unknown = try pmemNBD(["snapshot", "list", "nosuch", "--pool", pool])
        #expect(unknown.status == 1 && unknown.stderr.contains("no volume named 'nosuch'"), "\(unknown.stderr)")
    }

    /// `export-diff … -` writes to standard output the same bytes as to a file, online and
    /// offline; an existing file needs --force.
    @Test func exportDiffToStandardOutput() throws {
        let d = ScratchDirectory()
        let pool = d.file("p.pool"), sock = d.file("s.sock")
        let server = try startServer([pool, "--create", "32M", "-U", sock], socket: sock)
        let c = try connectWhenReady(sock)
        try c.pwrite(pattern(65_536, seed: 3), offset: 0)
        #expect(try pmemNBD(["snapshot", "create", "pmem0@a", "--pool", pool]).status == 0)
        try c.pwrite(pattern(8192, seed: 4), offset: 1 << 20)
        try c.trim(count: 4096, offset: 0)
        try c.flush()
        #expect(try pmemNBD(["snapshot", "create", "pmem0@b", "--pool", pool]).status == 0)
        let toFile = try pmemNBD(["export-diff", "pmem0@a", "pmem0@b", d.file("f.diff"), "--pool", pool])
        #expect(toFile.status == 0, "\(toFile.stderr)")
        let piped = try shell("pmem-nbd export-diff pmem0@a pmem0@b - --pool p.pool > piped.diff", in: d.path)
        #expect(piped.status == 0 && piped.stderr.contains("wrote standard output"), "\(piped.stderr)")
        let file = try Data(contentsOf: URL(fileURLWithPath: d.file("f.diff")))
        #expect(file.starts(with: Array("rbd diff v1\n".utf8)) && file.count > 8192)
        #expect(try Data(contentsOf: URL(fileURLWithPath: d.file("piped.diff"))) == file)
        let again = try pmemNBD(["export-diff", "pmem0@a", "pmem0@b", d.file("f.diff"), "--pool", pool])
        #expect(again.status == 1 && again.stderr.contains("exists") && again.stderr.contains("--force"), "\(again.stderr)")
        #expect(try pmemNBD(["export-diff", "pmem0@a", "pmem0@b", d.file("f.diff"), "--force", "--pool", pool]).status == 0)
        // An error with standard output: nothing hangs, status 1.
        let bad = try shell("pmem-nbd export-diff pmem0@a pmem0@nope - --pool p.pool > bad.diff", in: d.path, timeout: 30)
        #expect(bad.status == 1 && bad.stderr.contains("pmem0@nope"), "\(bad.stderr)")
        try c.shutdown()
        #expect(stopServer(server).status == 0)
        // Offline, the same bytes.
        let offline = try shell("pmem-nbd export-diff pmem0@a pmem0@b - --pool p.pool > offline.diff", in: d.path)
        #expect(offline.status == 0, "\(offline.stderr)")
        #expect(try Data(contentsOf: URL(fileURLWithPath: d.file("offline.diff"))) == file)
    }
}

// MARK: - Messages and exit codes

@Suite(.timeLimit(.minutes(4))) struct FirstHourMessageTests {
    /// `check` exits 8 when it cannot check (fsck's "operational error"), never 1, which means
    /// "repaired" (issue 13 item 7).
    @Test func checkExitsEightWhenItCannotCheck() throws {
        let d = ScratchDirectory()
        let pool = d.file("p.pool"), sock = d.file("s.sock")
        let missing = try pmemNBD(["check", d.file("missing.pool")])
        #expect(missing.status == 8 && missing.stderr.contains("missing.pool"), "\(missing.status) \(missing.stderr)")
        try Data((0..<65_536).map { UInt8($0 % 251) }).write(to: URL(fileURLWithPath: d.file("junk")))
        let junk = try pmemNBD(["check", d.file("junk")])
        #expect(junk.status == 8 && junk.stderr.contains("junk"), "\(junk.status) \(junk.stderr)")
        let server = try startServer([pool, "--create", "16M", "-U", sock], socket: sock)
        let served = try pmemNBD(["check", pool])
        #expect(served.status == 8 && served.stderr.contains("in use"), "\(served.status) \(served.stderr)")
        #expect(stopServer(server).status == 0)
        #expect(try pmemNBD(["check", pool]).status == 0)
    }

    /// A pid file that cannot be written: the error names it, and nothing is left behind
    /// (sockets, control socket, feed).
    @Test func pidFileErrorNamesTheFileAndLeavesNothing() throws {
        let d = ScratchDirectory()
        let pool = d.file("p.pool"), sock = d.file("s.sock")
        let r = try pmemNBD(["serve", pool, "--create", "16M", "-U", sock, "--pidfile", "/nonexistent/dir/p.pid"])
        #expect(r.status == 1 && r.stderr.contains("/nonexistent/dir/p.pid"), "\(r.stderr)")
        for left in [sock, pool + ".ctl", pool + ".feed"] { #expect(!fileExists(left), "\(left) was left behind") }
        // The pool itself was made, and serves now.
        let server = try startServer([pool, "-U", sock], socket: sock)
        #expect(stopServer(server).status == 0)
    }

    /// A damaged header: the error names the pool and says how to repair it; the repair works.
    @Test func damagedHeaderSaysHowToRepair() throws {
        let d = ScratchDirectory()
        let pool = d.file("p.pool")
        #expect(try pmemNBD(["create", pool, "--size", "16M"]).status == 0)
        try patch(pool, at: 40, [0x55])
        let r = try pmemNBD(["serve", pool, "-U", d.file("s.sock")])
        #expect(r.status == 1 && r.stderr.contains("\(pool): pool header checksum mismatch")
                && r.stderr.contains("run 'pmem-nbd check --repair \(pool)'"), "\(r.stderr)")
        #expect(try pmemNBD(["check", "--repair", pool]).status == 1)
        #expect(try pmemNBD(["check", pool]).status == 0)
        #expect(try pmemNBD(["info", pool]).status == 0)
    }

    /// Beside a read-only server: `volume list` works; a change says why it cannot.
    @Test func readOnlyServerIsExplained() throws {
        let d = ScratchDirectory()
        let pool = d.file("p.pool"), sock = d.file("s.sock")
        #expect(try pmemNBD(["create", pool, "--size", "32M"]).status == 0)
        let server = try startServer([pool, "-r", "-U", sock], socket: sock)
        defer { _ = stopServer(server) }
        let list = try pmemNBD(["volume", "list", "--pool", pool])
        #expect(list.status == 0 && list.stdout.contains("pmem0"), "\(list.stderr)")
        let create = try pmemNBD(["volume", "create", "x", "--size", "1M", "--pool", pool])
        #expect(create.status == 1 && create.stderr.contains("served read-only") && create.stderr.contains("no control socket"), "\(create.stderr)")
    }

    /// `feed --follow` names volumes in its JSON and, when the server stops, says so and
    /// exits 1.
    @Test func feedFollowNamesVolumesAndReportsTheEnd() throws {
        let d = ScratchDirectory()
        let pool = d.file("p.pool"), sock = d.file("s.sock")
        let server = try startServer([pool, "--create", "16M", "-U", sock], socket: sock)
        for _ in 0..<250 where !fileExists(pool + ".feed") { usleep(20_000) }
        let follow = try ServerProcess(["feed", "--follow", "--json", "--pool", pool], captureStdout: true)
        usleep(300_000)
        let c = try connectWhenReady(sock)
        try c.pwrite(pattern(4096, seed: 5), offset: 0)
        let lines = follow.readLines(1, timeout: 20)
        let event = json(lines.first ?? "")
        #expect(event["kind"] as? String == "remap" && event["name"] as? String == "pmem0", "\(lines)")
        try c.shutdown()
        #expect(stopServer(server).status == 0)
        let status = follow.stop(signal: 0, timeout: 20)
        #expect(status == 1, "feed --follow ended with \(status)")
        #expect(follow.stderrText.contains("the server stopped"), "\(follow.stderrText)")
    }

    /// A write that fails for want of space leaves one warning in the log per interval.
    @Test func noSpaceIsLoggedOnce() throws {
        let d = ScratchDirectory()
        let pool = d.file("p.pool"), sock = d.file("s.sock")
        // A 64 MiB volume in a 16 MiB pool: thin, overcommitted.
        let made = try pmemNBD(["create", pool, "--size", "16M", "--volume-size", "64M"])
        #expect(made.status == 0)
        let server = try startServer([pool, "-U", sock], socket: sock)
        let c = try connectWhenReady(sock)
        var failures = 0
        let started = Date()
        for i in 0..<32 {
            do { try c.pwrite(pattern(1 << 20, seed: UInt64(i)), offset: UInt64(i) << 20) } catch { failures += 1 }
        }
        let elapsed = Date().timeIntervalSince(started)
        #expect(failures > 3)
        try c.shutdown()
        let (status, stderr) = stopServer(server)
        #expect(status == 0)
        // One warning per 10 s at most (a loaded machine may take longer than 10 s for this).
        let warnings = stderr.components(separatedBy: "\n").filter { $0.contains("the pool is full") }
        #expect(warnings.count >= 1 && warnings.count <= 1 + Int(elapsed / 10), "\(failures) failures in \(elapsed) s: \(stderr)")
        #expect(warnings.first?.contains("export pmem0") == true && warnings.first?.contains("ENOSPC") == true)
    }
}

// MARK: - Conventions of the ecosystem

@Suite(.timeLimit(.minutes(4))) struct FirstHourConventionTests {
    /// One line per listener on stderr; read-only says so; --log-timestamps and --log null.
    @Test func startLines() throws {
        let d = ScratchDirectory()
        let pool = d.file("p.pool"), sock = d.file("s.sock")
        let server = try startServer([pool, "--create", "16M", "-U", sock, "-p", "0", "--print-uri"], socket: sock, captureStdout: true)
        let uris = server.readLines(2)
        let (status, stderr) = stopServer(server)
        #expect(status == 0 && uris.count == 2)
        for uri in uris { #expect(stderr.contains("pmem-nbd: serving pmem0 (16 MiB) at \(uri)\n"), "\(uri): \(stderr)") }
        #expect(uris.contains { $0.hasPrefix("nbd://localhost:") })
        let ro = try startServer([pool, "-U", sock, "-r", "--log-timestamps"], socket: sock)
        let (_, roText) = stopServer(ro)
        let line = roText.split(separator: "\n").first { $0.contains("serving") } ?? ""
        #expect(line.contains("pmem-nbd: serving pmem0 (16 MiB, read-only) at"), "\(roText)")
        #expect(line.range(of: #"^20\d\d-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z pmem-nbd: "#, options: .regularExpression) != nil, "\(line)")
        let quiet = try startServer([pool, "-U", sock, "--log", "null"], socket: sock)
        let (_, quietText) = stopServer(quiet)
        #expect(quietText.isEmpty, "\(quietText)")
        let wrong = try pmemNBD(["serve", pool, "-U", sock, "--log", "file"])
        #expect(wrong.status == 1 && wrong.stderr.contains("--log must be stderr, syslog or null"))
    }

    /// nbdkit's captive mode: --run with $uri, $unixsocket, $exportname; the server stops when
    /// the command exits and exits with its status; the private socket's directory goes away.
    @Test func runCommand() throws {
        let d = ScratchDirectory()
        let pool = d.file("p.pool")
        let script = """
        set -e
        test -S "$unixsocket"
        dirname "$unixsocket" > '\(d.file("dir"))'
        echo "$exportname" > '\(d.file("name"))'
        nbdinfo --size "$uri" > '\(d.file("size"))'
        exit 7
        """
        let r = try pmemNBD(["serve", pool, "--create", "16M", "--run", script])
        #expect(r.status == 7, "\(r.stderr)")
        #expect((try? String(contentsOfFile: d.file("size"), encoding: .utf8)) == "\(16 << 20)\n")
        #expect((try? String(contentsOfFile: d.file("name"), encoding: .utf8)) == "pmem0\n")
        let dir = (try? String(contentsOfFile: d.file("dir"), encoding: .utf8))?.trimmingCharacters(in: .whitespacesAndNewlines) ?? ""
        #expect(!dir.isEmpty && !fileExists(dir), "the private directory \(dir) was removed")
        // qemu-img as the command, with an explicit socket and the --exportname spelling.
        let image = d.file("img.raw")
        #expect(try tool(["qemu-img", "create", "-f", "raw", image, "1M"]).status == 0)
        let convert = try pmemNBD(["serve", pool, "-U", d.file("s.sock"), "--exportname", "disk",
                                   "--run", "qemu-img convert -n -f raw '\(image)' -O raw \"$uri\" && test \"$exportname\" = disk"], timeout: 120)
        #expect(convert.status == 0, "\(convert.stderr)")
        #expect(!fileExists(d.file("s.sock")))
        let together = try pmemNBD(["serve", pool, "--run", "true", "--fork"])
        #expect(together.status == 1 && together.stderr.contains("--run and --fork"))
    }

    /// -U - : a private socket, printed with --print-uri, gone after the server stops.
    @Test func privateSocket() throws {
        let d = ScratchDirectory()
        let pool = d.file("p.pool")
        let server = try startServer([pool, "--create", "16M", "-U", "-", "--print-uri"], socket: nil, captureStdout: true)
        let uri = server.readLines(1).first ?? ""
        #expect(uri.hasPrefix("nbd+unix:///pmem0?socket="), "\(uri)")
        let socket = String(uri.drop { $0 != "=" }.dropFirst())
        #expect(socket.hasPrefix("/") && socket.hasSuffix("/socket"), "\(uri)")
        #expect(try tool(["nbdinfo", "--size", uri]).stdout == "\(16 << 20)\n")
        #expect(stopServer(server).status == 0)
        let directory = socket.hasSuffix("/socket") ? String(socket.dropLast("/socket".count)) : socket
        #expect(!socket.isEmpty && !fileExists(socket) && !fileExists(directory))
        killProcesses(inDirectory: d.path)
    }

    /// --exit-with-parent: the server stops cleanly (pid file and socket removed) when the
    /// shell that started it exits.
    @Test func exitWithParent() throws {
        let d = ScratchDirectory()
        // setsid: the server leaves the shell's process group, which the harness kills when
        // the shell ends; only the parent's death may stop it.
        let r = try shell("""
        setsid pmem-nbd serve p.pool --create 16M -U s.sock --pidfile p.pid --exit-with-parent &
        for i in $(seq 200); do [ -f p.pid ] && break; sleep 0.05; done
        cat p.pid
        """, in: d.path, timeout: 30, reap: false)
        defer { killProcesses(inDirectory: d.path) }
        let pid = pid_t(r.stdout.trimmingCharacters(in: .whitespacesAndNewlines)) ?? 0
        #expect(pid > 0, "\(r.stdout) \(r.stderr)")
        var gone = false
        for _ in 0..<200 where !gone {
            gone = !fileExists(d.file("p.pid")) && kill(pid, 0) != 0
            if !gone { usleep(50_000) }
        }
        #expect(gone, "the server outlived its parent")
        #expect(!fileExists(d.file("s.sock")))
    }

    /// SIGHUP stops the server cleanly, as nbdkit and qemu-nbd do (issue 13 item 7).
    @Test func sighupStopsCleanly() throws {
        let d = ScratchDirectory()
        let pool = d.file("p.pool"), sock = d.file("s.sock"), pid = d.file("p.pid")
        let server = try startServer([pool, "--create", "16M", "-U", sock, "--pidfile", pid], socket: sock)
        for _ in 0..<250 where !fileExists(pid) { usleep(20_000) }
        let c = try connectWhenReady(sock)
        try c.pwrite(pattern(4096, seed: 8), offset: 0)
        let (status, _) = stopServer(server, signal: SIGHUP)
        #expect(status == 0)
        #expect(!fileExists(sock) && !fileExists(pid) && !fileExists(pool + ".ctl"))
        #expect(try pmemNBD(["check", pool]).status == 0)
    }

    /// A stop signal the moment the socket appears is never lost: the signals are blocked from
    /// the start and taken by a sigwait thread (Dispatch signal sources, installed
    /// asynchronously, let one through to SIG_IGN about once in 40 starts on a loaded machine).
    @Test func stopSignalRightAfterListening() throws {
        let d = ScratchDirectory()
        let pool = d.file("p.pool"), sock = d.file("s.sock")
        #expect(try pmemNBD(["create", pool, "--size", "16M"]).status == 0)
        for round in 0..<24 {
            let server = try startServer([pool, "-U", sock], socket: sock)
            let (status, text) = stopServer(server, signal: [SIGTERM, SIGHUP, SIGINT][round % 3])
            #expect(status == 0, "round \(round): status \(status) \(text)")
            if status != 0 { unlink(sock); unlink(pool + ".ctl"); unlink(pool + ".feed") }
        }
    }

    /// `-e NAME` where NAME is another volume: that volume is the default export, listed once;
    /// the first volume keeps its name (issue 13 item 7). An unknown NAME renames the first.
    @Test func exportNameOfAnotherVolume() throws {
        let d = ScratchDirectory()
        let pool = d.file("p.pool"), sock = d.file("s.sock")
        #expect(try pmemNBD(["create", pool, "--size", "64M"]).status == 0)
        #expect(try pmemNBD(["volume", "create", "db", "--size", "8M", "--pool", pool]).status == 0)
        func exports() throws -> [String] {
            let list = json(try tool(["nbdinfo", "--list", "--json", unixURI(sock)]).stdout)
            return (list["exports"] as? [[String: Any]] ?? []).compactMap { $0["export-name"] as? String }
        }
        let server = try startServer([pool, "-U", sock, "-e", "db"], socket: sock)
        #expect(try exports() == ["pmem0", "db"])
        #expect(try tool(["nbdinfo", "--size", unixURI(sock)]).stdout == "\(8 << 20)\n", "the default export is db")
        let (_, text) = stopServer(server)
        #expect(text.contains("serving db (8 MiB) at nbd+unix:///db?socket="), "\(text)")
        let alias = try startServer([pool, "-U", sock, "--export-name", "disk"], socket: sock)
        #expect(try exports() == ["disk", "db"])
        #expect(try tool(["nbdinfo", "--size", unixURI(sock, "disk")]).status == 0)
        _ = stopServer(alias)
    }

    @Test func pmemDaxReadHelpAndReadme() throws {
        let dax = (pmemNBDBinary as NSString).deletingLastPathComponent + "/pmem-dax-read"
        let help = try tool([dax, "--help"])
        #expect(help.status == 0 && help.stdout.contains("pmem0"), "\(help.stderr)")
        let d = ScratchDirectory()
        let pool = d.file("p.pool"), sock = d.file("s.sock")
        let server = try startServer([pool, "--create", "16M", "-U", sock], socket: sock)
        defer { _ = stopServer(server) }
        for _ in 0..<250 where !fileExists(pool + ".feed") { usleep(20_000) }
        let c = try connectWhenReady(sock)
        try c.pwrite([UInt8](repeating: 0x5a, count: 4096), offset: 0)
        try c.flush()
        let r = try shell("pmem-dax-read --feed p.pool.feed --nbd s.sock pmem0 0 4096 | od -A n -t x1 | sort -u", in: d.path)
        #expect(r.status == 0 && r.stdout.trimmingCharacters(in: .whitespacesAndNewlines).hasPrefix("5a 5a"), "\(r.stdout) \(r.stderr)")
    }
}
