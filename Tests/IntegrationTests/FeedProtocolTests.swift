import FeedWire
import Foundation
import Glibc
import PmemDAX
import PmemFeedClient
import PmemNBD
import PmemSystem
@testable import TestSupport
import Testing

/// Feed protocol 2 and the write-lease life cycle of the DAX library: request ids, RELEASED,
/// a lease granted after its requester gave up, the handle's states, store sections, and
/// stores after FENCED. Each test names the guarantee of Docs/FEED.md it checks.
@Suite(.timeLimit(.minutes(5))) struct FeedProtocolTests {
    func perform(_ s: TestServer, _ request: [String: Any]) {
        let r = VolumeRequests.perform(request, on: s.pool)
        #expect(r["ok"] as? Bool == true, "\(request): \(r)")
    }

    /// Guarantee G8: VOLUME-LIST echoes the request id (and the sequence it reflects); a
    /// client speaking protocol 1 is refused with a message.
    @Test(.timeLimit(.minutes(1)))
    func volumeListEchoesTheRequestAndVersionOneIsRefused() throws {
        let s = try TestServer(withFeed: true)
        let probe = try FeedProbe(s.feedPath, subscribe: false)
        try probe.c.listVolumes(4242)
        let list = try FeedConnection.decodeVolumeList(try probe.reply(.volumes))
        #expect(list.request == 4242)
        #expect(list.sequence == probe.c.welcome.sequence)
        #expect(list.volumes.map(\.name) == ["vol0"])
        // A version 1 HELLO, by hand.
        let fd = try Socket.connectUnix(path: s.feedPath)
        defer { fd.close() }
        var w = FeedWriter()
        w.u32(1)
        w.u32(0)
        w.string("old client")
        try fd.writeAll(bytes: FeedWriter.frame(.hello, w.bytes))
        var tv = timeval(tv_sec: 5, tv_usec: 0)
        setsockopt(fd.rawValue, SOL_SOCKET, SO_RCVTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
        guard let header = try fd.readExactly(FeedProtocol.headerSize) else { Issue.record("no answer"); return }
        let h = try FeedFrameHeader.decode(header)
        #expect(h.type == FeedMessage.error.rawValue)
        var r = FeedReader(try fd.readExactly(h.length) ?? [])
        #expect(try r.string().contains("version 1 is not supported"))
    }

    /// Guarantee G6: RELEASE and RETURN are confirmed with RELEASED; the handle's state
    /// follows: held → releasing → returned, held → recalled → returned.
    @Test(.timeLimit(.minutes(1)))
    func releaseAndReturnAreConfirmed() throws {
        let s = try TestServer(withFeed: true)
        let c = try s.client()
        try c.pwrite(pattern(8192, seed: 1), offset: 0)
        let dax = try DAXPool(feed: s.feedPath, nbd: s.socketPath, writable: true)
        defer { dax.close() }
        let vol = try dax.volume(named: "vol0")
        let a = try vol.writeLease(first: 0, count: 1) {}
        #expect(a.state == .held)
        try a.release()
        #expect(a.waitUntilEnded() == .returned)
        let told = Shared(0)
        let b = try vol.writeLease(first: 1, count: 1) { told.update { $0 += 1 } }
        perform(s, ["op": "snapshot-create", "name": "vol0@s"])
        #expect(b.waitUntilEnded() == .returned)
        #expect(told.get == 1, "onRecall ran once")
        #expect(throws: (any Error).self) { try b.withStores {} }
        #expect(s.hub!.counts.writeLeases == 0)
        // The raw protocol: RELEASED names the lease.
        let probe = try FeedProbe(s.feedPath, subscribe: false)
        let lease = try probe.lease(.write, volume: s.pool.volume(named: "vol0")!.id, first: 5, count: 1)
        try probe.c.release(lease.id)
        var r = FeedReader(try probe.reply(.released))
        #expect(try r.u64() == lease.id)
    }

    /// Guarantee G8: a write lease granted after its requester gave up waiting is given back
    /// by the library, not leaked (it would block every later lease over its range).
    @Test(.timeLimit(.minutes(1)))
    func aLeaseGrantedAfterItsRequesterGaveUpIsGivenBack() throws {
        let s = try TestServer(withFeed: true, recallDeadline: 3)
        let c = try s.client()
        try c.pwrite(pattern(16 * 4096, seed: 2), offset: 0)
        // A holder that never answers recalls keeps a snapshot waiting for 3 s...
        let stubborn = try FeedProbe(s.feedPath, subscribe: false)
        _ = try stubborn.lease(.write, volume: s.pool.volume(named: "vol0")!.id, first: 0, count: 1)
        let pool = s.pool
        let snapshot = Background("snapshot") {
            let r = VolumeRequests.perform(["op": "snapshot-create", "name": "vol0@s"], on: pool)
            guard r["ok"] as? Bool == true else { throw DAXError("\(r)") }
        }
        usleep(200_000)
        // ...and a lease request behind it waits as long; its requester gives up after 1 s.
        let dax = try DAXPool(feed: s.feedPath, nbd: s.socketPath, writable: true)
        defer { dax.close() }
        let vol = try dax.volume(named: "vol0")
        dax.requestTimeout = 1
        do {
            _ = try vol.writeLease(first: 8, count: 2) {}
            Issue.record("the lease came within the timeout")
        } catch {
            #expect("\(error)".contains("did not answer"), "\(error)")
        }
        #expect(snapshot.join() == nil)
        #expect(eventually(timeout: 10) { s.hub!.counts.writeLeases == 0 }, "the late grant was given back")
        dax.requestTimeout = 30
        let again = try vol.writeLease(first: 8, count: 2) {}
        #expect(again.state == .held)
    }

    /// Guarantee G5: a recall waits for a running store section; what it stored is in the
    /// snapshot the recall was for, and nothing more can be stored.
    @Test(.timeLimit(.minutes(1)))
    func aRecallWaitsForARunningStoreSection() throws {
        let s = try TestServer(withFeed: true)
        let c = try s.client()
        try c.pwrite(pattern(4096, seed: 3), offset: 0)
        let dax = try DAXPool(feed: s.feedPath, nbd: s.socketPath, writable: true)
        defer { dax.close() }
        let vol = try dax.volume(named: "vol0")
        let lease = try vol.writeLease(first: 0, count: 1) {}
        let inSection = Shared(false)
        let storer = Background("storer") {
            try lease.withStores {
                inSection.set(true)
                usleep(400_000) // the recall arrives meanwhile
                pattern(4096, seed: 4).withUnsafeBytes { lease.pointer(0).copyMemory(from: $0.baseAddress!, byteCount: 4096) }
            }
        }
        #expect(eventually { inSection.get })
        perform(s, ["op": "snapshot-create", "name": "vol0@s"])
        #expect(storer.join() == nil)
        #expect(lease.waitUntilEnded() == .returned)
        let snap = try s.client { try $0.setExportName("vol0@s") }.pread(count: 4096, offset: 0)
        let stored = snap == pattern(4096, seed: 4)
        #expect(stored, "the store made in the section that the recall waited for is in the snapshot")
        #expect(throws: (any Error).self) { try lease.withStores {} }
    }

    /// Guarantee G7: once the handle says fenced, stores through its pointers reach neither
    /// the volume nor the snapshot whose recall it ignored; the pool reads through NBD and
    /// refuses new write leases.
    @Test(.timeLimit(.minutes(1)))
    func storesAfterFencedReachNothing() throws {
        let s = try TestServer(withFeed: true, recallDeadline: 0.5)
        let c = try s.client()
        try c.pwrite(pattern(4096, seed: 5), offset: 0)
        let dax = try DAXPool(feed: s.feedPath, nbd: s.socketPath, writable: true)
        defer { dax.close() }
        let vol = try dax.volume(named: "vol0")
        let release = Shared(false)
        let lease = try vol.writeLease(first: 0, count: 1) {
            // Ignores the recall until fenced.
            while !release.get { usleep(10_000) }
        }
        perform(s, ["op": "snapshot-create", "name": "vol0@s"])
        #expect(lease.waitUntilEnded() == .fenced)
        memset(lease.pointer(0), 0xEE, 4096)
        lease.flush()
        release.set(true)
        let now = try c.pread(count: 4096, offset: 0) == pattern(4096, seed: 5)
        let snap = try s.client { try $0.setExportName("vol0@s") }.pread(count: 4096, offset: 0) == pattern(4096, seed: 5)
        #expect(now && snap, "a store after FENCED reached the volume (\(now)) or the snapshot (\(snap))")
        #expect(dax.isFenced)
        var buf = [UInt8](repeating: 0, count: 4096)
        #expect(try buf.withUnsafeMutableBytes { try vol.read(offset: 0, count: 4096, into: $0.baseAddress!) } == .nbd)
        #expect(buf == pattern(4096, seed: 5) ? true : false)
        #expect(throws: (any Error).self) { _ = try vol.writeLease(first: 0, count: 1) {} }
    }

    /// Guarantee G6: when the feed connection ends (here the server closes it on a malformed
    /// frame), every holder is told and its handle says lost.
    @Test(.timeLimit(.minutes(1)))
    func aLostConnectionTellsEveryHolder() throws {
        let s = try TestServer(withFeed: true)
        let dax = try DAXPool(feed: s.feedPath, nbd: s.socketPath, writable: true)
        defer { dax.close() }
        let vol = try dax.volume(named: "vol0")
        let told = Shared(0)
        let a = try vol.writeLease(first: 0, count: 1) { told.update { $0 += 1 } }
        let b = try vol.writeLease(first: 1, count: 1) { told.update { $0 += 1 } }
        try dax.connection.send(.lease, [1, 2, 3]) // truncated: the server answers ERROR and hangs up
        #expect(a.waitUntilEnded() == .lost && b.waitUntilEnded() == .lost)
        #expect(eventually { told.get == 2 })
        #expect(eventually { s.hub!.counts.writeLeases == 0 })
    }
}
