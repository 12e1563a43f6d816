import CLibNBD
import FeedWire
import Foundation
import Glibc
import PmemDAX
import PmemFeedClient
import PmemNBD
import PmemPool
import PmemSystem
import PmemVolumes
@testable import TestSupport
import Testing

/// A raw feed subscriber driven by the test (it acknowledges only when told to).
final class FeedProbe {
    let c: FeedConnection
    var events: [FeedEvent] = []
    var other: [(UInt16, [UInt8])] = []

    init(_ path: String, subscribe: Bool = true, from: UInt64? = nil) throws {
        c = try FeedConnection(path: path, name: "probe")
        if subscribe { try c.subscribe(volume: 0, from: from ?? c.welcome.sequence + 1) }
        var tv = timeval(tv_sec: 5, tv_usec: 0)
        setsockopt(c.fd.rawValue, SOL_SOCKET, SO_RCVTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
    }

    /// Reads frames until `done` holds (or a 5 s receive timeout).
    func pump(until done: () -> Bool) throws {
        while !done() {
            guard let (type, payload) = try c.receive() else { return }
            if type == FeedMessage.events.rawValue { events += try FeedConnection.decodeEvents(payload) } else { other.append((type, payload)) }
        }
    }

    func reply(_ type: FeedMessage) throws -> [UInt8] {
        try pump { other.contains { $0.0 == type.rawValue } }
        guard let i = other.firstIndex(where: { $0.0 == type.rawValue }) else { throw LibNBDError(errno: 0, message: "no \(type)") }
        return other.remove(at: i).1
    }

    func lease(_ mode: LeaseMode, volume: UInt64, first: UInt64, count: UInt32) throws -> (id: UInt64, seq: UInt64, blocks: [UInt64]) {
        try c.requestLease(99, mode: mode, volume: volume, first: first, count: count, durationMs: 60_000)
        try pump { other.contains { $0.0 == FeedMessage.leaseGranted.rawValue || $0.0 == FeedMessage.leaseDenied.rawValue } }
        guard let i = other.firstIndex(where: { $0.0 == FeedMessage.leaseGranted.rawValue }) else {
            throw LibNBDError(errno: 0, message: "lease denied")
        }
        var r = FeedReader(other.remove(at: i).1)
        _ = try r.u64()
        let id = try r.u64()
        _ = try r.u8(); _ = try r.u8(); _ = try r.u16(); _ = try r.u32()
        let seq = try r.u64()
        _ = try r.u64(); _ = try r.u64()
        let n = Int(try r.u32())
        _ = try r.u32()
        return (id, seq, try (0..<n).map { _ in try r.u64() })
    }
}

/// The mapping-change feed: events, resume, map and reverse queries, leases, recall and
/// fencing, media errors, the sharing context, and the DAX library.
@Suite(.timeLimit(.minutes(5))) struct FeedTests {
    func volumeID(_ s: TestServer, _ name: String = "vol0") -> UInt64 { s.pool.volume(named: name)!.id }

    @Test func eventsForEveryKindOfChangeInOrder() throws {
        let s = try TestServer(withFeed: true)
        let probe = try FeedProbe(s.feedPath)
        let c = try s.client()
        try c.pwrite(pattern(8192, seed: 1), offset: 0)
        try c.pwrite(pattern(100, seed: 2), offset: 4096 + 10)
        try c.trim(count: 4096, offset: 0)
        try c.zero(count: 4096, offset: 4096, flags: LibNBDFlags.noHole)
        _ = VolumeRequests.perform(["op": "snapshot-create", "name": "vol0@a"], on: s.pool)
        _ = VolumeRequests.perform(["op": "snapshot-rollback", "name": "vol0@a"], on: s.pool)
        _ = VolumeRequests.perform(["op": "volume-resize", "name": "vol0", "size": 128 << 20], on: s.pool)
        _ = VolumeRequests.perform(["op": "snapshot-delete", "name": "vol0@a"], on: s.pool)
        try probe.pump { probe.events.count >= 8 }
        let e = probe.events
        #expect(e.map(\.sequence) == Array(e[0].sequence..<(e[0].sequence + UInt64(e.count))), "sequence numbers without gaps")
        #expect(e.map(\.kind) == [.remap, .remap, .remap, .remap, .snapshotCreated, .rollback, .resized, .snapshotDeleted])
        #expect(e[0].reason == .write && e[0].first == 0 && e[0].entries.count == 2 && e[0].entries.allSatisfy { $0.0 == 0 && $0.1 != 0 })
        #expect(e[1].first == 1 && e[1].entries[0].0 == e[0].entries[1].1, "a sub-block write moves its block too")
        #expect(e[2].reason == .trim && e[2].entries.count == 1 && e[2].entries[0].0 == e[0].entries[0].1 && e[2].entries[0].1 == 0)
        #expect(e[3].reason == .zero && e[3].entries[0].1 != 0)
        #expect(e[6].aux == 128 << 20)
    }

    @Test func resumeAndResync() throws {
        let s = try TestServer(withFeed: true, ringCapacity: 32)
        let c = try s.client()
        var probe = try FeedProbe(s.feedPath)
        try c.pwrite(pattern(4096, seed: 3), offset: 0)
        try probe.pump { !probe.events.isEmpty }
        let last = probe.events.last!.sequence
        probe.c.close()
        // Missed while disconnected: the resumed subscription gets exactly these.
        for i in 0..<5 { try c.pwrite(pattern(4096, seed: UInt64(i)), offset: UInt64(i) << 12) }
        probe = try FeedProbe(s.feedPath, from: last + 1)
        try probe.pump { probe.events.count >= 5 }
        #expect(probe.events.map(\.sequence) == Array((last + 1)...(last + 5)))
        probe.c.close()
        // Too far behind (the ring holds 32 events): resync.
        for i in 0..<40 { try c.pwrite(pattern(4096, seed: UInt64(i)), offset: UInt64(i) << 12) }
        let stale = try FeedProbe(s.feedPath, from: last + 1)
        var r = FeedReader(try stale.reply(.resync))
        #expect(try r.u64() >= last + 45)
    }

    @Test func mapAndReverseQueries() throws {
        let s = try TestServer(withFeed: true)
        let c = try s.client()
        try c.pwrite(pattern(3 * 4096, seed: 4), offset: 4096)
        _ = VolumeRequests.perform(["op": "snapshot-create", "name": "vol0@s"], on: s.pool)
        _ = VolumeRequests.perform(["op": "clone", "source": "vol0@s", "name": "cl"], on: s.pool)
        let probe = try FeedProbe(s.feedPath, subscribe: false)
        try probe.c.requestMap(7, volume: volumeID(s), first: 0, count: 5)
        var r = FeedReader(try probe.reply(.mapReply))
        #expect(try r.u64() == 7)
        _ = try r.u64() // sequence
        #expect(try r.u64() == volumeID(s))
        #expect(try r.u64() == 0)
        let n = Int(try r.u32())
        _ = try r.u32()
        let blocks = try (0..<n).map { _ in try r.u64() }
        #expect(blocks.count == 5 && blocks[0] == 0 && blocks[4] == 0 && blocks[1...3].allSatisfy { $0 != 0 })
        // The block is shared by the volume, its snapshot and the clone.
        try probe.c.requestReverse(8, block: blocks[2])
        var rr = FeedReader(try probe.reply(.reverseReply))
        #expect(try rr.u64() == 8)
        _ = try rr.u64()
        #expect(try rr.u64() == blocks[2])
        let count = Int(try rr.u32())
        _ = try rr.u32()
        var owners: [(UInt64, UInt64)] = []
        for _ in 0..<count { owners.append((try rr.u64(), try rr.u64())) }
        let ids = Set(owners.map { $0.0 })
        #expect(ids == [volumeID(s), volumeID(s, "vol0@s"), volumeID(s, "cl")])
        #expect(owners.allSatisfy { $0.1 == 2 })
    }

    /// A block a read-lease holder may be reading is not reused until it acknowledges the remap.
    @Test func readLeaseQuarantinesMovedBlocks() throws {
        // A small pool so freed blocks are reused quickly.
        // The probe sits on its pins on purpose: no ack-deadline fence however slow the machine.
        let s = try TestServer(size: 24 << 20, volumeSize: 8 << 20, withFeed: true, ackDeadline: 600)
        let c = try s.client()
        try c.pwrite(pattern(4096, seed: 5), offset: 0)
        let probe = try FeedProbe(s.feedPath)
        let lease = try probe.lease(.read, volume: volumeID(s), first: 0, count: 512)
        let old = lease.blocks[0]
        #expect(old != 0)
        try c.pwrite(pattern(4096, seed: 6), offset: 0)
        // Churn through more blocks than the pool has, forcing reuse of freed blocks.
        for round in 0..<4 {
            for i in 0..<1024 where i % 2 == 0 { try c.pwrite(pattern(4096, seed: UInt64(round * 1024 + i)), offset: UInt64(600 + i % 1000) << 12) }
            try c.flush()
        }
        try probe.pump { probe.events.count >= 2000 }
        #expect(!probe.events.contains { $0.kind == .remap && $0.entries.contains { $0.1 == old } }, "reused while leased and unacknowledged")
        // Acknowledge: now it may be reused.
        try probe.c.ack(probe.events.last!.sequence)
        usleep(100_000)
        let before = probe.events.count
        for round in 0..<6 {
            for i in 0..<1024 { try c.pwrite(pattern(4096, seed: UInt64(round * 7 + i)), offset: UInt64(600 + i % 1000) << 12) }
            try c.flush()
            try probe.pump { probe.events.count >= before + (round + 1) * 1024 }
            try probe.c.ack(probe.events.last!.sequence)
        }
        #expect(probe.events.dropFirst(before).contains { $0.kind == .remap && $0.entries.contains { $0.1 == old } }, "released after the acknowledgement")
    }

    /// Churns through every block of a small pool so freed blocks get reused; returns whether
    /// `block` became the new home of some virtual block.
    func churnReuses(_ block: UInt64, _ s: TestServer, _ c: NBDClient, _ probe: FeedProbe, rounds: Int, ack: Bool) throws -> Bool {
        let before = probe.events.count
        for round in 0..<rounds {
            for i in 0..<1024 { try c.pwrite(pattern(4096, seed: UInt64(round * 7919 + i)), offset: UInt64(600 + i % 1000) << 12) }
            try c.flush()
            try probe.pump { probe.events.count >= before + (round + 1) * 1024 }
            if ack { try probe.c.ack(probe.events.last!.sequence) }
        }
        return probe.events.dropFirst(before).contains { $0.kind == .remap && $0.entries.contains { $0.1 == block } }
    }

    /// Giving a read lease back does not free the blocks it pinned: a copy or a lent block may
    /// still be in use until the holder acknowledges the events that moved them.
    @Test func pinsOutliveTheLeaseUntilAcknowledged() throws {
        let s = try TestServer(size: 24 << 20, volumeSize: 8 << 20, withFeed: true, ackDeadline: 600)
        let c = try s.client()
        try c.pwrite(pattern(4096, seed: 5), offset: 0)
        let probe = try FeedProbe(s.feedPath)
        let lease = try probe.lease(.read, volume: volumeID(s), first: 0, count: 512)
        let old = lease.blocks[0]
        try c.pwrite(pattern(4096, seed: 6), offset: 0)
        try probe.pump { probe.events.contains { $0.kind == .remap && $0.first == 0 } }
        try probe.c.release(lease.id)
        #expect(try !churnReuses(old, s, c, probe, rounds: 3, ack: false), "reused after the lease ended, before the acknowledgement")
        try probe.c.ack(probe.events.last!.sequence)
        usleep(100_000)
        #expect(try churnReuses(old, s, c, probe, rounds: 6, ack: true), "released by the acknowledgement")
    }

    /// A holder that never acknowledges would keep pinned blocks forever: after the
    /// acknowledgement deadline it is fenced and the blocks go back to the pool.
    @Test func holderThatNeverAcknowledgesIsFenced() throws {
        let s = try TestServer(size: 24 << 20, volumeSize: 8 << 20, withFeed: true, ackDeadline: 0.5)
        let c = try s.client()
        try c.pwrite(pattern(4096, seed: 5), offset: 0)
        let probe = try FeedProbe(s.feedPath)
        let lease = try probe.lease(.read, volume: volumeID(s), first: 0, count: 512)
        let old = lease.blocks[0]
        try c.pwrite(pattern(4096, seed: 6), offset: 0)
        _ = try probe.reply(.fenced)
        #expect(try churnReuses(old, s, c, probe, rounds: 6, ack: false), "a fenced holder's pins are released")
        // A fenced client gets no new leases.
        #expect(throws: (any Error).self) { try probe.lease(.read, volume: volumeID(s), first: 0, count: 512) }
    }

    @Test func writeLeaseStoresDirectlyAndIsRecalledBeforeASnapshot() throws {
        let s = try TestServer(withFeed: true)
        let c = try s.client()
        try c.pwrite(pattern(8192, seed: 7), offset: 0)
        _ = VolumeRequests.perform(["op": "snapshot-create", "name": "vol0@before"], on: s.pool)
        let dax = try DAXPool(feed: s.feedPath, nbd: s.socketPath, writable: true)
        defer { dax.close() }
        let vol = try dax.volume(named: "vol0")
        final class Flag: @unchecked Sendable { var recalled = false }
        let flag = Flag()
        // The blocks are shared with the snapshot: the lease gets copies of its own.
        let lease = try vol.writeLease(first: 0, count: 2) { flag.recalled = true }
        let shared = try s.client { try $0.addMetaContext("pmem-nbd:sharing") }.blockStatus(count: 8192, offset: 0)["pmem-nbd:sharing"]
        #expect(shared?.first?.1 == 0, "leased blocks are not shared any more")
        let data = pattern(4096, seed: 8)
        data.withUnsafeBytes { lease.pointer(1).copyMemory(from: $0.baseAddress!, byteCount: 4096) }
        lease.flush()
        #expect(try c.pread(count: 4096, offset: 4096) == data, "the store is visible through NBD")
        _ = VolumeRequests.perform(["op": "snapshot-create", "name": "vol0@after"], on: s.pool)
        #expect(flag.recalled)
        #expect(try s.client { try $0.setExportName("vol0@after") }.pread(count: 4096, offset: 4096) == data)
        #expect(try s.client { try $0.setExportName("vol0@before") }.pread(count: 8192, offset: 0) == pattern(8192, seed: 7))
    }

    /// A holder that ignores a recall is fenced after the deadline; the snapshot completes, and
    /// stores it makes afterwards reach neither the volume nor the snapshot.
    @Test func ignoredRecallIsFencedAndTheSnapshotCompletes() throws {
        let s = try TestServer(withFeed: true, recallDeadline: 0.5)
        let c = try s.client()
        try c.pwrite(pattern(4096, seed: 9), offset: 0)
        let probe = try FeedProbe(s.feedPath)
        let lease = try probe.lease(.write, volume: volumeID(s), first: 0, count: 1)
        guard let poolFD = probe.c.poolFD else { Issue.record("no pool descriptor"); return }
        let w = probe.c.welcome!
        let map = mmap(nil, Int(w.poolSize), PROT_READ | PROT_WRITE, MAP_SHARED, poolFD.rawValue, 0)!
        defer { munmap(map, Int(w.poolSize)) }
        let block = map + Int(w.blockAreaOffset) + Int(lease.blocks[0]) << 12
        let t0 = Date()
        let r = VolumeRequests.perform(["op": "snapshot-create", "name": "vol0@s"], on: s.pool)
        #expect(r["ok"] as? Bool == true)
        #expect(Date().timeIntervalSince(t0) >= 0.4, "the snapshot waited for the recall deadline")
        _ = try probe.reply(.recall)
        _ = try probe.reply(.fenced)
        // The fenced holder keeps storing into its old block: nobody sees it.
        memset(block, 0xEE, 4096)
        #expect(try c.pread(count: 4096, offset: 0) == pattern(4096, seed: 9))
        #expect(try s.client { try $0.setExportName("vol0@s") }.pread(count: 4096, offset: 0) == pattern(4096, seed: 9))
        // It can no longer take leases.
        #expect(throws: (any Error).self) { _ = try probe.lease(.read, volume: volumeID(s), first: 0, count: 1) }
        try probe.pump { probe.events.contains { $0.reason == .fence } }
        #expect(probe.events.contains { $0.kind == .remap && $0.reason == .fence && $0.entries[0].0 == lease.blocks[0] })
    }

    @Test func mediaErrorsFailReadsAreReportedAndRewritingRelocates() throws {
        let d = ScratchDirectory()
        let bad = d.file("badblocks")
        try Data("# none yet\n".utf8).write(to: URL(fileURLWithPath: bad))
        let s = try TestServer(withFeed: true, badBlocks: bad)
        let c = try s.client()
        try c.pwrite(pattern(8192, seed: 10), offset: 0)
        let probe = try FeedProbe(s.feedPath, subscribe: false)
        try probe.c.requestMap(1, volume: volumeID(s), first: 1, count: 1)
        var r = FeedReader(try probe.reply(.mapReply))
        _ = try r.u64(); _ = try r.u64(); _ = try r.u64(); _ = try r.u64(); _ = try r.u32(); _ = try r.u32()
        let physical = try r.u64()
        try probe.c.subscribe(volume: 0, from: 0)
        let offset = s.engine.layout.blockOffset(physical) + 100
        try Data("\(offset) 10\n".utf8).write(to: URL(fileURLWithPath: bad))
        try probe.pump { probe.events.contains { $0.kind == .mediaError } }
        let e = probe.events.first { $0.kind == .mediaError }!
        #expect(e.first == physical && e.entries.map(\.0) == [volumeID(s)] && e.entries.map(\.1) == [1])
        do {
            _ = try c.pread(count: 4096, offset: 4096)
            Issue.record("a read of a bad block succeeded")
        } catch let err as LibNBDError {
            #expect(err.errno == EIO)
        }
        #expect(try c.pread(count: 4096, offset: 0) == Array(pattern(8192, seed: 10).prefix(4096)))
        try c.pwrite(pattern(4096, seed: 11), offset: 4096)
        #expect(try c.pread(count: 4096, offset: 4096) == pattern(4096, seed: 11))
        // The bad block is never handed out again.
        for i in 0..<2000 { try c.pwrite(pattern(4096, seed: UInt64(i)), offset: UInt64(100 + i % 500) << 12) }
        try c.flush()
        try probe.pump { probe.events.filter { $0.kind == .remap }.count >= 2001 }
        #expect(!probe.events.contains { $0.kind == .remap && $0.entries.contains { $0.1 == physical } })
    }

    @Test func sharingContextMarksBlocksThatWouldCopy() throws {
        let s = try TestServer(withFeed: true)
        let c = try s.client { try $0.addMetaContext("pmem-nbd:sharing") }
        try c.pwrite(pattern(16_384, seed: 12), offset: 0)
        func shared() throws -> [(UInt32, UInt32)] { try c.blockStatus(count: 16_384, offset: 0)["pmem-nbd:sharing"] ?? [] }
        #expect(try shared().allSatisfy { $0.1 == 0 })
        _ = VolumeRequests.perform(["op": "snapshot-create", "name": "vol0@s"], on: s.pool)
        let d = try s.client { try $0.addMetaContext("pmem-nbd:sharing") }
        #expect(try d.blockStatus(count: 16_384, offset: 0)["pmem-nbd:sharing"]?.first.map { $0.1 == 1 } == true)
        try d.pwrite(pattern(4096, seed: 13), offset: 8192)
        let after = try d.blockStatus(count: 16_384, offset: 0)["pmem-nbd:sharing"] ?? []
        #expect(after.map { "\($0.0):\($0.1)" } == ["8192:0", "4096:0", "4096:0"] || after.contains { $0.1 == 0 },
                "the overwritten block is private (its leaf was copied, so the leaf's other blocks are shared by reference only)")
        #expect(try c.canMetaContext("pmem-nbd:sharing"))
    }

    @Test func daxReadsMatchNBDAndFollowChanges() throws {
        let s = try TestServer(withFeed: true)
        let c = try s.client()
        try c.pwrite(pattern(1 << 20, seed: 14), offset: 0)
        let dax = try DAXPool(feed: s.feedPath, nbd: s.socketPath)
        defer { dax.close() }
        let vol = try dax.volume(named: "vol0")
        var buf = [UInt8](repeating: 0, count: 1 << 20)
        #expect(try buf.withUnsafeMutableBytes { try vol.read(offset: 0, count: 1 << 20, into: $0.baseAddress!) } == .direct)
        #expect(buf == pattern(1 << 20, seed: 14))
        // A write, a trim and a rollback are seen by the next DAX read.
        _ = VolumeRequests.perform(["op": "snapshot-create", "name": "vol0@s"], on: s.pool)
        try c.pwrite(pattern(4096, seed: 15), offset: 8192)
        try c.trim(count: 4096, offset: 12_288)
        var block = [UInt8](repeating: 0, count: 4096)
        _ = try block.withUnsafeMutableBytes { try vol.read(offset: 8192, count: 4096, into: $0.baseAddress!) }
        #expect(block == pattern(4096, seed: 15))
        _ = try block.withUnsafeMutableBytes { try vol.read(offset: 12_288, count: 4096, into: $0.baseAddress!) }
        #expect(block == [UInt8](repeating: 0, count: 4096))
        _ = VolumeRequests.perform(["op": "snapshot-rollback", "name": "vol0@s"], on: s.pool)
        _ = try block.withUnsafeMutableBytes { try vol.read(offset: 8192, count: 4096, into: $0.baseAddress!) }
        #expect(block == Array(pattern(1 << 20, seed: 14)[8192..<12_288]))
        // A snapshot export read directly.
        let snap = try dax.volume(named: "vol0@s")
        _ = try block.withUnsafeMutableBytes { try snap.read(offset: 12_288, count: 4096, into: $0.baseAddress!) }
        #expect(block == Array(pattern(1 << 20, seed: 14)[12_288..<16_384]))
        #expect(dax.fallbacks == 0)
    }

    @Test(.enabled(if: FileManager.default.isExecutableFile(atPath: pmemNBDBinary)))
    func feedCommandFollowsEvents() throws {
        let d = ScratchDirectory()
        let pool = d.file("p.pool"), sock = d.file("s.sock")
        let server = try ServerProcess(["serve", pool, "--create", "64M", "-U", sock])
        defer { _ = server.stop() }
        let c = try connectWhenReady(sock)
        let follower = try ChildProcess(executable: pmemNBDBinary, arguments: [pmemNBDBinary, "feed", "--pool", pool, "--follow", "--json"],
                                        standardOutput: .pipe)
        // The follower's output as it comes; until `output` holds `marker` (20 s at most), `step`
        // runs every 0.2 s. (It subscribes from "now": a fixed sleep before the first write once
        // let it miss both events on a loaded machine.)
        var output: [UInt8] = []
        func follow(until marker: String, step: () throws -> Void) rethrows {
            guard let fd = follower.standardOutput?.rawValue else { return }
            let deadline = ContinuousClock.now + .seconds(20)
            var chunk = [UInt8](repeating: 0, count: 4096)
            while ContinuousClock.now < deadline, !String(decoding: output, as: UTF8.self).contains(marker) {
                try step()
                var p = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
                guard poll(&p, 1, 200) > 0 else { continue }
                let n = chunk.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
                if n <= 0 { break }
                output += chunk[0..<n]
            }
        }
        // Each write fills a hole (a remap event) until the follower shows one.
        var block: UInt64 = 1
        try follow(until: "\"remap\"") { try c.pwrite(pattern(4096, seed: 16), offset: block << 12); block += 1 }
        #expect(try run([pmemNBDBinary, "snapshot", "create", "pmem0@x", "--pool", pool]).status == 0)
        follow(until: "snapshot-created") {}
        follower.signal(SIGTERM)
        let followed = follower.collect(timeout: .seconds(20))
        #expect(!followed.timedOut)
        output += followed.standardOutput
        let lines = String(decoding: output, as: UTF8.self).split(separator: "\n")
        let objects = lines.compactMap { VolumeRequests.decode(String($0)) }
        let remaps = objects.filter { $0["kind"] as? String == "remap" }
        #expect(!remaps.isEmpty && objects.count == remaps.count + 1, "\(objects)")
        #expect(remaps.allSatisfy { ($0["first"] as? Int).map { $0 >= 1 && UInt64($0) < block } ?? false })
        #expect(objects.last?["kind"] as? String == "snapshot-created")
    }
}
