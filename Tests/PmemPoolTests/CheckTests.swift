import Foundation
import Glibc
import PmemPool
import PmemVolumes
import PmemSystem
@testable import TestSupport
import Testing

/// `pmem-nbd check` catches deliberately corrupted pools, and `--repair` fixes only what is safe.
@Suite(.timeLimit(.minutes(5))) struct CheckTests {
    /// A pool with data in two leaves, closed cleanly; returns its path and layout facts.
    func makePool(_ d: ScratchDirectory) throws -> (path: String, layout: PoolLayout, root: UInt64, depth: Int) {
        let path = d.file("p.pool")
        try PoolEngine.create(path: path, size: 64 << 20, volumeName: "vol", volumeSize: 16 << 20)
        let pool = try Pool.open(path: path, persistence: .page, commitMode: .inline)
        let v = pool.volume(named: "vol")!
        for b in [0, 1, 2, 600, 601, 3000] {
            let data = pattern(4096, seed: UInt64(b))
            try data.withUnsafeBytes { (bytes) throws in
                var src = BufferByteSource(bytes)
                try v.write(offset: UInt64(b) << 12, length: 4096, fua: false, from: &src)
            }
        }
        try pool.close()
        let ro = try PoolEngine.open(path: path, readOnly: true, lock: false)
        let rec = ro.records()[0]
        return (path, ro.layout, rec.root, rec.depth)
    }

    func readWord(_ path: String, _ off: UInt64) throws -> UInt64 {
        let h = try FileHandle(forReadingFrom: URL(fileURLWithPath: path))
        defer { try? h.close() }
        try h.seek(toOffset: off)
        let d = h.readData(ofLength: 8)
        return d.withUnsafeBytes { $0.load(as: UInt64.self) }
    }

    func writeWord(_ path: String, _ off: UInt64, _ v: UInt64) throws {
        try patch(path, at: Int(off), withUnsafeBytes(of: v) { Array($0) })
    }

    /// Offset of the leaf entry for virtual block `vb`.
    func leafEntry(_ p: (path: String, layout: PoolLayout, root: UInt64, depth: Int), _ vb: UInt64) throws -> UInt64 {
        var node = p.root
        var level = p.depth - 1
        while level > 0 {
            node = try readWord(p.path, p.layout.blockOffset(node) + 8 * ((vb >> (9 * UInt64(level))) & 511)) & MapEntry.blockMask
            level -= 1
        }
        return p.layout.blockOffset(node) + 8 * (vb & 511)
    }

    func check(_ path: String, repair: Bool = false) throws -> ToolResult {
        try run([pmemNBDBinary, "check", path, "--json"] + (repair ? ["--repair"] : []))
    }

    @Test func cleanPoolIsClean() throws {
        let d = ScratchDirectory()
        let p = try makePool(d)
        let r = try check(p.path)
        #expect(r.status == 0, "\(r.stdout)\(r.stderr)")
        #expect(r.stdout.contains("\"clean\":true"))
        #expect(r.stdout.contains("\"data_blocks\":6"))
    }

    @Test func flippedMapEntryOutOfRange() throws {
        let d = ScratchDirectory()
        let p = try makePool(d)
        let off = try leafEntry(p, 601)
        try writeWord(p.path, off, try readWord(p.path, off) ^ (1 << 40))
        let r = try check(p.path)
        #expect(r.status == 4)
        #expect(r.stdout.contains("points outside the pool"))
        // Repair turns the entry into a hole and frees the block it no longer reaches.
        let fixed = try check(p.path, repair: true)
        #expect(fixed.status == 1, "\(fixed.stdout)")
        let again = try check(p.path)
        #expect(again.status == 0, "\(again.stdout)")
        let ro = try Pool.open(path: p.path, readOnly: true, lock: false)
        var hole = false
        try ro.volume(named: "vol")!.read(offset: 601 << 12, length: 4096) { if case .hole = $0 { hole = true } }
        #expect(hole)
    }

    @Test func doubleOwnedBlock() throws {
        let d = ScratchDirectory()
        let p = try makePool(d)
        // Point block 2's entry at block 1's data, with a valid tag (what a bug, not a media
        // error, would write): one block, two owners, refcount 1.
        let owner = try readWord(p.path, try leafEntry(p, 1)) & MapEntry.blockMask
        try writeWord(p.path, try leafEntry(p, 2), MapEntry.make(owner, index: 2, level: 0))
        let r = try check(p.path)
        #expect(r.status == 4)
        #expect(r.stdout.contains("block \(owner) under-counted"), "\(r.stdout)")
        #expect(r.stdout.contains("leaked"), "block 2's old data block is now unreferenced")
        // Safe repair: refcounts follow the maps (nothing in use is freed).
        #expect(try check(p.path, repair: true).status == 1)
        #expect(try check(p.path).status == 0)
    }

    @Test func blockUsedAsDataAndAsMapNode() throws {
        let d = ScratchDirectory()
        let p = try makePool(d)
        try writeWord(p.path, try leafEntry(p, 0), MapEntry.make(p.root, index: 0, level: 0))
        let r = try check(p.path)
        #expect(r.status == 4)
        #expect(r.stdout.contains("used both as"))
        // Not safely repairable: reported, left alone.
        let rep = try check(p.path, repair: true)
        #expect(rep.status == 4)
        #expect(try readWord(p.path, try leafEntry(p, 0)) == MapEntry.make(p.root, index: 0, level: 0))
    }

    @Test func wrongRefcountAndCounters() throws {
        let d = ScratchDirectory()
        let p = try makePool(d)
        let data = try readWord(p.path, try leafEntry(p, 3000)) & MapEntry.blockMask
        let rcOff = p.layout.refcountWordOffset(data)
        let w = try readWord(p.path, rcOff)
        try writeWord(p.path, rcOff, w & ~(UInt64(0xFFFF_FFFF) << PoolLayout.refcountShift(data)))
        try writeWord(p.path, PoolState.allocatedOffset, 999)
        let r = try check(p.path)
        #expect(r.status == 4)
        #expect(r.stdout.contains("under-counted") && r.stdout.contains("allocated-block count"))
        #expect(try check(p.path, repair: true).status == 1)
        #expect(try check(p.path).status == 0)
    }

    @Test func damagedSuperblockIsRestoredFromBackup() throws {
        let d = ScratchDirectory()
        let p = try makePool(d)
        try patch(p.path, at: 40, [0x55, 0x55])
        let serve = try run([pmemNBDBinary, "serve", p.path, "-U", d.file("s.sock")], timeout: 20)
        #expect(serve.status != 0 && serve.stderr.contains("checksum mismatch"))
        let r = try check(p.path)
        #expect(r.status == 4 && r.stdout.contains("backup copy is good"))
        #expect(try check(p.path, repair: true).status == 1)
        #expect(try check(p.path).status == 0)
        let ro = try Pool.open(path: p.path, readOnly: true, lock: false)
        var data: [UInt8] = []
        try ro.volume(named: "vol")!.read(offset: 600 << 12, length: 4096) {
            if case .data(let ptr, let n) = $0 { data += Array(UnsafeRawBufferPointer(start: ptr, count: n)) }
        }
        #expect(data == pattern(4096, seed: 600))
    }

    /// A torn copy of the journal header (what a crash while it is rewritten leaves) is not a
    /// problem: the other copy is used, and the next open writes both again.
    @Test func tornJournalIsIgnored() throws {
        let d = ScratchDirectory()
        let p = try makePool(d)
        try patch(p.path, at: Int(p.layout.journalOffset), [UInt8](repeating: 0xAB, count: 64))
        let r = try check(p.path)
        #expect(r.status == 0, "\(r.stdout)")
        #expect(r.stdout.contains("header copy A torn (ignored)"), "\(r.stdout)")
        // Open discards it and the data is intact.
        do {
            let engine = try PoolEngine.open(path: p.path, persistence: .page, commitMode: .inline)
            #expect(engine.records()[0].name == "vol")
            try engine.close()
        }
        let final = try check(p.path)
        #expect(final.stdout.contains("\"journal\":\"empty\""), "\(final.stdout)")
    }

    @Test func checkRefusesAPoolInUse() throws {
        let d = ScratchDirectory()
        let p = try makePool(d)
        let engine = try PoolEngine.open(path: p.path, commitMode: .inline)
        let r = try check(p.path)
        #expect(r.status != 0 && r.stderr.contains("in use"))
        try engine.close()
    }
}
