import Foundation
import Glibc
import PmemNBD
@testable import TestSupport
import Testing

/// `pmem-nbd export-diff`: RBD diff v1 files, checked against the format as Ceph documents it
/// (doc/dev/rbd-diff.rst) by a strict parser here, and by Ceph's own `rbd merge-diff`.
@Suite(.serialized, .timeLimit(.minutes(5))) struct ExportDiffTests {
    /// One parsed diff: metadata and data records in file order.
    struct RBDDiff {
        enum Record: Equatable { case data(UInt64, [UInt8]), zero(UInt64, UInt64) }
        var from: String?
        var to: String?
        var size: UInt64?
        var records: [Record] = []

        /// Parses per the spec; throws on anything it does not allow.
        init(_ bytes: [UInt8]) throws {
            struct Bad: Error, CustomStringConvertible { let description: String }
            var at = 0
            func take(_ n: Int) throws -> ArraySlice<UInt8> {
                guard n >= 0, at + n <= bytes.count else { throw Bad(description: "truncated at \(at)") }
                defer { at += n }
                return bytes[at..<at + n]
            }
            func le(_ n: Int) throws -> UInt64 { try take(n).reversed().reduce(0) { $0 << 8 | UInt64($1) } }
            guard try Array(take(12)) == Array("rbd diff v1\n".utf8) else { throw Bad(description: "bad header") }
            var sawData = false
            var lastEnd: UInt64 = 0
            while true {
                let tag = try take(1).first!
                switch tag {
                case UInt8(ascii: "f"), UInt8(ascii: "t"):
                    guard !sawData else { throw Bad(description: "metadata after data") }
                    let n = Int(try le(4))
                    let name = String(decoding: try take(n), as: UTF8.self)
                    if tag == UInt8(ascii: "f") { from = name } else { to = name }
                case UInt8(ascii: "s"):
                    guard !sawData else { throw Bad(description: "metadata after data") }
                    size = try le(8)
                case UInt8(ascii: "w"), UInt8(ascii: "z"):
                    sawData = true
                    let offset = try le(8), length = try le(8)
                    guard let size, offset >= lastEnd, length > 0, offset + length <= size else {
                        throw Bad(description: "record \(offset)+\(length) out of order or beyond the size")
                    }
                    lastEnd = offset + length
                    if tag == UInt8(ascii: "w") {
                        records.append(.data(offset, Array(try take(Int(length)))))
                    } else {
                        records.append(.zero(offset, length))
                    }
                case UInt8(ascii: "e"):
                    guard at == bytes.count else { throw Bad(description: "bytes after the end record") }
                    return
                default:
                    throw Bad(description: "unknown tag \(tag) at \(at - 1)")
                }
            }
        }

        /// What `rbd import-diff` does to an image.
        func apply(to image: inout [UInt8]) {
            if let size {
                if image.count > Int(size) { image.removeLast(image.count - Int(size)) }
                image += [UInt8](repeating: 0, count: Int(size) - image.count)
            }
            for r in records {
                switch r {
                case .data(let o, let d): image.replaceSubrange(Int(o)..<Int(o) + d.count, with: d)
                case .zero(let o, let n): image.replaceSubrange(Int(o)..<Int(o + n), with: [UInt8](repeating: 0, count: Int(n)))
                }
            }
        }
    }

    static func read(_ path: String) throws -> [UInt8] { [UInt8](try Data(contentsOf: URL(fileURLWithPath: path))) }

    /// The whole content of an export, through libnbd.
    static func content(_ sock: String, export: String) throws -> [UInt8] {
        let c = try connectWhenReady(sock) { try $0.setExportName(export) }
        let size = Int(try c.size)
        var out: [UInt8] = []
        var at = 0
        while at < size {
            let n = min(4 << 20, size - at)
            out += try c.pread(count: n, offset: UInt64(at))
            at += n
        }
        return out
    }

    @Test func incrementalDiffsRebuildEachSnapshotAndCephReadsThem() throws {
        #expect(haveTool("rbd"), "rbd (ceph-common) is needed: scripts/test installs it")
        let d = ScratchDirectory()
        let pool = d.file("p.pool"), sock = d.file("s.sock")
        #expect(try run([pmemNBDBinary, "create", pool, "--size", "64M", "--volume-size", "24M"]).status == 0)
        let server = try ServerProcess(["serve", pool, "-U", sock])
        #expect(server.waitForSocket(sock))
        let c = try connectWhenReady(sock)
        var rng = SystemRandomNumberGenerator()
        let blocks = UInt64(24 << 20) / 4096
        // Before A: the first MiB, scattered blocks, a run crossing a map leaf, a sub-block write.
        try c.pwrite(pattern(1 << 20, seed: 899), offset: 0)
        for i in 0..<200 { try c.pwrite(pattern(4096, seed: UInt64(i)), offset: UInt64.random(in: 0..<blocks, using: &rng) * 4096) }
        try c.pwrite(pattern(64 << 10, seed: 900), offset: (512 - 8) * 4096)
        try c.pwrite(pattern(100, seed: 901), offset: 7 * 4096 + 33)
        try c.flush()
        #expect(try run([pmemNBDBinary, "snapshot", "create", "--pool", pool, "pmem0@a"]).status == 0)
        // A to B: rewrites, trims (zero records), zeroing, new blocks at the very end.
        for i in 0..<150 { try c.pwrite(pattern(4096, seed: 1000 + UInt64(i)), offset: UInt64.random(in: 0..<blocks, using: &rng) * 4096) }
        try c.trim(count: 1 << 20, offset: 0)
        try c.zero(count: 64 << 10, offset: 8 << 20)
        try c.pwrite(pattern(8192, seed: 902), offset: (24 << 20) - 8192)
        try c.flush()
        #expect(try run([pmemNBDBinary, "snapshot", "create", "--pool", pool, "pmem0@b"]).status == 0)

        // Online (the server writes the files), relative path resolved by the CLI.
        let full = try run([pmemNBDBinary, "export-diff", "--pool", pool, "pmem0@a", d.file("a.diff")])
        #expect(full.status == 0, "\(full.stderr)")
        #expect(full.stdout.contains("wrote"))
        let inc = try run([pmemNBDBinary, "export-diff", "--pool", pool, "--json", "pmem0@a", "pmem0@b", d.file("ab.diff")])
        #expect(inc.status == 0, "\(inc.stderr)")
        let summary = try JSONSerialization.jsonObject(with: Data(inc.stdout.utf8)) as? [String: Any]
        #expect((summary?["zero_bytes"] as? NSNumber)?.intValue ?? 0 >= 1 << 20)

        let contentA = try Self.content(sock, export: "pmem0@a")
        let contentB = try Self.content(sock, export: "pmem0@b")
        #expect(contentA != contentB)

        let a = try RBDDiff(Self.read(d.file("a.diff")))
        #expect(a.from == nil && a.to == "a" && a.size == 24 << 20)
        #expect(!a.records.contains { if case .zero = $0 { true } else { false } })
        var image: [UInt8] = []
        a.apply(to: &image)
        #expect(image == contentA)

        let ab = try RBDDiff(Self.read(d.file("ab.diff")))
        #expect(ab.from == "a" && ab.to == "b")
        // Only what changed is in it: 150 blocks rewritten, 1 MiB trimmed, 64 KiB zeroed, 8 KiB new.
        let dataBytes = ab.records.reduce(0) { if case .data(_, let x) = $1 { $0 + x.count } else { $0 } }
        #expect(dataBytes <= (150 * 4096 + 64 << 10 + 8192), "\(dataBytes) bytes of data in an incremental diff")
        ab.apply(to: &image)
        #expect(image == contentB)

        // Ceph's own tool reads both and merges them into a diff that also rebuilds B.
        let merged = try run(["rbd", "merge-diff", "--no-progress", d.file("a.diff"), d.file("ab.diff"), d.file("merged.diff")])
        #expect(merged.status == 0, "\(merged.stderr)")
        let m = try RBDDiff(Self.read(d.file("merged.diff")))
        var fromMerged: [UInt8] = []
        m.apply(to: &fromMerged)
        #expect(fromMerged == contentB)
        #expect(server.stop() == 0)

        // Offline: the CLI opens the pool itself; the full export of B also rebuilds B.
        let offline = try run([pmemNBDBinary, "export-diff", "--pool", pool, "pmem0@b", d.file("b.diff")])
        #expect(offline.status == 0, "\(offline.stderr)")
        #expect(!offline.stderr.contains("\r"), "no progress bar when stderr is not a terminal")
        var fromFull: [UInt8] = []
        try RBDDiff(Self.read(d.file("b.diff"))).apply(to: &fromFull)
        #expect(fromFull == contentB)
    }

    /// The replicator's check of a resend: which part of the image's changes lies outside the
    /// ranges the interrupted difference covers. Each case is a (changed, covered, expected).
    @Test func changesOutsideTheCoveredRanges() {
        typealias R = [(offset: UInt64, length: UInt64)]
        let covered: [(UInt64, UInt64)] = [(4096, 8192), (16384, 4096), (65536, 65536)]
        #expect(RBDReplicator.outside([], covered) == nil)
        #expect(RBDReplicator.outside([(4096, 8192)] as R, covered) == nil)
        #expect(RBDReplicator.outside([(8192, 512), (16384, 4096), (70000, 100)] as R, covered) == nil)
        #expect(RBDReplicator.outside([(0, 512)] as R, covered)! == (0, 512))
        // Straddles the end of a range and the gap after it.
        #expect(RBDReplicator.outside([(8192, 8192)] as R, covered)! == (12288, 4096))
        // Spans two ranges and the gap between them.
        #expect(RBDReplicator.outside([(12288 - 512, 8192)] as R, [(4096, 8192), (16384, 4096)])! == (12288, 4096))
        // Beyond the last range, and with nothing covered at all.
        #expect(RBDReplicator.outside([(131072, 1)] as R, covered)! == (131072, 1))
        #expect(RBDReplicator.outside([(0, 1)] as R, [])! == (0, 1))
        // The first stray part is reported, after covered changes.
        #expect(RBDReplicator.outside([(4096, 10), (20480, 10), (30000, 5)] as R, covered)! == (20480, 10))
    }

    @Test func refusesPointsOfDifferentVolumesAndLeavesNoFile() throws {
        let d = ScratchDirectory()
        let pool = d.file("p.pool")
        #expect(try run([pmemNBDBinary, "create", pool, "--size", "64M", "--volume-size", "8M"]).status == 0)
        #expect(try run([pmemNBDBinary, "volume", "create", "--pool", pool, "other", "--size", "8M"]).status == 0)
        #expect(try run([pmemNBDBinary, "snapshot", "create", "--pool", pool, "other@x"]).status == 0)
        #expect(try run([pmemNBDBinary, "snapshot", "create", "--pool", pool, "pmem0@y"]).status == 0)
        let r = try run([pmemNBDBinary, "export-diff", "--pool", pool, "other@x", "pmem0@y", d.file("bad.diff")])
        #expect(r.status != 0)
        #expect(r.stderr.contains("not a snapshot of the volume"))
        #expect(!FileManager.default.fileExists(atPath: d.file("bad.diff")))
        let missing = try run([pmemNBDBinary, "export-diff", "--pool", pool, "pmem0@nope", d.file("bad.diff")])
        #expect(missing.status != 0 && missing.stderr.contains("no volume or snapshot 'pmem0@nope'"))
        let usage = try run([pmemNBDBinary, "export-diff", "--pool", pool, d.file("bad.diff")])
        #expect(usage.status != 0 && usage.stderr.contains("FROM TO FILE"))
    }

    @Test func progressBarOnlyOnATerminal() throws {
        #expect(haveTool("script"), "script (util-linux) gives the command a terminal")
        let d = ScratchDirectory()
        let pool = d.file("p.pool")
        #expect(try run([pmemNBDBinary, "create", pool, "--size", "64M", "--volume-size", "32M"]).status == 0)
        // Under a pseudo-terminal the bar is drawn and cleared, ending at 100%.
        let tty = try run(["script", "-qec", "\(pmemNBDBinary) export-diff --pool \(pool) pmem0 \(d.file("t.diff"))", "/dev/null"],
                          environment: ["TERM": "xterm"])
        #expect(tty.status == 0, "\(tty.stdout)")
        #expect(tty.stdout.contains("export-diff [########################] 100%"), "\(tty.stdout.debugDescription)")
        #expect(tty.stdout.contains("\r\u{1B}[K"))
        let piped = try run([pmemNBDBinary, "export-diff", "--pool", pool, "pmem0", d.file("p.diff")])
        #expect(piped.status == 0 && !piped.stderr.contains("export-diff ["))
        // `create --prefault` allocates with a bar.
        let made = try run(["script", "-qec", "\(pmemNBDBinary) create \(d.file("big.pool")) --size 2G --prefault", "/dev/null"],
                           environment: ["TERM": "xterm"])
        #expect(made.status == 0, "\(made.stdout)")
        #expect(made.stdout.contains("allocate [########################] 100%  2 GiB of 2 GiB"), "\(made.stdout.debugDescription)")
        // `check` draws one too, covering the pool's size.
        let check = try run(["script", "-qec", "\(pmemNBDBinary) check \(pool)", "/dev/null"], environment: ["TERM": "xterm"])
        #expect(check.status == 0, "\(check.stdout)")
        #expect(check.stdout.contains("check [########################] 100%  "), "\(check.stdout.debugDescription)")
        let quiet = try run([pmemNBDBinary, "check", pool])
        #expect(quiet.status == 0 && !quiet.stderr.contains("check ["))
        // Offline deletion too, counting the blocks the volume held alone.
        let sock = d.file("s.sock")
        let server = try ServerProcess(["serve", pool, "-U", sock])
        #expect(server.waitForSocket(sock))
        try connectWhenReady(sock).pwrite(pattern(8 << 20, seed: 5), offset: 0)
        #expect(server.stop() == 0)
        let delete = try run(["script", "-qec", "\(pmemNBDBinary) volume delete --pool \(pool) pmem0", "/dev/null"], environment: ["TERM": "xterm"])
        #expect(delete.status == 0, "\(delete.stdout)")
        #expect(delete.stdout.contains("delete [########################] 100%"), "\(delete.stdout.debugDescription)")
        #expect(delete.stdout.contains("deleted volume pmem0"))
    }
}
