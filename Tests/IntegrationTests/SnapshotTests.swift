import CLibNBD
import Foundation
import Glibc
import NBDServer
import PmemNBD
import PmemPool
import PmemVolumes
@testable import TestSupport
import Testing

/// Snapshots, clones, rollback and deletion, driven through libnbd, nbdinfo and the CLI.
@Suite(.timeLimit(.minutes(5))) struct SnapshotTests {
    /// Sends a control request to the in-process pool (what the control socket does).
    @discardableResult
    func control(_ s: TestServer, _ request: [String: Any]) throws -> [String: Any] {
        let r = VolumeRequests.perform(request, on: s.pool)
        guard r["ok"] as? Bool == true else { throw PoolError(.invalid, r["error"] as? String ?? "failed") }
        return r
    }

    func client(_ s: TestServer, _ export: String, contexts: [String] = []) throws -> NBDClient {
        try s.client {
            try $0.setExportName(export)
            try $0.setStrictMode(0)
            for c in contexts { try $0.addMetaContext(c) }
        }
    }

    @Test func snapshotHoldsPointInTimeContentAndIsReadOnly() throws {
        let s = try TestServer()
        let vol = try client(s, "vol0")
        try vol.pwrite(pattern(65_536, seed: 1), offset: 0)
        try control(s, ["op": "snapshot-create", "name": "vol0@s1"])
        try vol.pwrite(pattern(8192, seed: 2), offset: 4096)
        try vol.trim(count: 4096, offset: 40_960)
        let snap = try client(s, "vol0@s1")
        #expect(try snap.isReadOnly)
        #expect(try snap.pread(count: 65_536, offset: 0) == pattern(65_536, seed: 1))
        var now = pattern(65_536, seed: 1)
        now.replaceSubrange(4096..<12_288, with: pattern(8192, seed: 2))
        now.replaceSubrange(40_960..<45_056, with: [UInt8](repeating: 0, count: 4096))
        #expect(try vol.pread(count: 65_536, offset: 0) == now)
        do {
            try snap.pwrite([1], offset: 0)
            Issue.record("a write to a snapshot succeeded")
        } catch let e as LibNBDError {
            #expect(e.errno == EPERM)
        }
    }

    @Test func exportsAreListedWithDescriptions() throws {
        let s = try TestServer()
        try control(s, ["op": "snapshot-create", "name": "vol0@monday"])
        try control(s, ["op": "volume-create", "name": "scratch", "size": 8 << 20])
        let r = try run(["nbdinfo", "--list", "--json", s.uri])
        #expect(r.status == 0, "\(r.stderr)")
        let json = try JSONSerialization.jsonObject(with: Data(r.stdout.utf8)) as? [String: Any]
        let exports = (json?["exports"] as? [[String: Any]]) ?? []
        #expect(exports.map { $0["export-name"] as? String } == ["vol0", "vol0@monday", "scratch"])
        #expect((exports[1]["description"] as? String)?.contains("snapshot monday (read-only)") == true)
        #expect(exports[1]["is_read_only"] as? Bool == true)
        #expect((exports[2]["export-size"] as? NSNumber)?.intValue == 8 << 20)
        #expect((exports[0]["contexts"] as? [String])?.contains("qemu:dirty-bitmap:monday") == true)
    }

    @Test func cloneIsWritableAndIndependent() throws {
        let s = try TestServer()
        let vol = try client(s, "vol0")
        try vol.pwrite(pattern(16_384, seed: 3), offset: 0)
        try control(s, ["op": "snapshot-create", "name": "vol0@base"])
        try control(s, ["op": "clone", "source": "vol0@base", "name": "copy"])
        let copy = try client(s, "copy")
        #expect(try !copy.isReadOnly)
        #expect(try copy.pread(count: 16_384, offset: 0) == pattern(16_384, seed: 3))
        try copy.pwrite(pattern(4096, seed: 4), offset: 0)
        try vol.pwrite(pattern(4096, seed: 5), offset: 4096)
        #expect(try copy.pread(count: 8192, offset: 0) == pattern(4096, seed: 4) + Array(pattern(16_384, seed: 3)[4096..<8192]))
        #expect(try vol.pread(count: 8192, offset: 0) == Array(pattern(16_384, seed: 3)[0..<4096]) + pattern(4096, seed: 5))
        #expect(try client(s, "vol0@base").pread(count: 16_384, offset: 0) == pattern(16_384, seed: 3))
    }

    /// Rollback keeps the volume's clients: their next requests see the snapshot's contents
    /// (as a SAN LUN reverted under its initiator). A volume resized since the snapshot cannot
    /// keep them (NBD cannot announce a new size): they are disconnected.
    @Test func rollbackReplacesContentsUnderConnectedClients() throws {
        let s = try TestServer()
        s.pool.onVolumeChange { [server = s.server] id in server.disconnect { $0.volumeID == id } }
        let vol = try client(s, "vol0")
        try vol.pwrite(pattern(32_768, seed: 6), offset: 0)
        try control(s, ["op": "snapshot-create", "name": "vol0@good"])
        try vol.pwrite(pattern(32_768, seed: 7), offset: 0)
        try vol.pwrite(pattern(4096, seed: 8), offset: 1 << 20)
        let bystander = try client(s, "vol0@good")
        let r = try control(s, ["op": "snapshot-rollback", "name": "vol0@good"])
        #expect(r["clients_kept"] as? Bool == true)
        // The same connection reads the snapshot's contents, and keeps writing.
        #expect(try vol.pread(count: 32_768, offset: 0) == pattern(32_768, seed: 6))
        #expect(try vol.pread(count: 4096, offset: 1 << 20) == [UInt8](repeating: 0, count: 4096))
        try vol.pwrite(pattern(4096, seed: 9), offset: 8192)
        #expect(try bystander.pread(count: 4096, offset: 8192) == Array(pattern(32_768, seed: 6)[8192..<12_288]))
        let again = try client(s, "vol0")
        #expect(try again.pread(count: 4096, offset: 8192) == pattern(4096, seed: 9))
        #expect(try again.pread(count: 4096, offset: 0) == Array(pattern(32_768, seed: 6).prefix(4096)))
        try vol.flush()
        try s.pool.runDeletions()
        #expect(try PoolCheckClean(s))

        // Resized since the snapshot: the clients are disconnected, and see the new size on reconnecting.
        try control(s, ["op": "volume-resize", "name": "vol0", "size": "512M"])
        let grown = try client(s, "vol0")
        #expect(try grown.size == 512 << 20)
        let back = try control(s, ["op": "snapshot-rollback", "name": "vol0@good"])
        #expect(back["clients_kept"] as? Bool == false)
        var closed = false
        for _ in 0..<100 where !closed {
            closed = (try? grown.pread(count: 1, offset: 0)) == nil
            if !closed { usleep(20_000) }
        }
        #expect(closed)
        let resized = try client(s, "vol0")
        #expect(try resized.size == (try bystander.size))
        #expect(try resized.pread(count: 32_768, offset: 0) == pattern(32_768, seed: 6))
    }

    /// Writes of part of a block racing a rollback: every block ends with the snapshot's
    /// contents or a write applied on top of them, never a write merged into the old contents.
    @Test(.timeLimit(.minutes(2))) func partialWritesRacingRollbackNeverMixOldAndNew() throws {
        let s = try TestServer()
        let blocks = 64
        let vol = try client(s, "vol0")
        // Old contents: 0xAA everywhere; the snapshot: 0x55 everywhere.
        try vol.pwrite([UInt8](repeating: 0x55, count: blocks * 4096), offset: 0)
        try control(s, ["op": "snapshot-create", "name": "vol0@base"])
        for round in 0..<20 {
            try vol.pwrite([UInt8](repeating: 0xAA, count: blocks * 4096), offset: 0)
            // A second connection writes 16 bytes of 0x11 at offset 100 of each block, in
            // flight while the rollback happens.
            let writer = try client(s, "vol0")
            let payload = UnsafeMutableRawBufferPointer.allocate(byteCount: 16, alignment: 8)
            defer { payload.deallocate() }
            payload.initializeMemory(as: UInt8.self, repeating: 0x11)
            var cookies: [Int64] = []
            for b in 0..<blocks { cookies.append(try writer.aioPwrite(UnsafeRawBufferPointer(payload), offset: UInt64(b) * 4096 + 100)) }
            if round % 2 == 0 { usleep(UInt32(round * 50)) }
            try control(s, ["op": "snapshot-rollback", "name": "vol0@base"])
            while writer.inFlight > 0 { try writer.poll() }
            for c in cookies { #expect(try writer.completed(c)) }
            let after = try vol.pread(count: blocks * 4096, offset: 0)
            for b in 0..<blocks {
                let block = after[(b * 4096)..<((b + 1) * 4096)]
                let outside = block.enumerated().filter { $0.offset < 100 || $0.offset >= 116 }.map(\.element)
                // The bytes around the write are all the snapshot's (0x55): never the old 0xAA.
                #expect(Set(outside) == [0x55], "round \(round) block \(b): old contents survived the rollback")
                let written = Array(block[block.startIndex + 100..<block.startIndex + 116])
                #expect(written == [UInt8](repeating: 0x11, count: 16) || written == [UInt8](repeating: 0x55, count: 16))
            }
        }
        try s.pool.runDeletions()
        #expect(try PoolCheckClean(s))
    }

    /// Every write completed before the snapshot request is in it; a write issued after it
    /// returned is not.
    @Test func snapshotOrdersAgainstConcurrentWrites() throws {
        let s = try TestServer()
        let vol = try client(s, "vol0")
        let n = 64
        let buffers = (0..<n).map { i -> UnsafeMutableRawBufferPointer in
            let b = UnsafeMutableRawBufferPointer.allocate(byteCount: 4096, alignment: 8)
            pattern(4096, seed: UInt64(100 + i)).withUnsafeBytes { b.copyMemory(from: $0) }
            return b
        }
        defer { buffers.forEach { $0.deallocate() } }
        var cookies: [Int64] = []
        for i in 0..<n { cookies.append(try vol.aioPwrite(UnsafeRawBufferPointer(buffers[i]), offset: UInt64(i) << 12)) }
        // Take the snapshot while some are still in flight; note which had completed.
        try vol.poll(timeoutMilliseconds: 0)
        let completed = try cookies.indices.filter { try vol.completed(cookies[$0]) }
        try control(s, ["op": "snapshot-create", "name": "vol0@mid"])
        while vol.inFlight > 0 { try vol.poll() }
        try vol.pwrite(pattern(4096, seed: 999), offset: 0)
        let snap = try client(s, "vol0@mid")
        for i in completed { #expect(try snap.pread(count: 4096, offset: UInt64(i) << 12) == pattern(4096, seed: UInt64(100 + i))) }
        #expect(try snap.pread(count: 4096, offset: 0) != pattern(4096, seed: 999))
    }

    /// `volume list` reads maps a page at a time (PageCopies) while writes are pending in the
    /// journal's overlay: the figures must be those of the pending words, the same as after
    /// their commit (a copy of the pool's pages alone would miss the overwrite: exclusive 0).
    @Test(.timeLimit(.minutes(2))) func usageCountsWordsNotYetCommitted() throws {
        let s = try TestServer(size: 96 << 20, volumeSize: 64 << 20)
        let vol = try client(s, "vol0")
        try vol.pwrite(pattern(8 << 20, seed: 21), offset: 0)
        try vol.flush()
        try control(s, ["op": "snapshot-create", "name": "vol0@base"])
        func rows() throws -> [String: (UInt64, UInt64)] {
            let list = try control(s, ["op": "list"])["volumes"] as? [[String: Any]] ?? []
            var out: [String: (UInt64, UInt64)] = [:]
            for r in list {
                out[r["name"] as? String ?? "?"] = ((r["referenced"] as? NSNumber)?.uint64Value ?? 0,
                                                    (r["exclusive"] as? NSNumber)?.uint64Value ?? 0)
            }
            return out
        }
        let before = try rows()
        #expect(before["vol0"]?.0 == 8 << 20 && before["vol0@base"]?.0 == 8 << 20)
        #expect(before["vol0"]?.1 ?? 1 < 1 << 20, "right after the snapshot the volume shares all its data")
        // Overwrite 3 MiB with no FLUSH: the new map words wait in the overlay (an idle commit
        // comes after 0.2 s; the figures must be the same either way).
        try vol.pwrite(pattern(3 << 20, seed: 22), offset: 0)
        let pendingAtList = s.engine.hasPendingWords
        let pending = try rows()
        try s.engine.sync()
        let committed = try rows()
        #expect(pending["vol0"]?.0 == 8 << 20)
        #expect(pending["vol0"]?.1 ?? 0 >= 3 << 20, "the overwritten blocks are the volume's own (pending words: \(pendingAtList))")
        #expect(pending["vol0@base"]?.1 ?? 0 >= 3 << 20, "the snapshot alone holds the originals")
        #expect(pending["vol0"]?.0 == committed["vol0"]?.0 && pending["vol0"]?.1 == committed["vol0"]?.1)
        #expect(pending["vol0@base"]?.0 == committed["vol0@base"]?.0 && pending["vol0@base"]?.1 == committed["vol0@base"]?.1)
    }

    @Test func deletingASnapshotReturnsItsSpace() throws {
        let s = try TestServer(size: 96 << 20, volumeSize: 64 << 20)
        let vol = try client(s, "vol0")
        let base = s.engine.space.allocated
        try vol.pwrite(pattern(8 << 20, seed: 9), offset: 0)
        try vol.flush()
        let afterFill = s.engine.space.allocated
        try control(s, ["op": "snapshot-create", "name": "vol0@old"])
        // Overwrite half: those blocks are copied (the snapshot keeps the originals).
        try vol.pwrite(pattern(4 << 20, seed: 10), offset: 0)
        try vol.flush()
        let list = try control(s, ["op": "list"])["volumes"] as? [[String: Any]] ?? []
        let snapRow = list.first { $0["name"] as? String == "vol0@old" }
        #expect((snapRow?["exclusive"] as? NSNumber)?.uint64Value ?? 0 >= 4 << 20, "the snapshot alone holds the overwritten half")
        #expect((snapRow?["referenced"] as? NSNumber)?.uint64Value == 8 << 20)
        #expect(s.engine.space.allocated >= afterFill + 1024)
        try control(s, ["op": "snapshot-delete", "name": "vol0@old"])
        try s.pool.runDeletions()
        try s.engine.sync()
        // Back to the blocks of the live data plus its map nodes.
        #expect(s.engine.space.allocated <= afterFill + 4, "allocated \(s.engine.space.allocated), after fill \(afterFill), empty \(base)")
        #expect(try PoolCheckClean(s))
    }

    @Test func fullPoolGivesENOSPCWithoutTouchingAnythingAndRecoversAfterDelete() throws {
        // A 40 MiB volume in a pool with about 24 MiB of blocks: thin, so it can fill.
        let s = try TestServer(size: 32 << 20, volumeSize: 40 << 20)
        let vol = try client(s, "vol0")
        try vol.pwrite(pattern(8 << 20, seed: 11), offset: 0)
        try control(s, ["op": "snapshot-create", "name": "vol0@keep"])
        // Overwriting copies: the snapshot alone keeps the original 8 MiB.
        try vol.pwrite(pattern(8 << 20, seed: 12), offset: 0)
        var failedAt: UInt64?
        var offset: UInt64 = 8 << 20
        while offset < 40 << 20 {
            do { try vol.pwrite(pattern(1 << 20, seed: offset), offset: offset) } catch let e as LibNBDError {
                #expect(e.errno == ENOSPC)
                failedAt = offset
                break
            }
            offset += 1 << 20
        }
        guard let failedAt else { Issue.record("the pool never filled"); return }
        // The failed write changed nothing: its range reads as before (a hole); the rest is intact.
        #expect(try vol.pread(count: 1 << 20, offset: failedAt) == [UInt8](repeating: 0, count: 1 << 20))
        #expect(try vol.pread(count: 8 << 20, offset: 0) == pattern(8 << 20, seed: 12))
        #expect(try client(s, "vol0@keep").pread(count: 8 << 20, offset: 0) == pattern(8 << 20, seed: 11))
        // A volume with snapshots is not deleted without --recursive.
        #expect(throws: PoolError.self) { try control(s, ["op": "volume-delete", "name": "vol0"]) }
        try control(s, ["op": "snapshot-delete", "name": "vol0@keep"])
        try s.pool.runDeletions()
        try vol.pwrite(pattern(1 << 20, seed: 13), offset: failedAt)
        #expect(try vol.pread(count: 1 << 20, offset: failedAt) == pattern(1 << 20, seed: 13))
        #expect(try PoolCheckClean(s))
    }

    @Test func dirtyBitmapShowsExactlyTheBlocksWrittenSinceTheSnapshot() throws {
        let s = try TestServer(size: 96 << 20, volumeSize: 64 << 20)
        let vol = try client(s, "vol0")
        try vol.pwrite(pattern(4 << 20, seed: 14), offset: 0)
        try control(s, ["op": "snapshot-create", "name": "vol0@backup1"])
        var rng = SplitMix64(seed: 15)
        var written = Set<UInt64>()
        for _ in 0..<40 {
            let b = rng.next() % (16_384 - 4)
            let n = rng.next() % 3 + 1
            try vol.pwrite(pattern(Int(n) * 4096, seed: b), offset: b << 12)
            for k in 0..<n { written.insert(b + k) }
        }
        // A partial write dirties its block; a write-zeroes of never-written space does not.
        try vol.pwrite([1, 2, 3], offset: (15_000 << 12) + 100)
        written.insert(15_000)
        try vol.zero(count: 4096, offset: 16_000 << 12)
        let r = try run(["nbdinfo", "--map=qemu:dirty-bitmap:backup1", "--json", s.uri(export: "vol0")])
        #expect(r.status == 0, "\(r.stderr)")
        let map = try JSONSerialization.jsonObject(with: Data(r.stdout.utf8)) as? [[String: Any]] ?? []
        var dirty = Set<UInt64>()
        for e in map where (e["type"] as? Int ?? 0) & 1 == 1 {
            let off = (e["offset"] as? NSNumber)!.uint64Value, len = (e["length"] as? NSNumber)!.uint64Value
            for b in (off >> 12)..<((off + len) >> 12) { dirty.insert(b) }
        }
        #expect(dirty == written)
        // The same through libnbd, and base:allocation stays right per export.
        let c = try client(s, "vol0", contexts: ["qemu:dirty-bitmap:backup1", "base:allocation"])
        let st = try c.blockStatus(count: 64 << 20, offset: 0)
        var pos: UInt64 = 0
        var dirty2 = Set<UInt64>()
        for (len, flags) in st["qemu:dirty-bitmap:backup1"] ?? [] {
            if flags & 1 == 1 { for b in (pos >> 12)..<((pos + UInt64(len)) >> 12) { dirty2.insert(b) } }
            pos += UInt64(len)
        }
        #expect(dirty2 == written)
        let snapAlloc = try client(s, "vol0@backup1", contexts: ["base:allocation"]).blockStatus(count: 64 << 20, offset: 0)["base:allocation"] ?? []
        #expect(snapAlloc.first.map { $0.0 == 4 << 20 && $0.1 == 0 } == true, "the snapshot maps exactly its first 4 MiB")
    }

    @Test func resizeGrowsAndShrinks() throws {
        let s = try TestServer(size: 96 << 20, volumeSize: 16 << 20)
        let vol = try client(s, "vol0")
        try vol.pwrite(pattern(4096, seed: 16), offset: (16 << 20) - 4096)
        try control(s, ["op": "snapshot-create", "name": "vol0@small"])
        try control(s, ["op": "volume-resize", "name": "vol0", "size": "3G"])
        let big = try client(s, "vol0")
        #expect(try big.size == 3 << 30)
        #expect(try big.pread(count: 4096, offset: (16 << 20) - 4096) == pattern(4096, seed: 16))
        try big.pwrite(pattern(4096, seed: 17), offset: (3 << 30) - 4096)
        #expect(try client(s, "vol0@small").size == 16 << 20)
        // Shrinking needs "shrink" (the CLI's --shrink): without it nothing changes.
        #expect(throws: PoolError.self) { try control(s, ["op": "volume-resize", "name": "vol0", "size": 8 << 20]) }
        #expect(try client(s, "vol0").size == 3 << 30)
        try control(s, ["op": "volume-resize", "name": "vol0", "size": 8 << 20, "shrink": true])
        let small = try client(s, "vol0")
        #expect(try small.size == 8 << 20)
        #expect(try client(s, "vol0@small").pread(count: 4096, offset: (16 << 20) - 4096) == pattern(4096, seed: 16))
        #expect(try PoolCheckClean(s))
    }

    @Test func cliOfflineAndOnline() throws {
        let d = ScratchDirectory()
        let pool = d.file("p.pool")
        #expect(try run([pmemNBDBinary, "create", pool, "--size", "64M"]).status == 0)
        func cli(_ args: [String]) throws -> ToolResult { try run([pmemNBDBinary] + args + ["--pool", pool]) }
        // Offline: the pool file is changed directly.
        #expect(try cli(["volume", "create", "db", "--size", "8M"]).status == 0)
        #expect(try cli(["snapshot", "create", "db@empty"]).status == 0)
        #expect(try cli(["clone", "db@empty", "db2"]).status == 0)
        let list = try cli(["volume", "list", "--json"])
        #expect(list.status == 0)
        let names = ((VolumeRequests.decode(list.stdout.trimmingCharacters(in: .whitespacesAndNewlines))?["volumes"] as? [[String: Any]]) ?? []).compactMap { $0["name"] as? String }
        #expect(names == ["pmem0", "db", "db@empty", "db2"])
        #expect(try cli(["snapshot", "create", "db@empty"]).stderr.contains("exists"))
        #expect(try cli(["volume", "delete", "db"]).stderr.contains("snapshot"))
        // Online: with the pool served, the same commands go through its control socket.
        let sock = d.file("s.sock")
        let server = try ServerProcess(["serve", pool, "-U", sock])
        defer { _ = server.stop() }
        let c = try connectWhenReady(sock) { try $0.setExportName("db") }
        try c.pwrite(pattern(4096, seed: 18), offset: 0)
        let snap = try cli(["snapshot", "create", "db@one"])
        #expect(snap.status == 0, "\(snap.stderr)")
        #expect(try cli(["snapshot", "list", "db"]).stdout.contains("db@one"))
        let s1 = try connectWhenReady(sock) { try $0.setExportName("db@one") }
        #expect(try s1.pread(count: 4096, offset: 0) == pattern(4096, seed: 18))
        #expect(try cli(["snapshot", "delete", "db@empty"]).status == 0)
        #expect(try cli(["volume", "delete", "db2"]).status == 0)
        #expect(try cli(["snapshot", "rollback", "db@nope"]).status != 0)
        #expect(server.stop() == 0)
        let check = try run([pmemNBDBinary, "check", pool])
        #expect(check.status == 0, "\(check.stdout)")
    }
}

/// Runs check on a served test pool's media (nothing else is changing it meanwhile).
func PoolCheckClean(_ s: TestServer) throws -> Bool {
    try s.engine.sync()
    let report = try PoolCheck.run(media: s.engine.media, repair: false)
    if !report.clean { Issue.record("check: \(report.problems)") }
    return report.clean
}
