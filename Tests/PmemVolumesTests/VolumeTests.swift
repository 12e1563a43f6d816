import Foundation
import Glibc
import PmemPool
import PmemVolumes
import PmemSystem
@testable import TestSupport
import Testing

/// Volumes and snapshots through `Pool` and `Volume` alone, no NBD: copy-on-write isolation,
/// clones, rollback, deletion and the space it frees, usage figures. Each check that compares
/// contents is first shown to fail where it must (a negative control).
@Suite(.timeLimit(.minutes(3))) struct VolumeTests {
    static let blocks = 64

    /// A pool whose volume `vol` (16 MiB) has `blocks` blocks written with `pattern(seed: b)`.
    func makePool(_ d: ScratchDirectory) throws -> Pool {
        let path = d.file("p.pool")
        try PoolEngine.create(path: path, size: 64 << 20, volumeName: "vol", volumeSize: 16 << 20)
        let pool = try Pool.open(path: path, persistence: .page, commitMode: .inline)
        try write(pool.volume(named: "vol")!, seed: 0)
        return pool
    }

    /// Writes block `b` (of the first `blocks`) with `pattern(4096, seed: seed + b)`.
    func write(_ v: Volume, seed: UInt64, blocks: some Sequence<Int> = 0..<VolumeTests.blocks) throws {
        for b in blocks {
            try pattern(4096, seed: seed + UInt64(b)).withUnsafeBytes { (bytes) throws in
                var src = BufferByteSource(bytes)
                try v.write(offset: UInt64(b) << 12, length: 4096, fua: false, from: &src)
            }
        }
    }

    /// The blocks (of the first `blocks`) whose contents are not `pattern(4096, seed: seed + b)`.
    func mismatches(_ v: Volume, seed: UInt64) throws -> [Int] {
        var bad: [Int] = []
        for b in 0..<Self.blocks {
            var got: [UInt8] = []
            try v.read(offset: UInt64(b) << 12, length: 4096) { seg in
                switch seg {
                case .data(let p, let n): got += UnsafeRawBufferPointer(start: p, count: n)
                case .hole(let n): got += repeatElement(0, count: n)
                }
            }
            if got != pattern(4096, seed: seed + UInt64(b)) { bad.append(b) }
        }
        return bad
    }

    @Test func aSnapshotKeepsItsContentsWhileTheVolumeIsOverwritten() throws {
        let d = ScratchDirectory()
        let pool = try makePool(d)
        defer { try? pool.close() }
        _ = try pool.createSnapshot(volume: "vol", snapshot: "s1")
        let vol = pool.volume(named: "vol")!, snap = try #require(pool.volume(named: "vol@s1"))
        #expect(try mismatches(snap, seed: 0).isEmpty)
        try write(vol, seed: 1000, blocks: stride(from: 0, to: Self.blocks, by: 2))
        // Negative control: the check sees the overwritten blocks of the volume.
        #expect(try mismatches(vol, seed: 0) == Array(stride(from: 0, to: Self.blocks, by: 2)))
        #expect(try mismatches(snap, seed: 0).isEmpty, "the snapshot still reads the old contents")
        // A second snapshot sees the new contents; the first is unchanged by more writes.
        _ = try pool.createSnapshot(volume: "vol", snapshot: "s2")
        try write(vol, seed: 2000)
        let s2 = try #require(pool.volume(named: "vol@s2"))
        #expect(try mismatches(s2, seed: 0) == Array(stride(from: 0, to: Self.blocks, by: 2)))
        #expect(try mismatches(snap, seed: 0).isEmpty)
        #expect(try mismatches(vol, seed: 2000).isEmpty)
    }

    @Test func aCloneIsWritableAndIndependentOfItsOrigin() throws {
        let d = ScratchDirectory()
        let pool = try makePool(d)
        defer { try? pool.close() }
        _ = try pool.createSnapshot(volume: "vol", snapshot: "base")
        _ = try pool.clone("vol@base", as: "copy")
        let copy = try #require(pool.volume(named: "copy"))
        #expect(try mismatches(copy, seed: 0).isEmpty)
        try write(copy, seed: 500, blocks: 0..<8)
        #expect(try mismatches(copy, seed: 0) == Array(0..<8), "negative control: the clone's writes are seen")
        #expect(try mismatches(pool.volume(named: "vol")!, seed: 0).isEmpty, "the origin volume is untouched")
        #expect(try mismatches(pool.volume(named: "vol@base")!, seed: 0).isEmpty, "the origin snapshot is untouched")
        try write(pool.volume(named: "vol")!, seed: 700, blocks: 8..<16)
        #expect(try mismatches(copy, seed: 0) == Array(0..<8), "the origin's later writes do not reach the clone")
    }

    @Test func rollbackRestoresTheSnapshot() throws {
        let d = ScratchDirectory()
        let pool = try makePool(d)
        defer { try? pool.close() }
        _ = try pool.createSnapshot(volume: "vol", snapshot: "good")
        try write(pool.volume(named: "vol")!, seed: 900)
        #expect(try mismatches(pool.volume(named: "vol")!, seed: 0).count == Self.blocks, "negative control: all overwritten")
        _ = try pool.rollback("vol@good")
        #expect(try mismatches(pool.volume(named: "vol")!, seed: 0).isEmpty)
        #expect(try mismatches(pool.volume(named: "vol@good")!, seed: 0).isEmpty)
    }

    @Test func usageAndDeletionAccountForCopiedBlocks() throws {
        let d = ScratchDirectory()
        let pool = try makePool(d)
        defer { try? pool.close() }
        func record(_ name: String) throws -> VolumeRecord {
            let all = pool.records()
            return try #require(all.first { Pool.exportName($0, in: all) == name })
        }
        let data = UInt64(Self.blocks) << 12
        #expect(try pool.usage(of: record("vol")).referenced == data)
        _ = try pool.createSnapshot(volume: "vol", snapshot: "s")
        // Shared: neither holds the data alone.
        #expect(try pool.usage(of: record("vol@s")).referenced == data)
        #expect(try pool.usage(of: record("vol@s")).exclusive < data / 4)
        let overwritten: UInt64 = 16
        try write(pool.volume(named: "vol")!, seed: 300, blocks: 0..<Int(overwritten))
        let snapUsage = try pool.usage(of: record("vol@s"))
        #expect(snapUsage.referenced == data)
        // The snapshot alone holds the old copies of the overwritten blocks (and the map nodes
        // above them that are no longer shared).
        #expect(snapUsage.exclusive >= overwritten << 12 && snapUsage.exclusive < data)
        // Deleting it frees what it held alone.
        let before = pool.engine.space.allocated
        try pool.delete("vol@s")
        try pool.runDeletions()
        let freed = (before - pool.engine.space.allocated) << 12
        #expect(freed == snapUsage.exclusive, "freed \(freed), exclusive \(snapUsage.exclusive)")
        #expect(pool.volume(named: "vol@s") == nil)
        #expect(try mismatches(pool.volume(named: "vol")!, seed: 300).count == Self.blocks - Int(overwritten))
    }
}
