import Foundation
import Glibc
import PmemDAX
import PmemNBD
import PmemPool
import PmemSystem
import PmemVolumes
@testable import TestSupport
import Testing

/// A pool that runs out of space loses nothing and hands no block out twice.
@Suite(.timeLimit(.minutes(5))) struct FullPoolTests {
    /// Found by the DAX torture test: a write that got its data blocks but not the spare map
    /// nodes it reserves gave the spares back twice (once by hand, once by the spares' deinit,
    /// which runs when a noncopyable value's init throws), so later writes were handed the
    /// same block twice — two virtual blocks, or two volumes, sharing one physical block.
    @Test(.timeLimit(.minutes(2)))
    func writesThatRunOutOfSpaceNeverHandABlockOutTwice() throws {
        let s = try TestServer(size: 24 << 20, volumeSize: 4 << 20)
        func request(_ r: [String: Any]) {
            let answer = VolumeRequests.perform(r, on: s.pool)
            #expect(answer["ok"] as? Bool == true, "\(r): \(answer)")
        }
        // Three volumes fill the pool: two to delete later (deleting needs no space).
        for (name, blocks) in [("spare", 1024), ("few", 64), ("fill", 16384)] as [(String, UInt64)] {
            request(["op": "volume-create", "name": name, "size": blocks << 12])
            let f = try s.client { try $0.setExportName(name) }
            var at: UInt64 = 0
            while at < blocks, (try? f.pwrite(pattern(256 << 12, seed: at), offset: at << 12)) != nil { at += 256 }
            while at < blocks, (try? f.pwrite(pattern(4096, seed: at), offset: at << 12)) != nil { at += 1 }
            try? f.flush()
        }
        func freeing(_ name: String) throws {
            request(["op": "volume-delete", "name": name])
            #expect(eventually { s.pool.deletionsPending == 0 })
            try s.pool.engine.sync()
        }
        // 64 blocks back: single-block writes use them up one by one, down to where a write
        // gets its data block but not the map nodes it reserves.
        try freeing("few")
        let c = try s.client()
        var failed = 0
        for i in 0..<200 where (try? c.pwrite(pattern(4096, seed: 100 + UInt64(i)), offset: (512 + UInt64(i)) << 12)) == nil { failed += 1 }
        #expect(failed > 0, "the pool was not full")
        // Plenty of space again; then many writes of distinct blocks.
        try freeing("spare")
        for i in 0..<512 { try c.pwrite(pattern(4096, seed: 1000 + UInt64(i)), offset: UInt64(i) << 12) }
        try c.flush()
        let vol = s.pool.volume(named: "vol0")!
        let mapped = try vol.currentBlocks(first: 0, count: 1024) + s.pool.volume(named: "fill")!.currentBlocks(first: 0, count: 16384)
        let used = mapped.filter { $0 != 0 }
        #expect(Set(used).count == used.count, "\(used.count - Set(used).count) physical blocks are mapped twice")
        let back = try c.pread(count: 512 << 12, offset: 0)
        let intact = (0..<512).allSatisfy { back[($0 << 12)..<(($0 + 1) << 12)].elementsEqual(pattern(4096, seed: 1000 + UInt64($0))) }
        #expect(intact, "a block read back wrong")
    }
}

/// Two objects for one volume — one held across a rollback to a snapshot of another size
/// (which makes the pool open a new one), one fresh — change the same map safely.
@Suite(.timeLimit(.minutes(5))) struct VolumeObjectTests {
    /// Found by the DAX torture test: a write lease granted across a rollback went on with the
    /// volume object it had looked up before; each object had a map lock of its own, so its
    /// copy-on-write and the writes through the new object copied the same map node at once,
    /// and one's change was lost (the holder's stores went to blocks the volume no longer
    /// mapped; a long run ended with map entries failing their checks).
    @Test(.timeLimit(.minutes(2)))
    func anOldVolumeObjectAndANewOneShareTheMapLock() throws {
        let s = try TestServer(size: 64 << 20, volumeSize: 8 << 20)
        func request(_ r: [String: Any]) {
            let answer = VolumeRequests.perform(r, on: s.pool)
            #expect(answer["ok"] as? Bool == true, "\(r): \(answer)")
        }
        // A rollback to a snapshot of another size opens a new object (one of the same size
        // keeps the object, and its clients).
        request(["op": "snapshot-create", "name": "vol0@s"])
        request(["op": "volume-resize", "name": "vol0", "size": 16 << 20])
        let old = s.pool.volume(named: "vol0")!
        request(["op": "snapshot-rollback", "name": "vol0@s"])
        let new = s.pool.volume(named: "vol0")!
        #expect(old !== new, "the rollback made the pool open a new object")
        let oldV = Handed(old), newV = Handed(new)
        // Rounds: a snapshot shares leaf 0 again, then both objects write its blocks at once
        // (even blocks through the old object, odd through the new one), each write copying
        // the shared leaf unless the other already did.
        for round in 0..<40 {
            request(["op": "snapshot-create", "name": "vol0@r\(round)"])
            let writers = [(oldV, 0), (newV, 1)].map { v, parity in
                Background("writer-\(parity)") {
                    for b in stride(from: parity, to: 64, by: 2) {
                        let data = pattern(4096, seed: UInt64(round * 1000 + b))
                        try data.withUnsafeBytes { p in
                            var source = BufferByteSource(p)
                            try v.value.write(offset: UInt64(b) << 12, length: 4096, fua: false, from: &source)
                        }
                    }
                }
            }
            for w in writers { #expect(w.join() == nil) }
            request(["op": "snapshot-delete", "name": "vol0@r\(round)"])
            let c = try s.client()
            let back = try c.pread(count: 64 << 12, offset: 0)
            let lost = (0..<64).filter { !back[($0 << 12)..<(($0 + 1) << 12)].elementsEqual(pattern(4096, seed: UInt64(round * 1000 + $0))) }
            #expect(lost.isEmpty, "round \(round): writes to blocks \(lost) were lost")
            if !lost.isEmpty { break }
        }
    }
}

/// The volume table stays whole while the deleter frees slots and snapshots are created.
@Suite(.timeLimit(.minutes(5))) struct VolumeTableTests {
    /// Found by the DAX torture test (`pmem-nbd check` afterwards: a record with an empty name,
    /// depth 0 and a root failing its tag; a snapshot created a moment before not found): the
    /// deleter freed a finished record's table slot without the table lock, and a snapshot
    /// created while it cleared the words took the slot as soon as its kind word read free —
    /// and had the rest of its record cleared under it.
    @Test(.timeLimit(.minutes(2)))
    func aSnapshotCreatedWhileTheDeleterFreesASlotKeepsItsRecord() throws {
        let s = try TestServer(size: 48 << 20, volumeSize: 4 << 20)
        let c = try s.client()
        try c.pwrite(pattern(64 << 12, seed: 1), offset: 0)
        func request(_ r: [String: Any]) {
            let answer = VolumeRequests.perform(r, on: s.pool)
            #expect(answer["ok"] as? Bool == true, "\(r): \(answer)")
        }
        request(["op": "snapshot-create", "name": "vol0@a"])
        let pool = s.pool
        let create = Shared<Background?>(nil)
        s.pool.testHooks.withLock {
            $0.deleterFreeingSlot = { _ in
                guard create.get == nil else { return }
                // A snapshot created just as the slot's kind word reads free.
                create.set(Background("create") {
                    let r = VolumeRequests.perform(["op": "snapshot-create", "name": "vol0@b"], on: pool)
                    guard r["ok"] as? Bool == true else { throw DAXError("\(r)") }
                })
                usleep(300_000)
            }
        }
        request(["op": "snapshot-delete", "name": "vol0@a"])
        #expect(eventually { create.get != nil && s.pool.deletionsPending == 0 })
        #expect(create.get?.join() == nil)
        #expect(s.pool.volume(named: "vol0@b") != nil, "the new snapshot's record was cleared")
        let snap = try s.client { try $0.setExportName("vol0@b") }.pread(count: 64 << 12, offset: 0) == pattern(64 << 12, seed: 1)
        #expect(snap, "the new snapshot reads what the volume held")
        try s.pool.engine.sync()
        let copy = s.scratch.file("copy")
        try FileManager.default.copyItem(atPath: s.poolPath, toPath: copy)
        let report = try PoolCheck.run(path: copy, repair: false)
        #expect(report.problems.isEmpty, "\(report.problems)")
    }
}
