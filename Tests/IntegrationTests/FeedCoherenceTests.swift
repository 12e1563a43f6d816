import CLibNBD
import FeedWire
import Foundation
import Glibc
import PmemDAX
import PmemFeed
import PmemFeedClient
import PmemNBD
import PmemSystem
import PmemVolumes
@testable import TestSupport
import Testing

/// A value several threads set and read.
final class Shared<Value>: @unchecked Sendable {
    private let lock = PosixMutex()
    private var value: Value
    init(_ value: Value) { self.value = value }
    var get: Value { lock.withLock { value } }
    func set(_ v: Value) { lock.withLock { value = v } }
    func update<T>(_ body: (inout Value) -> T) -> T { lock.withLock { body(&value) } }
}

/// Something not Sendable handed to another thread that alone uses it from then on (or that
/// is safe to share, like a libnbd handle).
final class Handed<T>: @unchecked Sendable {
    let value: T
    init(_ value: T) { self.value = value }
}

/// Runs `body` on its own thread; `join` waits for it (at most `timeout` seconds).
final class Background: @unchecked Sendable {
    private let done = WaitGroup()
    private let failure = Shared<String?>(nil)
    init(_ name: String, _ body: @escaping @Sendable () throws -> Void) {
        done.enter()
        OSThread.spawn(name: name) { [done, failure] in
            do { try body() } catch { failure.set("\(error)") }
            done.leave()
        }
    }
    /// Waits for the thread; its error (or a timeout) as text, nil when it finished cleanly.
    @discardableResult
    func join(timeout: Double = 60) -> String? {
        guard done.wait(timeoutSeconds: timeout) else { return "did not finish within \(timeout) s" }
        return failure.get
    }
}

/// Polls `condition` every 10 ms for at most `timeout` seconds.
@discardableResult
func eventually(timeout: Double = 10, _ condition: () throws -> Bool) rethrows -> Bool {
    let deadline = Date().addingTimeInterval(timeout)
    while Date() < deadline {
        if try condition() { return true }
        usleep(10_000)
    }
    return try condition()
}

/// Regression tests for the six violations of issue 14, each naming the guarantee of
/// Docs/FEED.md ("Guarantees") it checks. They use only what the library offered before the
/// fix (plus package-level test hooks that change nothing unless a test installs them), so
/// they also run against the old code.
@Suite(.timeLimit(.minutes(5))) struct FeedCoherenceTests {
    func id(_ s: TestServer, _ name: String) -> UInt64 { s.pool.volume(named: name)!.id }

    func perform(_ s: TestServer, _ request: [String: Any]) {
        let r = VolumeRequests.perform(request, on: s.pool)
        #expect(r["ok"] as? Bool == true, "\(request): \(r)")
    }

    /// Writes through every block of a small pool's `other` volume (600 blocks, `rounds`
    /// times) so freed blocks come back into use; returns whether `block` was handed out, as
    /// the probe's events show.
    func churnReuses(_ block: UInt64, _ c: NBDClient, _ probe: FeedProbe, rounds: Int, ack: Bool) throws -> Bool {
        let before = probe.events.count
        for round in 0..<rounds {
            for i in 0..<600 { try c.pwrite(pattern(4096, seed: UInt64(round * 7919 + i)), offset: UInt64(i) << 12) }
            try c.flush()
            try probe.pump { probe.events.count >= before + (round + 1) * 600 }
            if ack, let last = probe.events.last { try probe.c.ack(last.sequence) }
        }
        return probe.events.dropFirst(before).contains { $0.kind == .remap && $0.entries.contains { $0.1 == block } }
    }

    /// Fills a new volume with fresh blocks until the pool is full: every free block is handed
    /// out on the way, so this tells whether `block` was free.
    func fillReuses(_ block: UInt64, _ s: TestServer, _ probe: FeedProbe) throws -> Bool {
        perform(s, ["op": "volume-create", "name": "fill", "size": 64 << 20])
        let c = try s.client { try $0.setExportName("fill") }
        let before = probe.events.count
        let chunk = pattern(256 << 12, seed: 99)
        var offset: UInt64 = 0
        while offset < 64 << 20 {
            do { try c.pwrite(chunk, offset: offset) } catch { break } // ENOSPC: the pool is full
            offset += UInt64(chunk.count)
        }
        try probe.pump { probe.events.count >= before + Int(offset >> 20) }
        return probe.events.dropFirst(before).contains { $0.kind == .remap && $0.entries.contains { $0.1 == block } }
    }

    /// The lease ids of the FENCED frames the probe has received (0: the session itself).
    func fencedLeases(_ probe: FeedProbe) -> [UInt64] {
        probe.other.filter { $0.0 == FeedMessage.fenced.rawValue }.compactMap { frame in
            var r = FeedReader(frame.1)
            return try? r.u64()
        }
    }

    /// Fills the pool with a new volume `name`: big writes, then block by block until not
    /// one block is left — also once every freed block waiting for a commit or for readers has
    /// come back (on a slow machine, under a sanitizer, a write may fail before they have).
    func fillPool(_ s: TestServer, name: String = "fill") throws {
        perform(s, ["op": "volume-create", "name": name, "size": 64 << 20])
        let fill = try s.client { try $0.setExportName(name) }
        var offset: UInt64 = 0
        while offset < 64 << 20 {
            do { try fill.pwrite(pattern(256 << 12, seed: 41), offset: offset) } catch { break }
            offset += 256 << 12
        }
        while offset < 64 << 20 {
            do {
                try fill.pwrite(pattern(4096, seed: 42), offset: offset)
            } catch {
                try? fill.flush()
                _ = eventually(timeout: 10) { s.pool.engine.space.held == 0 }
                if (try? fill.pwrite(pattern(4096, seed: 42), offset: offset)) == nil { break }
            }
            offset += 4096
        }
        try fill.shutdown()
    }

    /// A small pool (freed blocks are reused within a few hundred writes): `vol0` with block 0
    /// written, snapshot `vol0@a` of it, block 0 overwritten (so the snapshot alone holds the
    /// old block), and a volume `other` to churn through.
    func snapshotOnlyBlock(ackDeadline: Double = 600) throws -> (TestServer, NBDClient) {
        let s = try TestServer(size: 24 << 20, volumeSize: 2 << 20, withFeed: true, ackDeadline: ackDeadline)
        let c = try s.client()
        try c.pwrite(pattern(4096, seed: 1), offset: 0)
        perform(s, ["op": "snapshot-create", "name": "vol0@a"])
        try c.pwrite(pattern(4096, seed: 2), offset: 0)
        perform(s, ["op": "volume-create", "name": "other", "size": 4 << 20])
        return (s, try s.client { try $0.setExportName("other") })
    }

    // MARK: 1. snapshot deletion and sessions that lease only the snapshot

    /// Guarantee G3: a read lease on a snapshot alone keeps the snapshot's blocks from reuse
    /// through `snapshot delete` until the session acknowledges the deletion.
    @Test(.timeLimit(.minutes(2)))
    func snapshotOnlyLeaseKeepsBlocksThroughSnapshotDelete() throws {
        let (s, other) = try snapshotOnlyBlock()
        let probe = try FeedProbe(s.feedPath)
        let lease = try probe.lease(.read, volume: id(s, "vol0@a"), first: 0, count: 1)
        let old = lease.blocks[0]
        #expect(old != 0)
        perform(s, ["op": "snapshot-delete", "name": "vol0@a"])
        #expect(eventually { s.pool.deletionsPending == 0 }, "the deletion finished")
        #expect(try !churnReuses(old, other, probe, rounds: 4, ack: false), "the snapshot's block was reused before the session acknowledged its deletion")
        try probe.pump { probe.events.contains { $0.kind == .snapshotDeleted } }
        try probe.c.ack(probe.events.last!.sequence)
        #expect(try fillReuses(old, s, probe), "released by the acknowledgement")
    }

    /// Guarantee G2: a block lent by `withMappedBlock` from a session that leases only the
    /// snapshot does not change while lent, though the snapshot is deleted and its blocks would
    /// otherwise be reused at once (the scenario of issue 14, violation 1).
    @Test(.timeLimit(.minutes(2)))
    func blockLentFromASnapshotSurvivesItsDeletion() throws {
        let (s, other) = try snapshotOnlyBlock()
        let dax = try DAXPool(feed: s.feedPath, nbd: s.socketPath, name: "snapshot-only")
        defer { dax.close() }
        let snap = try dax.volume(named: "vol0@a")
        let unchanged = try snap.withMappedBlock(0) { bytes -> Bool in
            let first = Array(bytes)
            guard first == pattern(4096, seed: 1) else { return false }
            perform(s, ["op": "snapshot-delete", "name": "vol0@a"])
            #expect(eventually { s.pool.deletionsPending == 0 })
            for round in 0..<4 {
                for i in 0..<600 { try other.pwrite(pattern(4096, seed: UInt64(round * 600 + i)), offset: UInt64(i) << 12) }
                try other.flush()
            }
            return Array(bytes) == first
        }
        #expect(unchanged == true, "the lent snapshot block changed while lent")
    }

    /// Guarantee G2 for clones: a block lent from a clone survives the deletion of the
    /// snapshot it was cloned from and of the clone itself.
    @Test(.timeLimit(.minutes(2)))
    func blockLentFromACloneSurvivesDeletions() throws {
        let (s, other) = try snapshotOnlyBlock()
        perform(s, ["op": "clone", "source": "vol0@a", "name": "cl"])
        let dax = try DAXPool(feed: s.feedPath, nbd: s.socketPath, name: "clone-only")
        defer { dax.close() }
        let clone = try dax.volume(named: "cl")
        let unchanged = try clone.withMappedBlock(0) { bytes -> Bool in
            let first = Array(bytes)
            guard first == pattern(4096, seed: 1) else { return false }
            perform(s, ["op": "snapshot-delete", "name": "vol0@a"])
            perform(s, ["op": "volume-delete", "name": "cl"])
            #expect(eventually { s.pool.deletionsPending == 0 })
            for round in 0..<4 {
                for i in 0..<600 { try other.pwrite(pattern(4096, seed: UInt64(round * 600 + i)), offset: UInt64(i) << 12) }
                try other.flush()
            }
            return Array(bytes) == first
        }
        #expect(unchanged == true, "the lent clone block changed while lent")
    }

    // MARK: 2. a recall that arrives before the library registered the lease

    /// Guarantee G6: a RECALL that arrives between the grant and the moment `writeLease`
    /// would have registered the handle still reaches the holder (issue 14, violation 2).
    @Test(.timeLimit(.minutes(2)))
    func recallRightAfterTheGrantReachesTheHolder() throws {
        let s = try TestServer(withFeed: true, recallDeadline: 5)
        let c = try s.client()
        try c.pwrite(pattern(8192, seed: 3), offset: 0)
        let snapshot = Shared<Background?>(nil)
        let pool = s.pool
        // The server starts a snapshot (which recalls the lease) as soon as it has granted it...
        s.hub!.testHooks.withLock {
            $0.afterGrant = { _, mode in
                guard mode == .write else { return }
                snapshot.set(Background("snapshot") {
                    let r = VolumeRequests.perform(["op": "snapshot-create", "name": "vol0@s"], on: pool)
                    guard r["ok"] as? Bool == true else { throw DAXError("snapshot: \(r)") }
                })
            }
        }
        let dax = try DAXPool(feed: s.feedPath, nbd: s.socketPath, writable: true)
        defer { dax.close() }
        // ...and the library's caller is slow to see the grant, so the RECALL comes first.
        dax.testHooks.withLock { $0.beforeRegisteringWriteLease = { usleep(300_000) } }
        let vol = try dax.volume(named: "vol0")
        let told = Shared(false)
        let lease = try vol.writeLease(first: 0, count: 2) { told.set(true) }
        #expect(snapshot.get?.join() == nil)
        #expect(eventually(timeout: 5) { told.get }, "the holder of lease \(lease.id) was never told of its recall, but it was returned")
    }

    // MARK: 3. a fenced holder is told so on its handle

    /// Guarantee G7: a holder that misses the recall deadline sees `fenced` on its handle
    /// (issue 14, violation 3).
    @Test(.timeLimit(.minutes(2)))
    func holderThatMissesTheRecallDeadlineSeesFenced() throws {
        let s = try TestServer(withFeed: true, recallDeadline: 0.5)
        let c = try s.client()
        try c.pwrite(pattern(8192, seed: 4), offset: 0)
        let dax = try DAXPool(feed: s.feedPath, nbd: s.socketPath, writable: true)
        defer { dax.close() }
        let vol = try dax.volume(named: "vol0")
        let told = Shared(false)
        // A holder slow to stop: it answers a second and a half after the 0.5 s deadline.
        let lease = try vol.writeLease(first: 0, count: 2) {
            told.set(true)
            usleep(1_500_000)
        }
        perform(s, ["op": "snapshot-create", "name": "vol0@s"])
        #expect(s.hub!.counts.fencedSubscribers == 1, "the server fenced the holder")
        #expect(told.get || eventually(timeout: 5) { told.get }, "the holder was told of the recall")
        #expect(eventually(timeout: 5) { lease.fenced }, "the handle of a fenced lease says fenced=\(lease.fenced) returned=\(lease.returned)")
    }

    /// Guarantee G6/G7: a holder fenced without a recall (its session left an event
    /// unacknowledged past the ack deadline) is told: `onRecall` runs and the handle says fenced.
    @Test(.timeLimit(.minutes(2)))
    func holderFencedForItsReadsIsToldItLostItsWriteLease() throws {
        let s = try TestServer(withFeed: true, ackDeadline: 0.5)
        let c = try s.client()
        try c.pwrite(pattern(3 * 4096, seed: 5), offset: 0)
        let dax = try DAXPool(feed: s.feedPath, nbd: s.socketPath, writable: true)
        defer { dax.close() }
        let vol = try dax.volume(named: "vol0")
        let told = Shared(false)
        let lease = try vol.writeLease(first: 100, count: 1) { told.set(true) }
        // A loan held for 1.5 s while block 0 moves: the session does not acknowledge the move
        // in time and is fenced, write lease and all.
        _ = try vol.withMappedBlock(0) { _ in
            try c.pwrite(pattern(4096, seed: 6), offset: 0)
            usleep(1_500_000)
        }
        #expect(eventually(timeout: 5) { s.hub!.counts.fencedSubscribers == 1 }, "the server fenced the session")
        #expect(eventually(timeout: 5) { lease.fenced }, "the handle says fenced")
        #expect(told.get, "onRecall ran for the lost lease")
    }

    /// Guarantee G7 (found by the torture test): when two operations wait for the same ignored
    /// recall, the one that fences the holder moves its blocks away; the other must not go
    /// ahead meanwhile — a snapshot would share the blocks the fenced holder still stores into.
    @Test(.timeLimit(.minutes(2)))
    func noOperationOvertakesTheRelocationOfAFencedLease() throws {
        let s = try TestServer(size: 96 << 20, volumeSize: 32 << 20, withFeed: true, recallDeadline: 0.5)
        let c = try s.client()
        let blocks = 4096 // 16 MiB: the relocation takes a while
        try c.pwrite(pattern(blocks << 12, seed: 20), offset: 0)
        let probe = try FeedProbe(s.feedPath, subscribe: false)
        let lease = try probe.lease(.write, volume: id(s, "vol0"), first: 0, count: UInt32(blocks))
        guard let poolFD = probe.c.poolFD else { Issue.record("no pool descriptor"); return }
        let w = probe.c.welcome!
        let map = mmap(nil, Int(w.poolSize), PROT_READ | PROT_WRITE, MAP_SHARED, poolFD.rawValue, 0)!
        defer { munmap(map, Int(w.poolSize)) }
        // An NBD write into the range and a snapshot both wait for the recall the holder ignores.
        let pool = s.pool
        let writer = Handed(try s.client())
        let write = Background("nbd-write") { try writer.value.pwrite(pattern(4096, seed: 21), offset: UInt64(blocks - 1) << 12) }
        usleep(100_000)
        let snapshot = Background("snapshot") {
            let r = VolumeRequests.perform(["op": "snapshot-create", "name": "vol0@s"], on: pool)
            guard r["ok"] as? Bool == true else { throw DAXError("\(r)") }
        }
        #expect(write.join() == nil)
        #expect(snapshot.join() == nil)
        // The fenced holder stores into every block it was given.
        for b in lease.blocks { memset(map + Int(w.blockAreaOffset) + Int(b) << 12, 0xEE, 4096) }
        let snap = try s.client { try $0.setExportName("vol0@s") }.pread(count: blocks << 12, offset: 0)
        let expected = pattern(blocks << 12, seed: 20)
        // (The last block is the NBD write's or the old one: the two operations ran in either order.)
        let reached = (0..<(blocks - 1)).filter { snap[($0 << 12)..<(($0 + 1) << 12)] != expected[($0 << 12)..<(($0 + 1) << 12)] }.count
        let last = Array(snap[((blocks - 1) << 12)...])
        #expect(reached == 0 && (last == Array(expected[((blocks - 1) << 12)...]) || last == pattern(4096, seed: 21)),
                "stores of the fenced holder reached \(reached) blocks of the snapshot")
        let now = try c.pread(count: (blocks - 1) << 12, offset: 0)
        let intact = now == Array(expected[..<((blocks - 1) << 12)])
        #expect(intact, "stores of the fenced holder reached the volume")
    }

    /// Guarantee G5 (found by the torture test): the copy-on-write that gives a new write
    /// lease blocks of its own reads the range and writes it back elsewhere; an NBD write
    /// acknowledged in between must not be undone by the write-back.
    @Test(.timeLimit(.minutes(2)))
    func copyOnWriteForALeaseNeverUndoesAnAcknowledgedWrite() throws {
        let s = try TestServer(withFeed: true)
        let c = try s.client()
        try c.pwrite(pattern(4096, seed: 30), offset: 0)
        perform(s, ["op": "snapshot-create", "name": "vol0@s"]) // block 0 is shared: a lease copies it
        let writer = Handed(try s.client())
        let write = Shared<Background?>(nil)
        s.pool.testHooks.withLock {
            $0.relocationCopied = { _, _, reason in
                guard reason == .copyOnWrite, write.get == nil else { return }
                // An NBD write of the block between the copy's read and its write-back.
                write.set(Background("nbd-write") { try writer.value.pwrite(pattern(4096, seed: 31), offset: 0) })
                usleep(300_000)
            }
        }
        let probe = try FeedProbe(s.feedPath, subscribe: false)
        let lease = try probe.lease(.write, volume: id(s, "vol0"), first: 0, count: 1)
        _ = lease
        #expect(write.get != nil, "the lease copied the shared block")
        // The NBD write waits for the lease (it recalls it): give it back.
        try probe.c.returnLease(lease.id)
        #expect(write.get?.join() == nil)
        let now = try c.pread(count: 4096, offset: 0) == pattern(4096, seed: 31)
        #expect(now, "an acknowledged NBD write was undone by the copy-on-write for a write lease")
    }

    /// Guarantee G7 (found by the torture test): when the pool is too full to move a fenced
    /// lease's blocks away, the fence waits for space — FENCED is not sent and the snapshot
    /// waiting for the recall does not go ahead while the volume still uses those blocks.
    @Test(.timeLimit(.minutes(2)))
    func aFenceInAFullPoolWaitsForSpace() throws {
        let s = try TestServer(size: 24 << 20, volumeSize: 2 << 20, withFeed: true, recallDeadline: 0.5)
        let c = try s.client()
        try c.pwrite(pattern(4 << 12, seed: 40), offset: 0)
        let probe = try FeedProbe(s.feedPath, subscribe: false)
        let lease = try probe.lease(.write, volume: id(s, "vol0"), first: 0, count: 4)
        try fillPool(s)
        let pool = s.pool
        let snapshot = Background("snapshot") {
            let r = VolumeRequests.perform(["op": "snapshot-create", "name": "vol0@s"], on: pool)
            guard r["ok"] as? Bool == true else { throw DAXError("\(r)") }
        }
        // The recall is ignored; past the deadline there is no room to move the blocks.
        usleep(1_500_000)
        _ = try probe.reply(.recall)
        // (The session-wide FENCED, lease 0, goes out at once: its reads are unprotected.)
        try probe.pump { !probe.c.hasPendingInput }
        #expect(!fencedLeases(probe).contains(lease.id), "FENCED was sent though the volume still uses the lease's blocks")
        // Space comes back: the blocks move, FENCED follows, the snapshot completes.
        perform(s, ["op": "volume-delete", "name": "fill"])
        try probe.pump { fencedLeases(probe).contains(lease.id) }
        #expect(fencedLeases(probe).contains(lease.id), "FENCED for the write lease")
        #expect(snapshot.join() == nil)
        guard let poolFD = probe.c.poolFD else { Issue.record("no pool descriptor"); return }
        let w = probe.c.welcome!
        let map = mmap(nil, Int(w.poolSize), PROT_READ | PROT_WRITE, MAP_SHARED, poolFD.rawValue, 0)!
        defer { munmap(map, Int(w.poolSize)) }
        for b in lease.blocks { memset(map + Int(w.blockAreaOffset) + Int(b) << 12, 0xEE, 4096) }
        let volume = try c.pread(count: 4 << 12, offset: 0) == pattern(4 << 12, seed: 40)
        let snap = try s.client { try $0.setExportName("vol0@s") }.pread(count: 4 << 12, offset: 0) == pattern(4 << 12, seed: 40)
        #expect(volume && snap, "stores after FENCED reached the volume (\(!volume)) or the snapshot (\(!snap))")
    }

    // MARK: 7. found by the protocol model (Docs/FEED.md "The model", FIX 1-3)

    /// Guarantee G5 (the model's FIX 1, `BUG_DOUBLE_GRANT`): two sessions ask for a write lease
    /// on the same block at once. The second asks while the first's copy-on-write is under way
    /// (no write lease granted yet, so it passes the check for one) and waits for that copy's
    /// move; once the move ends, it must not be granted a second write lease on the block.
    @Test(.timeLimit(.minutes(2)))
    func twoWriteLeaseRequestsForOneBlockAreNotBothGranted() throws {
        let s = try TestServer(withFeed: true)
        let c = try s.client()
        try c.pwrite(pattern(4096, seed: 50), offset: 0)
        perform(s, ["op": "snapshot-create", "name": "vol0@s"]) // block 0 is shared: a lease copies it
        let vol = id(s, "vol0")
        let first = try FeedProbe(s.feedPath, subscribe: false)
        let second = Handed(try FeedProbe(s.feedPath, subscribe: false))
        let secondWaits = Shared(false)
        s.hub!.testHooks.withLock { $0.writeGrantWaitsForMove = { secondWaits.set(true) } }
        let secondRequest = Shared<Background?>(nil)
        let secondLease = Shared<UInt64?>(nil)
        s.pool.testHooks.withLock {
            $0.relocationCopied = { _, _, reason in
                guard reason == .copyOnWrite, secondRequest.get == nil else { return }
                secondRequest.set(Background("second-lease") {
                    secondLease.set(try? second.value.lease(.write, volume: vol, first: 0, count: 1).id)
                })
                // The second request has passed the check and waits for this copy's move.
                _ = eventually(timeout: 10) { secondWaits.get }
            }
        }
        // (Either may be the one granted: the first's final check may see the second's copy
        // under way and try again, after the second was granted.)
        let firstLease = try? first.lease(.write, volume: vol, first: 0, count: 1).id
        #expect(secondRequest.get != nil, "the first request copied the shared block")
        #expect(secondWaits.get, "the second request waited for the first's copy-on-write")
        #expect(secondRequest.get?.join() == nil)
        let granted = [firstLease, secondLease.get].compactMap { $0 }
        #expect(granted.count == 1, "write leases granted on block 0: \(granted)")
        #expect(s.hub!.counts.writeLeases == granted.count)
    }

    /// Guarantee G7 (the model's FIX 2, `BUG_SILENT_FENCE`): a session whose lease a rollback
    /// ended, and whose free hold stays outstanding because a loan holds its acknowledgements
    /// back, is fenced at the ack deadline with no lease left to send FENCED for. It must be
    /// told all the same (a session-wide FENCED): the library says `isFenced` — from then on
    /// the lent block may be reused.
    @Test(.timeLimit(.minutes(2)))
    func aSessionFencedWithNoLeaseLeftIsTold() throws {
        let s = try TestServer(withFeed: true, ackDeadline: 0.5)
        let c = try s.client()
        try c.pwrite(pattern(4096, seed: 60), offset: 0)
        perform(s, ["op": "snapshot-create", "name": "vol0@s"])
        try c.pwrite(pattern(4096, seed: 61), offset: 0)
        let dax = try DAXPool(feed: s.feedPath, nbd: s.socketPath, name: "lender")
        defer { dax.close() }
        let vol = try dax.volume(named: "vol0")
        let told = try vol.withMappedBlock(0) { _ -> Bool in
            perform(s, ["op": "snapshot-rollback", "name": "vol0@s"])
            // The loan keeps the rollback unacknowledged: past the deadline the session is fenced.
            #expect(eventually(timeout: 10) { s.hub!.counts.fencedSubscribers == 1 }, "the server fenced the session")
            #expect(s.hub!.counts.leases == 0, "the rollback ended the session's lease")
            return eventually(timeout: 5) { dax.isFenced }
        }
        #expect(told == true, "the session was fenced, its hold on frees dropped, and the library never told")
    }

    /// The model's FIX 3 (`BUG_RESERVE_FIRST`, a deadlock): an NBD write into a write-leased
    /// range of a nearly full pool. The holder ignores the recall; fencing it moves its blocks
    /// away, which needs free blocks. The write must not hold its own reservation meanwhile
    /// (room is left for the move or for the write, not both): it completes or fails with
    /// ENOSPC, and the holder gets FENCED.
    @Test(.timeLimit(.minutes(2)))
    func aWriteThatFencesAHolderInANearlyFullPoolDoesNotHang() throws {
        let s = try TestServer(size: 24 << 20, volumeSize: 2 << 20, withFeed: true, recallDeadline: 0.5)
        let c = try s.client()
        let n = 32
        try c.pwrite(pattern(n << 12, seed: 70), offset: 0)
        let probe = try FeedProbe(s.feedPath, subscribe: false)
        let lease = try probe.lease(.write, volume: id(s, "vol0"), first: 0, count: UInt32(n))
        // A full pool, then about 1.5 n blocks given back.
        perform(s, ["op": "volume-create", "name": "pad", "size": 1 << 20])
        try s.client { try $0.setExportName("pad") }.pwrite(pattern(48 << 12, seed: 71), offset: 0)
        try fillPool(s)
        perform(s, ["op": "volume-delete", "name": "pad"])
        #expect(eventually { s.pool.deletionsPending == 0 })
        try c.flush()
        let free = s.pool.engine.space.free
        #expect(free >= UInt64(n) + 8 && free < UInt64(2 * n), "\(free) blocks free: the window this test needs is missed")
        let writer = Handed(try s.client())
        let write = Background("nbd-write") { try writer.value.pwrite(pattern(n << 12, seed: 72), offset: 0) }
        _ = try probe.reply(.recall) // ignored
        let outcome = write.join(timeout: 15)
        let hung = outcome?.contains("did not finish") == true
        #expect(!hung, "the write hung: the fence it caused waits for space the write holds")
        #expect(outcome == nil || outcome!.contains("space"), "the write: \(outcome ?? "done")")
        if hung {
            // Unwind: space for the move, then the write goes on.
            perform(s, ["op": "volume-delete", "name": "fill"])
            _ = write.join(timeout: 30)
        }
        try probe.pump { fencedLeases(probe).contains(lease.id) }
        #expect(fencedLeases(probe).contains(lease.id), "FENCED for the write lease")
        // Nothing lost: the old contents, or the write's if it completed.
        let now = try c.pread(count: n << 12, offset: 0)
        let whole = now == pattern(n << 12, seed: 70) || now == pattern(n << 12, seed: 72)
        #expect(whole, "the volume holds neither its old contents nor the write's")
    }

    // MARK: 4. requests in flight together on one connection

    /// Guarantee G8: VOLUMES and LEASE requests in flight together on one connection, from two
    /// threads, each get their own answer, and no lease is left behind (issue 14, violation 4).
    @Test(.timeLimit(.minutes(2)))
    func volumesAndLeaseRequestsInFlightTogetherGetTheirOwnReplies() throws {
        let s = try TestServer(withFeed: true)
        let c = try s.client()
        try c.pwrite(pattern(64 * 4096, seed: 7), offset: 0)
        let dax = try DAXPool(feed: s.feedPath, nbd: s.socketPath, writable: true)
        defer { dax.close() }
        let vol = try dax.volume(named: "vol0")
        let problems = Shared<[String]>([])
        let stop = Shared(false)
        let lister = Background("lister") {
            while !stop.get {
                do {
                    try dax.refreshVolumes()
                    _ = try dax.volume(named: "vol0")
                } catch { problems.update { $0.append("volumes: \(error)") }; return }
            }
        }
        for i in 0..<150 {
            do {
                let lease = try vol.writeLease(first: UInt64(i % 16) * 2, count: 2) {}
                if lease.id == 0 || lease.blocks.count != 2 || lease.blocks.contains(0) {
                    problems.update { $0.append("lease \(i): id \(lease.id), blocks \(lease.blocks)") }
                }
                try lease.release()
            } catch {
                problems.update { $0.append("lease \(i): \(error)") }
                break
            }
            if !problems.get.isEmpty { break }
        }
        stop.set(true)
        #expect(lister.join() == nil)
        #expect(problems.get.isEmpty, "\(problems.get.prefix(5))")
        #expect(eventually(timeout: 5) { s.hub!.counts.writeLeases == 0 }, "leases left behind: \(s.hub!.counts.writeLeases)")
    }

    /// Guarantee G8: a RETURN is never stuck behind a LEASE request the server is still
    /// working on. Here the LEASE waits for a snapshot, which waits for the RETURN: answered
    /// in order, the session would be fenced for missing a deadline it met.
    @Test(.timeLimit(.minutes(2)))
    func returnIsNotStuckBehindALeaseRequestWaitingForTheSameSnapshot() throws {
        let s = try TestServer(withFeed: true, recallDeadline: 1.5)
        let c = try s.client()
        try c.pwrite(pattern(256 * 4096, seed: 8), offset: 0)
        let dax = try DAXPool(feed: s.feedPath, nbd: s.socketPath, writable: true)
        defer { dax.close() }
        let vol = try dax.volume(named: "vol0")
        let second = Shared<Background?>(nil)
        let secondLease = Shared<DAXWriteLease?>(nil)
        let first = try vol.writeLease(first: 0, count: 2) {
            // While stopping, the holder asks for another lease on the same connection; that
            // request reaches the server before this lease's RETURN.
            second.set(Background("second-lease") { secondLease.set(try vol.writeLease(first: 200, count: 2) {}) })
            usleep(300_000)
        }
        let t0 = Date()
        perform(s, ["op": "snapshot-create", "name": "vol0@s"])
        #expect(Date().timeIntervalSince(t0) < 1.4, "the snapshot waited for the recall deadline")
        #expect(s.hub!.counts.fencedSubscribers == 0, "a holder that returned in time was fenced")
        #expect(second.get?.join() == nil, "the second lease request failed")
        #expect(secondLease.get != nil)
        _ = first
    }

    // MARK: 5. a handle outlives its snapshot's name

    /// Guarantee G9: a handle keeps reading the snapshot it was opened on, or fails; it never
    /// reads a new snapshot that took the name; `volume(named:)` finds the new one
    /// (issue 14, violation 5).
    @Test(.timeLimit(.minutes(2)))
    func aHandleNeverReadsANewSnapshotOfTheSameName() throws {
        let s = try TestServer(withFeed: true)
        let c = try s.client()
        try c.pwrite(pattern(8192, seed: 9), offset: 0)
        perform(s, ["op": "snapshot-create", "name": "vol0@a"])
        let dax = try DAXPool(feed: s.feedPath, nbd: s.socketPath)
        defer { dax.close() }
        let old = try dax.volume(named: "vol0@a")
        var block = [UInt8](repeating: 0, count: 8192)
        try block.withUnsafeMutableBytes { _ = try old.read(offset: 0, count: 8192, into: $0.baseAddress!) }
        let before = block == pattern(8192, seed: 9)
        #expect(before)
        try c.pwrite(pattern(8192, seed: 10), offset: 0)
        perform(s, ["op": "snapshot-delete", "name": "vol0@a"])
        perform(s, ["op": "snapshot-create", "name": "vol0@a"])
        let newID = id(s, "vol0@a")
        #expect(newID != old.info.id)
        // Through the old handle: the old contents or an error, never the new snapshot's.
        for _ in 0..<3 {
            do {
                try block.withUnsafeMutableBytes { _ = try old.read(offset: 0, count: 8192, into: $0.baseAddress!) }
                let same = block == pattern(8192, seed: 9)
                #expect(same, "the old handle read the new snapshot")
            } catch {
                #expect("\(error)".contains("deleted"), "a clear error: \(error)")
            }
            do {
                let lent = try old.withMappedBlock(1) { Array($0) }
                let fine = lent == nil || lent == Array(pattern(8192, seed: 9)[4096...])
                #expect(fine, "a loan through the old handle lent the new snapshot")
            } catch {
                #expect("\(error)".contains("deleted"), "a clear error: \(error)")
            }
            usleep(50_000)
        }
        #expect(try dax.volume(named: "vol0@a").info.id == newID, "volume(named:) returns the current snapshot of that name")
        let fresh = try dax.volume(named: "vol0@a")
        try block.withUnsafeMutableBytes { _ = try fresh.read(offset: 0, count: 8192, into: $0.baseAddress!) }
        let current = block == pattern(8192, seed: 10)
        #expect(current, "the new handle reads the new snapshot")
    }

    // MARK: 6. the rollback event and the background deleter

    /// Guarantees G2 and G4: the background deleter cannot free a block of a volume's old map
    /// before the rollback event is published (and the session's hold taken), even when it is
    /// awake (another deletion in progress) and the rollback pauses between its durable map
    /// swap and its event: a block lent from the old map stays put throughout.
    @Test(.timeLimit(.minutes(2)))
    func rollbackFreesNothingOfTheOldMapBeforeItsEvent() throws {
        let s = try TestServer(size: 24 << 20, volumeSize: 2 << 20, withFeed: true, ackDeadline: 600)
        let c = try s.client()
        try c.pwrite(pattern(4096, seed: 11), offset: 0)
        perform(s, ["op": "snapshot-create", "name": "vol0@s"])
        try c.pwrite(pattern(4096, seed: 12), offset: 0) // only the volume's current map holds this block
        perform(s, ["op": "volume-create", "name": "other", "size": 4 << 20])
        let other = Handed(try s.client { try $0.setExportName("other") })
        let pool = s.pool
        let churn: @Sendable (Int) throws -> Void = { rounds in
            for round in 0..<rounds {
                for i in 0..<600 { try other.value.pwrite(pattern(4096, seed: UInt64(round * 600 + i)), offset: UInt64(i) << 12) }
                try other.value.flush()
            }
        }
        let freedEarly = Shared(false)
        s.pool.testHooks.withLock {
            $0.beforeVolumeEvent = { change, _ in
                guard change == .rollback else { return }
                // The deleter is awake; give it time to take the old map apart, then reuse
                // whatever it freed.
                pool.wakeDeleter()
                if eventually(timeout: 1, { pool.deletionsPending == 0 }) { freedEarly.set(true) }
                do { try churn(3) } catch { Issue.record("churn: \(error)") }
            }
        }
        let dax = try DAXPool(feed: s.feedPath, nbd: s.socketPath)
        defer { dax.close() }
        let vol = try dax.volume(named: "vol0")
        let unchanged = try vol.withMappedBlock(0) { bytes -> Bool in
            let first = Array(bytes)
            guard first == pattern(4096, seed: 12) else { return false }
            let rollback = Background("rollback") {
                let r = VolumeRequests.perform(["op": "snapshot-rollback", "name": "vol0@s"], on: pool)
                guard r["ok"] as? Bool == true else { throw DAXError("rollback: \(r)") }
            }
            #expect(rollback.join() == nil)
            try churn(3)
            return Array(bytes) == first
        }
        #expect(!freedEarly.get, "the deleter released the old map before the rollback event")
        #expect(unchanged == true, "a block lent from the old map changed while lent")
    }
}
