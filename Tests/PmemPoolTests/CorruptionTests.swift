import Foundation
import Glibc
import PmemPool
import PmemVolumes
import PmemSystem
@testable import TestSupport
import Testing

/// Random damage to a pool file — superblocks, pool state, the volume table, the journal, map
/// nodes, refcounts — then `pmem-nbd check` and `pmem-nbd serve` on it, as separate processes.
/// Neither may crash; the server refuses the pool with a message or serves it; and whatever it
/// serves, a block of one volume never comes back holding another block's data: it reads as
/// written, as zeroes where damage made it a hole, or fails with EIO.
@Suite(.serialized, .timeLimit(.minutes(10))) struct CorruptionTests {
    static let volumeBlocks = 128

    /// A pool with volumes `a` and `b` (512 KiB each, every block written with a pattern of its
    /// volume and block) and a snapshot `a@s`; closed cleanly. Returns the regions to damage.
    static func makePool(_ path: String) throws -> [(name: String, ranges: [Range<UInt64>])] {
        try PoolEngine.create(path: path, size: 32 << 20, volumeName: "a", volumeSize: UInt64(volumeBlocks) << 12)
        let pool = try Pool.open(path: path, persistence: .page, commitMode: .inline)
        _ = try pool.createVolume(name: "b", size: UInt64(volumeBlocks) << 12)
        for (v, seed) in [("a", UInt64(1_000)), ("b", 2_000)] {
            let vol = pool.volume(named: v)!
            for block in 0..<volumeBlocks {
                try pattern(4096, seed: seed + UInt64(block)).withUnsafeBytes { (bytes) throws in
                    var src = BufferByteSource(bytes)
                    try vol.write(offset: UInt64(block) << 12, length: 4096, fua: false, from: &src)
                }
            }
        }
        _ = try pool.createSnapshot(volume: "a", snapshot: "s")
        try pool.close()
        let ro = try PoolEngine.open(path: path, readOnly: true, lock: false)
        let layout = ro.layout
        // Every map node of every record (walked from the roots, as stored).
        var nodes: Set<UInt64> = []
        for r in ro.records() where r.root != 0 {
            var stack = [(r.root & MapEntry.blockMask, r.depth - 1)]
            while let (node, level) = stack.popLast() {
                guard nodes.insert(node).inserted, level > 0 else { continue }
                for i in 0..<512 {
                    let e = ro.metadataWord(at: layout.blockOffset(node) + UInt64(8 * i)) & MapEntry.blockMask
                    if e != 0 { stack.append((e, level - 1)) }
                }
            }
        }
        let table = UInt64(PoolLayout.volumeTableOffset)
        return [
            // The encoded superblock and its backup (the rest of their blocks is unused), the
            // state block's words, the journal's header and first records.
            ("superblock", [0..<256, UInt64(PoolLayout.backupSuperblockOffset)..<UInt64(PoolLayout.backupSuperblockOffset) + 256]),
            ("pool state", [UInt64(PoolLayout.stateOffset)..<UInt64(PoolLayout.stateOffset) + 64]),
            ("volume table", [table..<table + 3 * UInt64(PoolLayout.volumeEntrySize)]),
            ("journal", [layout.journalOffset..<layout.journalOffset + 512]),
            ("map", nodes.sorted().map { layout.blockOffset($0)..<layout.blockOffset($0) + 4096 }),
            ("refcounts", [layout.refcountOffset..<layout.refcountOffset + UInt64(4 * (layout.blockCount > 2048 ? 2048 : layout.blockCount))]),
        ]
    }

    /// One random kind of damage inside `ranges`: flipped bits, a stray 8-byte word, or a
    /// sector of garbage.
    static func damage(_ path: String, _ ranges: [Range<UInt64>], _ rng: inout some RandomNumberGenerator) throws -> String {
        let range = ranges.randomElement(using: &rng)!
        let fd = try FileDescriptor.open(path, O_RDWR)
        defer { fd.close() }
        switch Int.random(in: 0..<3, using: &rng) {
        case 0:
            var what: [String] = []
            for _ in 0..<Int.random(in: 1...8, using: &rng) {
                let at = UInt64.random(in: range, using: &rng)
                var byte = try fd.read(at: Int(at), count: 1)
                let bit = UInt8(1) << UInt8.random(in: 0..<8, using: &rng)
                byte[0] ^= bit
                try fd.writeAll(at: Int(at), bytes: byte)
                what.append("bit \(bit.trailingZeroBitCount) of byte \(at)")
            }
            return "flipped " + what.joined(separator: ", ")
        case 1:
            let at = UInt64.random(in: range, using: &rng) & ~7
            try fd.writeAll(at: Int(at), bytes: (0..<8).map { _ in UInt8.random(in: 0...255, using: &rng) })
            return "a random word at \(at)"
        default:
            let at = max(range.lowerBound, UInt64.random(in: range, using: &rng) & ~511)
            let n = Int(min(512, range.upperBound - at))
            try fd.writeAll(at: Int(at), bytes: (0..<n).map { _ in UInt8.random(in: 0...255, using: &rng) })
            return "\(n) random bytes at \(at)"
        }
    }

    static func crashed(_ text: String) -> Bool {
        text.contains("Fatal error") || text.contains("crashed") || text.contains("Sanitizer")
    }

    /// Reads every block of `export`: each must be its own pattern, zeroes, or an error (or,
    /// with `orSeed`, its pattern before a rewrite that may have failed).
    static func verify(_ sock: String, export: String, seed: UInt64, orSeed: UInt64? = nil, _ what: String) throws -> (ok: Int, zero: Int, failed: Int) {
        guard let c = try? connectWhenReady(sock, timeout: 5, configure: { try $0.setExportName(export) }) else {
            return (0, 0, volumeBlocks) // the export may be gone (a damaged table): allowed
        }
        var counts = (ok: 0, zero: 0, failed: 0)
        let zeroes = [UInt8](repeating: 0, count: 4096)
        for block in 0..<volumeBlocks {
            guard let data = try? c.pread(count: 4096, offset: UInt64(block) << 12) else { counts.failed += 1; continue }
            if data == pattern(4096, seed: seed + UInt64(block)) {
                counts.ok += 1
            } else if let orSeed, data == pattern(4096, seed: orSeed + UInt64(block)) {
                counts.failed += 1
            } else if data == zeroes {
                counts.zero += 1
            } else {
                Issue.record("\(what): block \(block) of \(export) came back with other data")
                counts.failed += 1
            }
        }
        return counts
    }

    @Test func randomDamageIsRefusedReportedOrContained() throws {
        let d = ScratchDirectory()
        let master = d.file("master.pool")
        let regions = try Self.makePool(master)
        var rng = SystemRandomNumberGenerator()
        let trials = 3
        var summary: [String] = []
        for (region, ranges) in regions {
            var refused = 0, served = 0, reported = 0, errors = 0
            for trial in 0..<trials {
                let path = d.file("t.pool"), sock = d.file("t.sock")
                unlink(path)
                unlink(sock)
                #expect(try run(["cp", "--sparse=always", master, path]).status == 0)
                let what = "\(region) trial \(trial): " + (try Self.damage(path, ranges, &rng))

                let check = try run([pmemNBDBinary, "check", path, "--json"])
                #expect([0, 1, 4].contains(check.status) && !Self.crashed(check.stderr), "\(what): check: \(check.status) \(check.stderr)")
                if check.status != 0 { reported += 1 }

                let server = try ServerProcess(["serve", path, "-U", sock, "--control", "none", "--feed", "none"])
                var up = false
                for _ in 0..<500 {
                    if access(sock, F_OK) == 0 { up = true; break }
                    if !server.process.isRunning { break }
                    usleep(10_000)
                }
                if !up {
                    let status = server.stop()
                    let stderr = server.stderrText
                    #expect(status != 0 && stderr.contains("error") && !Self.crashed(stderr), "\(what): refused without a clear error: \(status) \(stderr)")
                    refused += 1
                    continue
                }
                served += 1
                let a = try Self.verify(sock, export: "a", seed: 1_000, what)
                let b = try Self.verify(sock, export: "b", seed: 2_000, what)
                let s = try Self.verify(sock, export: "a@s", seed: 1_000, what)
                errors += a.failed + b.failed + s.failed
                // Then rewrite all of `a` (new blocks come from the allocator, which damaged
                // refcounts or pool state must not mislead): `b` and the snapshot stay as they were.
                if let w = try? connectWhenReady(sock, timeout: 5, configure: { try $0.setExportName("a") }) {
                    for block in 0..<Self.volumeBlocks {
                        try? w.pwrite(pattern(4096, seed: 3_000 + UInt64(block)), offset: UInt64(block) << 12)
                    }
                    try? w.flush()
                    _ = try Self.verify(sock, export: "a", seed: 3_000, orSeed: 1_000, what + " (after rewriting a)")
                }
                _ = try Self.verify(sock, export: "b", seed: 2_000, what + " (after rewriting a)")
                _ = try Self.verify(sock, export: "a@s", seed: 1_000, what + " (after rewriting a)")
                let status = server.stop()
                let stderr = server.stderrText
                #expect(status == 0 && !Self.crashed(stderr), "\(what): server ended with \(status): \(stderr)")
                // An undamaged-looking pool serves everything as written — except that a name
                // changed into another valid name, or a damaged counter check cannot see until
                // it matters, may hide an export or be repaired later.
                if check.status == 0 && !["refcounts", "pool state", "volume table"].contains(region) {
                    #expect(a.ok + b.ok + s.ok == 3 * Self.volumeBlocks,
                            "\(what): check found nothing, yet data differs (a \(a), b \(b), s \(s))")
                }
            }
            summary.append("\(region): \(trials) damaged copies, check reported \(reported), server refused \(refused), served \(served) (\(errors) blocks failed with EIO or were missing)")
        }
        print("corruption: " + summary.joined(separator: "; "))
    }
}
