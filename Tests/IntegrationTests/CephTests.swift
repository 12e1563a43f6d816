import Foundation
import Glibc
import PmemNBD
import PmemSystem
@testable import TestSupport
import Testing

/// Replication to a live Ceph cluster and back (`pmem-nbd replicate`, `import-diff`, `volume
/// create --from rbd:`), against a throwaway one-node cluster on 127.0.0.1 that
/// scripts/ceph-test-cluster starts once for the suite (mon, mgr, memstore OSD) and stops after
/// its last test; a watcher stops it when this process ends, whatever happens. Skipped only when
/// the Ceph daemons are not installed (scripts/test installs them).
@Suite(.serialized, .timeLimit(.minutes(5)), .enabled(if: CephCluster.available, "Ceph is not installed (apt-get install ceph-mon ceph-mgr ceph-osd ceph-common; scripts/test does)"))
struct CephTests {
    /// The tests below; the cluster stops when this many have released it.
    static let tests = 6

    /// A served pool with one volume.
    final class Setup {
        let d = ScratchDirectory()
        let pool: String, sock: String
        let server: ServerProcess
        let cluster: CephCluster
        let image: String

        var metrics: String { d.file("m.sock") }

        init(volumeSize: String = "128M", poolSize: String = "1G", image: String) throws {
            cluster = try CephCluster.acquire()
            pool = d.file("p.pool")
            sock = d.file("s.sock")
            self.image = image
            let c = try run([pmemNBDBinary, "create", pool, "--size", poolSize, "--volume-size", volumeSize])
            #expect(c.status == 0, "\(c.stderr)")
            server = try ServerProcess(["serve", pool, "-U", sock, "--metrics", "unix:" + d.file("m.sock")])
            #expect(server.waitForSocket(sock))
        }

        deinit {
            // The OSD keeps the data in memory: remove the test's images.
            for image in images + [image] {
                _ = try? run(["rbd", "-c", cluster.conf, "snap", "purge", "--no-progress", "rbd/\(image)"], timeout: 60)
                _ = try? run(["rbd", "-c", cluster.conf, "rm", "--no-progress", "rbd/\(image)"], timeout: 60)
            }
            CephCluster.release()
        }
        var images: [String] = []

        /// `pmem-nbd replicate --json` once.
        func replicate(_ extra: [String] = [], volume: String = "pmem0", image: String? = nil, timeout: TimeInterval = 180) throws -> ToolResult {
            try run([pmemNBDBinary, "replicate", "--pool", pool, volume, "--to", "rbd:rbd/\(image ?? self.image)", "--json", "-c", cluster.conf] + extra,
                    timeout: timeout)
        }

        /// Writes `count` bytes of `byte` at `offset` of an image behind pmem-nbd's back: a
        /// one-record diff applied with `rbd import-diff`.
        func rbdWrite(_ image: String, at offset: UInt64, _ count: Int, byte: UInt8) throws {
            var diff = Array("rbd diff v1\n".utf8)
            diff.append(UInt8(ascii: "w"))
            withUnsafeBytes(of: offset.littleEndian) { diff += $0 }
            withUnsafeBytes(of: UInt64(count).littleEndian) { diff += $0 }
            diff += [UInt8](repeating: byte, count: count)
            diff.append(UInt8(ascii: "e"))
            let w = try run(["rbd", "-c", cluster.conf, "import-diff", "--no-progress", "-", "rbd/\(image)"], stdin: Data(diff))
            #expect(w.status == 0, "\(w.stderr)")
        }

        func rbd(_ args: [String], timeout: TimeInterval = 120) throws -> ToolResult {
            try run(["rbd", "-c", cluster.conf] + args, timeout: timeout)
        }

        func rbdSnapshots(_ image: String? = nil) throws -> [String] {
            let r = try rbd(["snap", "ls", "--format", "json", "rbd/\(image ?? self.image)"])
            let list = (try? JSONSerialization.jsonObject(with: Data(r.stdout.utf8))) as? [[String: Any]] ?? []
            return list.compactMap { $0["name"] as? String }
        }

        func localSnapshots(_ volume: String = "pmem0") throws -> [String] {
            let r = try run([pmemNBDBinary, "snapshot", "list", "--pool", pool, "--json", volume])
            let rows = json(r.stdout)["volumes"] as? [[String: Any]] ?? []
            return rows.compactMap { ($0["name"] as? String).map { String($0.dropFirst(volume.count + 1)) } }
        }

        /// Whether `rbd export rbd/IMAGE@SNAP` and the pmem-nbd export `local` (read through
        /// nbdcopy) are the same bytes.
        func same(rbd spec: String, local: String) throws -> Bool {
            let a = d.file("rbd.raw"), b = d.file("local.raw")
            defer { unlink(a); unlink(b) }
            let e = try rbd(["export", "--no-progress", "rbd/\(spec)", a])
            #expect(e.status == 0, "rbd export \(spec): \(e.stderr)")
            let c = try run(["nbdcopy", unixURI(sock, local), b], timeout: 120)
            #expect(c.status == 0, "nbdcopy \(local): \(c.stderr)")
            return try run(["cmp", "-s", a, b]).status == 0
        }

        /// Writes through libnbd, in 4 MiB requests.
        func write(_ bytes: [UInt8], at offset: UInt64, export: String = "pmem0") throws {
            let c = try connectWhenReady(sock) { try $0.setExportName(export) }
            var at = 0
            while at < bytes.count {
                let n = min(4 << 20, bytes.count - at)
                try c.pwrite(Array(bytes[at..<at + n]), offset: offset + UInt64(at))
                at += n
            }
            try c.flush()
        }
    }

    static func number(_ r: ToolResult, _ key: String) -> UInt64 { (json(r.stdout)[key] as? NSNumber)?.uint64Value ?? 0 }

    /// A volume under a running fio writer, replicated every 2 s: every replicated snapshot on
    /// the RBD side equals the pmem-nbd snapshot byte for byte; incrementals send less than the
    /// first run. Negative control: two different snapshots compare unequal.
    @Test func replicationUnderFioMatchesEverySnapshot() throws {
        let s = try Setup(image: "fio")
        // 96 MiB of data; fio rewrites blocks of the first 32 MiB, so an incremental carries at
        // most 32 MiB.
        try s.write(randomBytes(96 << 20), at: 0)
        let fio = try ChildProcess(
            executable: resolveTool("fio"),
            arguments: ["fio", "--name=w", "--ioengine=nbd", "--uri=\(unixURI(s.sock, "pmem0"))", "--rw=randwrite", "--bs=4k",
                        "--size=32M", "--time_based", "--runtime=60", "--rate=4m", "--iodepth=4"],
            environment: ["PATH": systemPath], standardOutput: .null, standardError: .null)
        defer { fio.stop(signal: SIGKILL) }
        let log = s.d.file("replicate.log")
        let replicator = try ChildProcess(
            executable: pmemNBDBinary,
            arguments: [pmemNBDBinary, "replicate", "--pool", s.pool, "pmem0", "--to", "rbd:rbd/fio", "--every", "2s", "--keep", "50",
                        "--json", "-c", s.cluster.conf],
            environment: ["PATH": systemPath], standardOutput: .file(log), standardError: .file(s.d.file("replicate.err")))
        defer { replicator.stop(signal: SIGKILL) }
        // Until four runs have finished (or the deadline).
        let deadline = Date().addingTimeInterval(90)
        var runs: [[String: Any]] = []
        while Date() < deadline {
            let text = (try? String(contentsOfFile: log, encoding: .utf8)) ?? ""
            runs = text.split(separator: "\n").map { json(String($0)) }.filter { $0["ok"] as? Bool == true }
            if runs.count >= 4 || !replicator.isRunning { break }
            usleep(200_000)
        }
        replicator.stop(signal: SIGTERM, grace: .seconds(5))
        fio.stop(signal: SIGTERM, grace: .seconds(5))
        let err = (try? String(contentsOfFile: s.d.file("replicate.err"), encoding: .utf8)) ?? ""
        try #require(runs.count >= 4, "replicate --every: \(runs.count) runs; \(err)")
        #expect(runs[0]["base"] is NSNull)
        let first = (runs[0]["bytes_sent"] as? NSNumber)?.uint64Value ?? 0
        #expect(first >= 96 << 20)
        for r in runs.dropFirst() {
            #expect(r["base"] as? String != nil, "\(r)")
            #expect(((r["bytes_sent"] as? NSNumber)?.uint64Value ?? .max) < first, "an incremental sent as much as the full run: \(r)")
        }
        // The snapshots both sides have (a run stopped mid-way may have left one more locally).
        let remote = try s.rbdSnapshots()
        let local = try s.localSnapshots()
        let common = local.filter { remote.contains($0) }
        #expect(common.count >= 4, "local \(local), remote \(remote)")
        for snap in common {
            #expect(try s.same(rbd: "fio@\(snap)", local: "pmem0@\(snap)"), "rbd/fio@\(snap) differs from pmem0@\(snap)")
        }
        // Negative control: the comparison sees a difference (fio wrote between the snapshots).
        #expect(try !s.same(rbd: "fio@\(common[0])", local: "pmem0@\(common[common.count - 1])"))
    }

    /// A transfer killed mid-way (the replicator and its rbd import-diff) resumes from the last
    /// snapshot both sides have: the same snapshot, only the difference sent again.
    @Test func killedTransferResumesWithoutFullResend() throws {
        let s = try Setup(volumeSize: "256M", poolSize: "1G", image: "kill")
        try s.write(randomBytes(64 << 20), at: 0)
        let full = try s.replicate()
        #expect(full.status == 0, "\(full.stderr)")
        let fullBytes = Self.number(full, "bytes_sent")
        // A large difference, so the transfer is still running when it is killed.
        try s.write(randomBytes(160 << 20), at: 64 << 20)
        let replicator = try ChildProcess(
            executable: pmemNBDBinary,
            arguments: [pmemNBDBinary, "replicate", "--pool", s.pool, "pmem0", "--to", "rbd:rbd/kill", "--json", "-c", s.cluster.conf],
            environment: ["PATH": systemPath], standardOutput: .null, standardError: .null)
        defer { replicator.stop(signal: SIGKILL) }
        // Wait for the import to start writing (rbd import-diff is a child of the replicator).
        var importer: pid_t?
        let deadline = Date().addingTimeInterval(60)
        while importer == nil && Date() < deadline && replicator.isRunning {
            importer = childProcesses(of: replicator.pid).first { commandLine($0).contains("import-diff") }
            usleep(20_000)
        }
        try #require(importer != nil, "the replicator never started rbd import-diff")
        // Killed at once: the in-flight mark is set before the import starts, and on a quiet
        // machine the import can finish the 160 MiB within a few hundred milliseconds.
        usleep(20_000)
        kill(importer!, SIGKILL)
        replicator.stop(signal: SIGKILL)
        #expect(!(try s.rbdSnapshots()).contains("repl-2"), "the transfer finished before it was killed: make the difference larger")
        #expect(try s.localSnapshots().contains("repl-2"))
        let meta = try s.rbd(["image-meta", "get", "rbd/kill", "pmem-nbd.inflight"])
        #expect(meta.stdout.trimmingCharacters(in: .whitespacesAndNewlines) == "repl-2")

        let resumed = try s.replicate()
        #expect(resumed.status == 0, "\(resumed.stderr)")
        let r = json(resumed.stdout)
        #expect(r["resumed"] as? Bool == true, "\(r)")
        #expect(r["snapshot"] as? String == "repl-2")
        #expect(r["base"] as? String == "repl-1")
        let sent = Self.number(resumed, "bytes_sent")
        #expect(sent >= 160 << 20 && sent < (160 << 20) + (1 << 20), "resumed run sent \(sent) bytes (full run \(fullBytes))")
        #expect(try s.same(rbd: "kill@repl-2", local: "pmem0@repl-2"))
        // A partial transfer left the head ahead of its last snapshot; now it is that snapshot.
        #expect(try s.rbd(["diff", "--format", "json", "--from-snap", "repl-2", "rbd/kill"]).stdout.trimmingCharacters(in: .whitespacesAndNewlines) == "[]")
        #expect(try s.rbd(["image-meta", "get", "rbd/kill", "pmem-nbd.inflight"]).status != 0)
    }

    /// A resend after an interrupted transfer may overwrite only what that transfer writes: an
    /// image also written elsewhere behind our back is refused, with nothing changed. The
    /// interruption is staged as the replicator leaves it: the snapshot taken, `pmem-nbd.inflight`
    /// set, part of the difference written on the image. Control: the same staging with only
    /// writes inside the difference resumes, and the image then equals the snapshot.
    @Test func resumeRefusesWritesOutsideTheInterruptedTransfer() throws {
        let s = try Setup(image: "res-in")
        s.images.append("res-out")
        let created = try run([pmemNBDBinary, "volume", "create", "--pool", s.pool, "pmem1", "--size", "128M"])
        try #require(created.status == 0, "\(created.stderr)")
        for (volume, image) in [("pmem0", "res-in"), ("pmem1", "res-out")] {
            try s.write(pattern(4 << 20, seed: 7), at: 0, export: volume)
            let first = try s.replicate(volume: volume, image: image)
            try #require(first.status == 0, "\(first.stderr)")
            try s.write(pattern(1 << 20, seed: 8), at: 8 << 20, export: volume)
            #expect(try run([pmemNBDBinary, "snapshot", "create", "--pool", s.pool, "\(volume)@repl-2"]).status == 0)
            #expect(try s.rbd(["image-meta", "set", "rbd/\(image)", "pmem-nbd.inflight", "repl-2"]).status == 0)
            try s.rbdWrite(image, at: (8 << 20) + 4096, 512, byte: 0x11)   // inside the difference
        }
        try s.rbdWrite("res-out", at: 12 << 20, 512, byte: 0x5a)           // outside it

        let resumed = try s.replicate(volume: "pmem0", image: "res-in")
        #expect(resumed.status == 0, "control: writes inside the difference are what the resend overwrites: \(resumed.stderr)")
        #expect(json(resumed.stdout)["resumed"] as? Bool == true, "\(resumed.stdout)")
        #expect(try s.same(rbd: "res-in@repl-2", local: "pmem0@repl-2"))

        let localBefore = try s.localSnapshots("pmem1"), remoteBefore = try s.rbdSnapshots("res-out")
        let refused = try s.replicate(volume: "pmem1", image: "res-out")
        #expect(refused.status == 1)
        #expect(refused.stderr.contains("has diverged") && refused.stderr.contains("outside the interrupted transfer of @repl-2")
                && refused.stderr.contains("offset \(12 << 20)") && refused.stderr.contains("nothing was changed"), "\(refused.stderr)")
        #expect(try s.localSnapshots("pmem1") == localBefore)
        #expect(try s.rbdSnapshots("res-out") == remoteBefore)
        #expect(try s.rbd(["image-meta", "get", "rbd/res-out", "pmem-nbd.inflight"]).stdout.trimmingCharacters(in: .whitespacesAndNewlines) == "repl-2")
    }

    /// An image written behind our back is refused with a clear error and nothing changes on
    /// either side; so are an image that is not this volume's replica and an unreachable
    /// cluster. Control: the same replication succeeds before the write.
    @Test func divergedForeignAndUnreachableAreRefused() throws {
        let s = try Setup(image: "div")
        try s.write(pattern(4 << 20, seed: 3), at: 0)
        #expect(try s.replicate().status == 0)
        try s.write(pattern(4096, seed: 4), at: 1 << 20)
        let control = try s.replicate(["--keep", "5"])
        #expect(control.status == 0, "control: an unchanged image replicates: \(control.stderr)")
        // Written behind our back: a one-sector diff applied with rbd import-diff.
        var diff = Array("rbd diff v1\n".utf8)
        diff.append(UInt8(ascii: "w"))
        withUnsafeBytes(of: UInt64(2 << 20).littleEndian) { diff += $0 }
        withUnsafeBytes(of: UInt64(512).littleEndian) { diff += $0 }
        diff += [UInt8](repeating: 0x5a, count: 512)
        diff.append(UInt8(ascii: "e"))
        let w = try run(["rbd", "-c", s.cluster.conf, "import-diff", "--no-progress", "-", "rbd/div"], stdin: Data(diff))
        #expect(w.status == 0, "\(w.stderr)")
        try s.write(pattern(4096, seed: 5), at: 3 << 20)
        let localBefore = try s.localSnapshots(), remoteBefore = try s.rbdSnapshots()
        let refused = try s.replicate(["--keep", "1"])
        #expect(refused.status == 1)
        #expect(refused.stderr.contains("has diverged") && refused.stderr.contains("nothing was changed"), "\(refused.stderr)")
        #expect(try s.localSnapshots() == localBefore)
        #expect(try s.rbdSnapshots() == remoteBefore)

        // What the runs reported: volume list and the metrics (two successes, one refusal).
        let listed = try run([pmemNBDBinary, "volume", "list", "--pool", s.pool, "--json"])
        let row = (json(listed.stdout)["volumes"] as? [[String: Any]] ?? []).first { $0["name"] as? String == "pmem0" }
        let rep = row?["replication"] as? [String: Any]
        #expect((rep?["runs"] as? NSNumber)?.intValue == 3 && (rep?["failures"] as? NSNumber)?.intValue == 1, "\(rep ?? [:])")
        #expect((rep?["bytes_sent"] as? NSNumber)?.uint64Value ?? 0 >= 4 << 20)
        #expect(rep?["snapshot"] as? String == "repl-2" && rep?["target"] as? String == "rbd:rbd/div")
        #expect(((rep?["lag_seconds"] as? NSNumber)?.doubleValue ?? -1) >= 0)
        let lastError: String = rep?["last_error"] as? String ?? ""
        #expect(lastError.contains("diverged"), "\(rep ?? [:])")
        let text = try run([pmemNBDBinary, "volume", "list", "--pool", s.pool])
        #expect(text.stdout.contains("pmem0 -> rbd:rbd/div: last success"), "\(text.stdout)")
        let scraped = try run([pmemNBDBinary, "stats", "--metrics", "unix:" + s.metrics, "--raw"])
        let labels = "{volume=\"pmem0\",target=\"rbd:rbd/div\"}"
        #expect(scraped.stdout.contains("pmem_nbd_replication_runs_total\(labels) 3"), "\(scraped.stdout.suffix(1500))")
        #expect(scraped.stdout.contains("pmem_nbd_replication_failures_total\(labels) 1"))
        #expect(scraped.stdout.contains("pmem_nbd_replication_lag_seconds\(labels) "))
        #expect(scraped.stdout.contains("pmem_nbd_replication_last_success_timestamp_seconds\(labels) "))

        // Another volume to the same image: not its replica.
        #expect(try run([pmemNBDBinary, "volume", "create", "--pool", s.pool, "other", "--size", "16M"]).status == 0)
        let foreign = try s.replicate(volume: "other")
        #expect(foreign.status == 1 && foreign.stderr.contains("not a replica"), "\(foreign.stderr)")
        #expect(try s.localSnapshots("other").isEmpty)

        // An unreachable cluster: a configuration whose monitor port nobody listens on.
        let dead = s.d.file("dead.conf")
        let port = try freeTCPPort()
        try "[global]\nmon host = 127.0.0.1:\(port)\nauth client required = none\n".write(toFile: dead, atomically: true, encoding: .utf8)
        let start = Date()
        let unreachable = try run([pmemNBDBinary, "replicate", "--pool", s.pool, "pmem0", "--to", "rbd:rbd/div", "-c", dead], timeout: 120)
        #expect(unreachable.status == 1)
        #expect(unreachable.stderr.contains("cluster") || unreachable.stderr.contains("did not finish"), "\(unreachable.stderr)")
        #expect(Date().timeIntervalSince(start) < 90)
        #expect(try s.localSnapshots() == localBefore, "a snapshot was taken although the cluster was unreachable")
    }

    /// pmem-nbd → RBD → pmem-nbd: every replicated snapshot comes back, through `volume create
    /// --from rbd:` (rbd export --export-format 2) and through `import-diff` of v1 diffs.
    @Test func roundTripReproducesEverySnapshot() throws {
        let s = try Setup(image: "trip")
        var snaps: [String] = []
        for i in 0..<3 {
            try s.write(pattern(2 << 20, seed: 10 + UInt64(i)), at: UInt64(i) * (5 << 20))
            if i == 2 {
                let c = try connectWhenReady(s.sock) { try $0.setExportName("pmem0") }
                try c.trim(count: 1 << 20, offset: 0)
                try c.flush()
            }
            if i < 2 {
                let r = try s.replicate(["--keep", "10"])
                #expect(r.status == 0, "\(r.stderr)")
                snaps.append(json(r.stdout)["snapshot"] as? String ?? "?")
            } else {
                // The last one as a control request: the server runs it.
                let r = try VolumeCommand.run(["op": "replicate", "name": "pmem0", "to": "rbd:rbd/trip", "keep": 10, "ceph_conf": s.cluster.conf],
                                              pool: s.pool, control: nil, requireServer: true)
                #expect(r["ok"] as? Bool == true && r["base"] as? String == "repl-2", "\(r)")
                snaps.append(r["snapshot"] as? String ?? "?")
            }
        }
        #expect(snaps == ["repl-1", "repl-2", "repl-3"])
        // Whole image with its snapshots (export format 2).
        let back = try run([pmemNBDBinary, "volume", "create", "--pool", s.pool, "back", "--from", "rbd:rbd/trip", "-c", s.cluster.conf])
        #expect(back.status == 0, "\(back.stderr)")
        #expect(try s.localSnapshots("back") == snaps)
        for snap in snaps {
            #expect(try s.same(rbd: "trip@\(snap)", local: "back@\(snap)"))
            #expect(try s.same(rbd: "trip@\(snap)", local: "pmem0@\(snap)"))
        }
        #expect(try s.same(rbd: "trip", local: "back"))
        // Up to a snapshot.
        let upTo = try run([pmemNBDBinary, "volume", "create", "--pool", s.pool, "back2", "--from", "rbd:rbd/trip@repl-2", "-c", s.cluster.conf])
        #expect(upTo.status == 0, "\(upTo.stderr)")
        #expect(try s.localSnapshots("back2") == ["repl-1", "repl-2"])
        #expect(try s.same(rbd: "trip@repl-2", local: "back2"))
        // v1 diffs, full then incremental, through standard input.
        for (from, to) in [(nil, "repl-1"), ("repl-1", "repl-2"), ("repl-2", "repl-3")] as [(String?, String)] {
            let file = s.d.file("\(to).diff")
            let e = try s.rbd(["export-diff", "--no-progress"] + (from.map { ["--from-snap", $0] } ?? []) + ["rbd/trip@\(to)", file])
            #expect(e.status == 0, "\(e.stderr)")
            let i = try run(["sh", "-c", "\"$0\" import-diff --pool \"$1\" - v1back < \"$2\"", pmemNBDBinary, s.pool, file])
            #expect(i.status == 0, "\(i.stderr)")
        }
        #expect(try s.localSnapshots("v1back") == snaps)
        for snap in snaps { #expect(try s.same(rbd: "trip@\(snap)", local: "v1back@\(snap)")) }
        // Negative control: a diff from a snapshot the volume lacks is refused.
        #expect(try run([pmemNBDBinary, "volume", "create", "--pool", s.pool, "empty", "--size", "128M"]).status == 0)
        let lacking = try run([pmemNBDBinary, "import-diff", "--pool", s.pool, s.d.file("repl-3.diff"), "empty"])
        #expect(lacking.status == 1 && lacking.stderr.contains("does not have"), "\(lacking.stderr)")
    }

    /// `import-diff` refuses malformed streams with a message naming the byte, and a truncated
    /// one leaves no snapshot behind.
    @Test func importDiffRefusesMalformedStreams() throws {
        let s = try Setup(image: "unused")
        func attempt(_ bytes: [UInt8], _ volume: String) throws -> ToolResult {
            let f = s.d.file("bad.diff")
            try Data(bytes).write(to: URL(fileURLWithPath: f))
            return try run([pmemNBDBinary, "import-diff", "--pool", s.pool, f, volume])
        }
        var good = Array("rbd diff v1\n".utf8)
        good.append(UInt8(ascii: "t")); withUnsafeBytes(of: UInt32(2).littleEndian) { good += $0 }; good += Array("s1".utf8)
        good.append(UInt8(ascii: "s")); withUnsafeBytes(of: UInt64(1 << 20).littleEndian) { good += $0 }
        good.append(UInt8(ascii: "w")); withUnsafeBytes(of: UInt64(4096).littleEndian) { good += $0 }
        withUnsafeBytes(of: UInt64(4096).littleEndian) { good += $0 }; good += pattern(4096, seed: 9)
        good.append(UInt8(ascii: "e"))
        let ok = try attempt(good, "fine")
        #expect(ok.status == 0, "control: a well-formed stream imports: \(ok.stderr)")
        #expect(try s.localSnapshots("fine") == ["s1"])
        let truncated = try attempt(Array(good.dropLast(100)), "trunc")
        #expect(truncated.status == 1 && truncated.stderr.contains("ends early"), "\(truncated.stderr)")
        #expect(try s.localSnapshots("trunc").isEmpty)
        var past = good
        past.replaceSubrange(41..<49, with: withUnsafeBytes(of: UInt64(1 << 20).littleEndian) { Array($0) })
        let beyond = try attempt(past, "past")
        #expect(beyond.status == 1 && beyond.stderr.contains("past the end"), "\(beyond.stderr)")
        let junk = try attempt(Array("rbd diff v9\n".utf8), "junk")
        #expect(junk.status == 1 && junk.stderr.contains("is not an RBD diff"), "\(junk.stderr)")
        let trailing = try attempt(good + [0], "trail")
        #expect(trailing.status == 1 && trailing.stderr.contains("after the end"), "\(trailing.stderr)")
    }
}

/// The cluster the suite shares.
final class CephCluster: @unchecked Sendable {
    static var available: Bool { ["ceph-mon", "ceph-mgr", "ceph-osd", "rbd", "monmaptool"].allSatisfy(haveTool) }

    let dir: String
    let conf: String

    private init(dir: String, conf: String) {
        self.dir = dir
        self.conf = conf
    }

    private static let lock = NSLock()
    nonisolated(unsafe) private static var shared: CephCluster?
    nonisolated(unsafe) private static var released = 0
    nonisolated(unsafe) static var exitDir: String?

    static var script: String { repositoryRoot + "/scripts/ceph-test-cluster" }

    /// The running cluster, started on first use.
    static func acquire() throws -> CephCluster {
        lock.lock()
        defer { lock.unlock() }
        if let shared { return shared }
        var template = Array("/tmp/pmem-nbd-ceph-XXXXXX".utf8CString)
        guard mkdtemp(&template) != nil else { throw POSIXError(.EIO) }
        let dir = String(decoding: template.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
        let r = try run([script, "start", dir, "--owner", String(getpid())], timeout: 150)
        guard r.status == 0 else {
            _ = try? run([script, "stop", dir], timeout: 30)
            Issue.record("the Ceph test cluster did not start: \(r.stderr)")
            throw POSIXError(.EIO)
        }
        let c = CephCluster(dir: dir, conf: dir + "/ceph.conf")
        shared = c
        // A test process that exits (a failed #require, the runner ending early) kills the
        // daemons at once; one that is killed leaves that to the script's watcher.
        exitDir = dir
        atexit {
            guard let dir = CephCluster.exitDir else { return }
            for name in ["osd", "mgr", "mon"] {
                if let text = try? String(contentsOfFile: "\(dir)/\(name).pid", encoding: .utf8),
                   let pid = Int32(text.trimmingCharacters(in: .whitespacesAndNewlines)), pid > 0 {
                    kill(pid, SIGKILL)
                }
            }
        }
        return c
    }

    /// One test is done with it; after the suite's last test it is stopped.
    static func release() {
        lock.lock()
        defer { lock.unlock() }
        released += 1
        if released >= CephTests.tests, let c = shared {
            _ = try? run([script, "stop", c.dir], timeout: 30)
            try? FileManager.default.removeItem(atPath: c.dir)
            shared = nil
            exitDir = nil
        }
    }
}

/// `count` random bytes (from /dev/urandom: much faster than generating them in a debug build).
func randomBytes(_ count: Int) -> [UInt8] {
    let h = FileHandle(forReadingAtPath: "/dev/urandom")!
    defer { try? h.close() }
    var out: [UInt8] = []
    out.reserveCapacity(count)
    while out.count < count { out += h.readData(ofLength: min(16 << 20, count - out.count)) }
    return out
}

/// The pids whose parent is `pid`.
func childProcesses(of pid: pid_t) -> [pid_t] {
    let entries = (try? FileManager.default.contentsOfDirectory(atPath: "/proc")) ?? []
    return entries.compactMap { Int32($0) }.filter { p in
        guard let stat = try? String(contentsOfFile: "/proc/\(p)/stat", encoding: .utf8),
              let close = stat.lastIndex(of: ")") else { return false }
        let fields = stat[stat.index(after: close)...].split(separator: " ")
        return fields.count > 2 && Int32(fields[1]) == pid
    }
}

func commandLine(_ pid: pid_t) -> String {
    ((try? String(contentsOfFile: "/proc/\(pid)/cmdline", encoding: .utf8)) ?? "").replacingOccurrences(of: "\0", with: " ")
}

/// A TCP port on 127.0.0.1 nobody listens on (bound, then closed).
func freeTCPPort() throws -> Int {
    let r = try run(["python3", "-c", "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])"])
    return Int(r.stdout.trimmingCharacters(in: .whitespacesAndNewlines)) ?? 1
}
