import Foundation
import Glibc
import NBDServer
import NBDTLS
import PmemNBD
import PmemPool
import PmemSystem
import PmemVolumes
@testable import TestSupport
import Testing

/// Defects of issue 13 a client could trigger, each reproduced: a slow WRITE payload must not
/// stall other clients' writes; a damaged map entry answers EIO everywhere it is decoded (block
/// status, dirty bitmap, usage, the reverse map), never another block's meaning; READ and
/// WRITE up to 64 MiB when the client did not agree to the advertised 32 MiB (plain, TLS,
/// extended headers; one byte more is refused); offloaded replies that fail while the
/// connection's thread reads on (the send-failure flag, a race ThreadSanitizer sees).
@Suite(.timeLimit(.minutes(5))) struct HardeningTests {
    /// A thread running `body`, and whether it has finished (tests wait on it with a deadline,
    /// so a stall shows as a failure rather than a hang).
    final class Background: @unchecked Sendable {
        private let done = DispatchSemaphore(value: 0)
        private(set) var error: (any Error)?
        private(set) var seconds: Double = 0

        /// The body runs on one thread only; the caller hands over what it captures.
        private struct Body: @unchecked Sendable { let run: () throws -> Void }

        init(_ body: @escaping () throws -> Void) {
            let b = Body(run: body)
            let thread = Thread { [self] in
                let start = Date()
                do { try b.run() } catch { self.error = error }
                seconds = Date().timeIntervalSince(start)
                done.signal()
            }
            thread.stackSize = 4 << 20
            thread.start()
        }

        private var finished = false

        /// Waits up to `timeout` seconds; true if the body finished.
        func wait(_ timeout: Double) -> Bool {
            if !finished { finished = done.wait(timeout: .now() + timeout) == .success }
            return finished
        }
    }

    // MARK: defect 4: a slow client stalls other clients' writes

    /// A raw client sends the header of a partial-block WRITE and then its 10-byte payload a
    /// byte a second. Meanwhile a libnbd client's partial writes to 300 other blocks (some
    /// certainly on the same lock stripe), full-block writes, and a partial write to the very
    /// same block must all complete at once. Then both writes to the shared block are there.
    @Test(.timeLimit(.minutes(2))) func aSlowWritePayloadDoesNotStallOtherWriters() throws {
        let s = try TestServer()
        let raw = try RawClient(unix: s.socketPath)
        _ = try raw.greet()
        _ = try raw.go()
        let slow = Array("0123456789".utf8)
        try raw.send(RawClient.request(type: 1, cookie: 7, offset: 100, length: UInt32(slow.count)))
        let sender = Background {
            for b in slow {
                try raw.send([b])
                usleep(1_000_000)
            }
        }
        usleep(300_000)
        let c = try s.client()
        let others = Background {
            for b in 1...300 { try c.pwrite(pattern(100, seed: UInt64(b)), offset: UInt64(b) << 12 + 10) }
            for b in 301...340 { try c.pwrite(pattern(4096, seed: UInt64(b)), offset: UInt64(b) << 12) }
            try c.pwrite([UInt8](repeating: 0xEE, count: 50), offset: 2000)
        }
        let prompt = others.wait(4)
        #expect(prompt, "other clients' writes waited for the slow client's payload")
        #expect(others.wait(60) && others.error == nil, "\(String(describing: others.error))")
        #expect(sender.wait(30) && sender.error == nil)
        guard let reply = try raw.reply() else {
            Issue.record("no reply to the slow write")
            return
        }
        #expect(reply.cookie == 7 && reply.error == 0)
        // Both read-modify-writes of block 0 are in it, and nothing else changed there.
        var expected = [UInt8](repeating: 0, count: 4096)
        expected.replaceSubrange(100..<110, with: slow)
        expected.replaceSubrange(2000..<2050, with: [UInt8](repeating: 0xEE, count: 50))
        #expect(try c.pread(count: 4096, offset: 0) == expected)
        for b in [1, 77, 300] {
            var block = [UInt8](repeating: 0, count: 4096)
            block.replaceSubrange(10..<110, with: pattern(100, seed: UInt64(b)))
            #expect(try c.pread(count: 4096, offset: UInt64(b) << 12) == block, "block \(b)")
        }
        #expect(try c.pread(count: 4096, offset: 320 << 12) == pattern(4096, seed: 320))
    }

    // MARK: defect 5: map check tags bypassed

    /// A pool file served in this process (as `pmem-nbd serve` would), for pools damaged on disk.
    final class FileServer {
        let pool: Pool
        let server: Server
        let socketPath: String
        private var closed = false

        init(path: String, socketPath: String) throws {
            pool = try Pool.open(path: path, persistence: .page)
            server = Server(exports: PoolExports(pool: pool, readOnly: false, defaultName: nil))
            self.socketPath = socketPath
            try server.listen(on: [Socket.listenUnix(path: socketPath)])
        }

        func client(_ export: String, context: String? = nil) throws -> NBDClient {
            let c = try NBDClient()
            try c.setExportName(export)
            if let context { try c.addMetaContext(context) }
            try c.connect(unix: socketPath)
            return c
        }

        func close() {
            guard !closed else { return }
            closed = true
            server.shutdown(timeoutSeconds: 10)
            try? pool.close()
            unlink(socketPath)
        }
    }

    /// Byte offset in the pool file of entry `index` of the leaf of `vblock` in `volume`'s map.
    static func leafEntryOffset(_ engine: PoolEngine, _ volume: Volume, vblock: UInt64) throws -> UInt64 {
        let record = engine.records().first { $0.id == volume.id }!
        let (leaf, _) = try engine.leaf(rootOffset: VolumeRecord.offset(slot: record.slot) + VolumeRecord.rootField,
                                        depth: record.depth, vblock: vblock)
        #expect(leaf != 0)
        return engine.entryOffset(node: leaf, index: Int(vblock & 511))
    }

    static func poke(_ path: String, _ offset: UInt64, _ word: UInt64) throws {
        let fd = try FileDescriptor.open(path, O_RDWR)
        defer { fd.close() }
        try fd.writeAll(at: Int(offset), bytes: withUnsafeBytes(of: word.littleEndian) { Array($0) })
    }

    static func peek(_ path: String, _ offset: UInt64) throws -> UInt64 {
        let fd = try FileDescriptor.open(path, O_RDONLY)
        defer { fd.close() }
        let b = try fd.read(at: Int(offset), count: 8)
        return b.withUnsafeBytes { UInt64(littleEndian: $0.loadUnaligned(as: UInt64.self)) }
    }

    /// Volume `vol0` (blocks 0-3 written) and its snapshot `s`; block 3 rewritten since, so
    /// the volume has a leaf of its own. Then entry 1 of that leaf is overwritten with entry
    /// 2's word: a stray write that names another block of the pool under a wrong tag. Block
    /// status (allocation, sharing, the dirty bitmap against `s`) over a range that includes it
    /// answers EIO, as a read of it does; usage fails; blocks 0 and 2 still read. Then the
    /// volume's root is overwritten with the snapshot's root word (a tag for another slot):
    /// the reverse map (the feed's owner query) must not take the snapshot's blocks for the
    /// volume's.
    @Test(.timeLimit(.minutes(2))) func damagedMapEntriesAnswerEIOWhereverTheyAreDecoded() throws {
        let d = ScratchDirectory()
        let path = d.file("pool"), sock = d.file("s.sock")
        try PoolEngine.create(path: path, size: 48 << 20, volumeName: "vol0", volumeSize: 16 << 20)
        var snapshotPhysical3: UInt64 = 0
        var volumeID: UInt64 = 0, snapshotID: UInt64 = 0
        do {
            let pool = try Pool.open(path: path, persistence: .page, commitMode: .inline)
            let vol = pool.volume(named: "vol0")!
            volumeID = vol.id
            for b in 0..<4 {
                try pattern(4096, seed: UInt64(b)).withUnsafeBytes { (bytes) throws in
                    var src = BufferByteSource(bytes)
                    try vol.write(offset: UInt64(b) << 12, length: 4096, fua: false, from: &src)
                }
            }
            _ = try pool.createSnapshot(volume: "vol0", snapshot: "s")
            snapshotID = pool.records().first { $0.name == "s" && $0.kind == .snapshot }!.id
            snapshotPhysical3 = try pool.volume(id: snapshotID)!.currentBlocks(first: 3, count: 1)[0]
            try pattern(4096, seed: 33).withUnsafeBytes { (bytes) throws in
                var src = BufferByteSource(bytes)
                try vol.write(offset: 3 << 12, length: 4096, fua: false, from: &src)
            }
            try pool.close()
        }
        let readOnly = try Pool.open(path: path, readOnly: true, lock: false)
        let entry1 = try Self.leafEntryOffset(readOnly.engine, readOnly.volume(named: "vol0")!, vblock: 1)
        let entry2 = try Self.leafEntryOffset(readOnly.engine, readOnly.volume(named: "vol0")!, vblock: 2)
        let records = readOnly.records()
        try readOnly.close()
        let stray = try Self.peek(path, entry2)
        #expect(MapEntry.block(stray, index: 1, level: 0) == nil, "the stray word fails its tag at index 1")
        try Self.poke(path, entry1, stray)

        let server = try FileServer(path: path, socketPath: sock)
        defer { server.close() }
        let plain = try server.client("vol0")
        #expect(try plain.pread(count: 4096, offset: 0) == pattern(4096, seed: 0))
        #expect(try plain.pread(count: 4096, offset: 2 << 12) == pattern(4096, seed: 2))
        #expect(throws: (any Error).self, "READ of the damaged block") { try plain.pread(count: 4096, offset: 1 << 12) }
        for context in ["base:allocation", "pmem-nbd:sharing", "qemu:dirty-bitmap:s"] {
            let c = try server.client("vol0", context: context)
            #expect(throws: (any Error).self, "\(context) over the damaged entry") {
                let extents = try c.blockStatus(count: 4 << 12, offset: 0)
                Issue.record("\(context) answered \(extents)")
            }
            // Away from the damaged leaf the context still answers.
            #expect(try c.blockStatus(count: 4096, offset: 8 << 20)[context] != nil, "\(context) elsewhere")
        }
        let record = server.pool.records().first { $0.id == volumeID }!
        #expect(throws: PoolError.self, "usage of the damaged volume") { _ = try server.pool.usage(of: record) }
        let snapshotRecord = server.pool.records().first { $0.id == snapshotID }!
        #expect(try server.pool.usage(of: snapshotRecord).referenced == 4 * 4096, "the snapshot's map is intact")
        server.close()

        // The volume's root word replaced by the snapshot's: the volume's map now seems to be
        // the snapshot's, block 3 included.
        let rootOf = { (slot: Int) in VolumeRecord.offset(slot: slot) + VolumeRecord.rootField }
        let volumeSlot = records.first { $0.id == volumeID }!.slot, snapshotSlot = records.first { $0.id == snapshotID }!.slot
        try Self.poke(path, rootOf(volumeSlot), try Self.peek(path, rootOf(snapshotSlot)))
        let reopened = try Pool.open(path: path, persistence: .page)
        defer { try? reopened.close() }
        let owners = try reopened.owners(of: snapshotPhysical3)
        #expect(owners.map { "\($0.0):\($0.1)" } == ["\(snapshotID):3"], "owners \(owners) (volume \(volumeID), snapshot \(snapshotID))")
        #expect(throws: PoolError.self) { _ = try reopened.usage(of: reopened.records().first { $0.id == volumeID }!) }
    }

    /// The volume table's depth and size words are not tagged. A depth word damaged into
    /// nonsense (2^40 + 2) made the first write reserve 2^40 map-node slots (the server died on
    /// the allocation), and a size word damaged upwards (16 MiB to 4 GiB, past what the depth-2
    /// map reaches) made block 262149 read as block 5. On `serve` (run as a process, so a crash
    /// is a failure) the first is now served through the depth its size needs (the map's own,
    /// here) and the second answers EIO; `check` reports both records; the other volume is
    /// untouched.
    @Test(.timeLimit(.minutes(3))) func aDamagedMapDepthOrSizeAnswersEIONeverAnotherBlock() throws {
        let d = ScratchDirectory()
        let master = d.file("master.pool")
        try PoolEngine.create(path: master, size: 64 << 20, volumeName: "vol0", volumeSize: 16 << 20)
        do {
            let pool = try Pool.open(path: master, persistence: .page, commitMode: .inline)
            _ = try pool.createVolume(name: "b", size: 4 << 20)
            for (name, seed) in [("vol0", UInt64(100)), ("b", 200)] {
                let vol = pool.volume(named: name)!
                for block in 0..<8 {
                    try pattern(4096, seed: seed + UInt64(block)).withUnsafeBytes { (bytes) throws in
                        var src = BufferByteSource(bytes)
                        try vol.write(offset: UInt64(block) << 12, length: 4096, fua: false, from: &src)
                    }
                }
            }
            try pool.close()
        }
        let record = VolumeRecord.offset(slot: 0)
        for (what, field, value) in [("depth", VolumeRecord.depthField, (UInt64(1) << 40) | 2), ("size", VolumeRecord.sizeField, UInt64(4) << 30)] {
            let path = d.file("\(what).pool"), sock = d.file("\(what).sock")
            #expect(try run(["cp", "--sparse=always", master, path]).status == 0)
            try Self.poke(path, record + field, value)
            let check = try run([pmemNBDBinary, "check", path])
            #expect(check.status != 0 && check.stdout.contains("does not fit size"), "\(what): check: \(check.status) \(check.stdout)")
            let server = try ServerProcess(["serve", path, "-U", sock, "--control", "none", "--feed", "none"])
            #expect(server.waitForSocket(sock), "\(what): \(server.stderrText)")
            let c = try connectWhenReady(sock) { try $0.setExportName("vol0") }
            if what == "size" {
                // The depth the size needs (3) is not the one the root was tagged with (2).
                #expect(throws: (any Error).self, "read of block 5") { _ = try c.pread(count: 4096, offset: 5 << 12) }
                let alias = try? c.pread(count: 4096, offset: 262_149 << 12)
                #expect(alias != pattern(4096, seed: 105), "block 262149 came back as block 5")
                #expect(throws: (any Error).self, "write") { try c.pwrite(pattern(4096, seed: 9), offset: 3 << 12) }
            } else {
                // The depth the size needs is the one the map has: it is read as it is, or EIO.
                let read = try? c.pread(count: 4096, offset: 5 << 12)
                #expect(read == nil || read == pattern(4096, seed: 105), "block 5 came back with other data")
                if (try? c.pwrite(pattern(4096, seed: 9), offset: 3 << 12)) != nil {
                    #expect(try c.pread(count: 4096, offset: 3 << 12) == pattern(4096, seed: 9))
                }
            }
            let b = try connectWhenReady(sock) { try $0.setExportName("b") }
            #expect(try b.pread(count: 4096, offset: 7 << 12) == pattern(4096, seed: 207), "\(what): the other volume")
            #expect(server.process.isRunning, "\(what): the server died: \(server.stderrText)")
            let status = server.stop()
            #expect(status == 0, "\(what): exit status \(status): \(server.stderrText)")
        }
    }

    // MARK: defect 8: READ and WRITE up to 64 MiB

    /// Test data for large requests: 4 KiB patterns, each block's first 8 bytes its number, so
    /// a block in the wrong place shows.
    static func bigPattern(_ count: Int, seed: UInt64) -> [UInt8] {
        let unit = pattern(4096, seed: seed)
        var out: [UInt8] = []
        out.reserveCapacity(count)
        var block: UInt64 = 0
        while out.count < count {
            var piece = unit
            withUnsafeBytes(of: (block &+ seed).littleEndian) { piece.replaceSubrange(0..<8, with: $0) }
            out += piece.prefix(count - out.count)
            block += 1
        }
        return out
    }

    /// libnbd without NBD_INFO_BLOCK_SIZE (so it did not promise to keep to 32 MiB): a 42 MB
    /// WRITE and READ at an odd offset (nbd-server's integrityhuge test) and 64 MiB ones,
    /// verified, with structured and with simple replies; the block sizes are still advertised.
    /// A client that did ask for them gets EINVAL over 32 MiB (it promised).
    @Test(.timeLimit(.minutes(3))) func readsAndWritesUpTo64MiBWithoutNegotiatedBlockSizes() throws {
        let s = try TestServer(size: 288 << 20)
        let huge = Self.bigPattern(42_000_000, seed: 1)
        let max = Self.bigPattern(64 << 20, seed: 2)
        for structured in [true, false] {
            let c = try s.client { c in
                try c.requestBlockSize(false)
                try c.requestStructuredReplies(structured)
            }
            #expect(try c.blockSize(2) == 32 << 20, "the maximum is still advertised")
            try c.pwrite(huge, offset: 12_345)
            #expect(try c.pread(count: huge.count, offset: 12_345) == huge, "42 MB, structured \(structured)")
            try c.pwrite(max, offset: 128 << 20)
            #expect(try c.pread(count: max.count, offset: 128 << 20) == max, "64 MiB, structured \(structured)")
            try c.shutdown()
        }
        let promised = try s.client()
        #expect(throws: (any Error).self, "a client that asked for the block sizes keeps to them") {
            _ = try promised.pread(count: huge.count, offset: 0)
        }
        #expect(try promised.pread(count: 32 << 20, offset: 128 << 20) == Array(max.prefix(32 << 20)))
    }

    /// The same 64 MiB through nbdsh (Python libnbd, another process), and a raw client one
    /// byte over 64 MiB: READ gets EOVERFLOW, WRITE EINVAL with its payload skipped; the stream
    /// stays in sync.
    @Test(.timeLimit(.minutes(3))) func nbdshAt64MiBAndOneByteOver() throws {
        guard haveTool("nbdsh") else { return }
        let s = try TestServer(size: 160 << 20)
        let script = """
            import os
            h.set_request_block_size(False)
            h.connect_unix('\(s.socketPath)')
            for n, off in ((42000000, 4095), (64 << 20, 0)):
                buf = os.urandom(n)
                h.pwrite(buf, off)
                assert h.pread(n, off) == buf, n
            print('ok')
            """
        let r = try run(["nbdsh", "-c", script], timeout: 120)
        #expect(r.status == 0 && r.stdout.contains("ok"), "\(r.stdout) \(r.stderr)")

        let raw = try RawClient(unix: s.socketPath)
        _ = try raw.greet()
        _ = try raw.go()
        let over = (64 << 20) + 1
        try raw.send(RawClient.request(type: 0, cookie: 1, offset: 0, length: UInt32(over)))
        #expect(try raw.reply().map { $0.cookie == 1 && $0.error == 75 } == true, "READ one byte over: EOVERFLOW")
        try raw.send(RawClient.request(type: 1, cookie: 2, offset: 0, length: UInt32(over)))
        let chunk = [UInt8](repeating: 0x5A, count: 1 << 20)
        for _ in 0..<64 { try raw.send(chunk) }
        try raw.send([0x5A])
        #expect(try raw.reply().map { $0.cookie == 2 && $0.error == 22 } == true, "WRITE one byte over: EINVAL")
        try raw.send(RawClient.request(type: 1, cookie: 3, offset: 0, length: UInt32(64 << 20)) + [UInt8](repeating: 0x11, count: 64 << 20))
        #expect(try raw.reply().map { $0.cookie == 3 && $0.error == 0 } == true, "WRITE of exactly 64 MiB")
        try raw.send(RawClient.request(type: 0, cookie: 4, offset: (64 << 20) - 4, length: 4))
        guard case .chunk(let data) = try raw.reply() else { Issue.record("no data chunk"); return }
        #expect(data.cookie == 4 && Array(data.payload.suffix(4)) == [0x11, 0x11, 0x11, 0x11], "no byte of the refused payload landed")
    }

    /// 64 MiB under TLS (records of 16 KiB, the payload read through GnuTLS into the pool) and
    /// under extended headers (raw client: GO without NBD_INFO_BLOCK_SIZE).
    @Test(.timeLimit(.minutes(3))) func sixtyFourMiBUnderTLSAndExtendedHeaders() throws {
        let pki = TestPKI.shared
        try pki.check()
        let credentials = try TLSCredentials(certificateDirectory: nil, pskFile: pki.pskFile, verifyPeer: false)
        let s = try TestServer(size: 160 << 20, tls: (.on, credentials))
        let max = Self.bigPattern(64 << 20, seed: 3)
        let c = try s.client { c in
            try c.setTLS(LibNBDTLS.require)
            try c.setTLSPSKFile(pki.pskFile)
            try c.setTLSUsername("alice")
            try c.requestBlockSize(false)
        }
        #expect(try c.tlsNegotiated)
        try c.pwrite(max, offset: 4096)
        #expect(try c.pread(count: max.count, offset: 4096) == max, "64 MiB through TLS")

        let raw = try RawClient(unix: s.socketPath)
        _ = try raw.greet()
        _ = try raw.goExtended(requestBlockSize: false)
        let other = Self.bigPattern(64 << 20, seed: 4)
        try raw.send(RawClient.extendedRequest(type: 1, flags: 0x20, cookie: 1, offset: 8192, length: UInt64(other.count)) + other)
        let written = try raw.extendedReply()
        #expect(written?.count == 1 && written?[0].type == 0, "extended WRITE of 64 MiB: \(String(describing: written?.map { $0.type }))")
        try raw.send(RawClient.extendedRequest(type: 0, cookie: 2, offset: 8192, length: UInt64(other.count)))
        var data: [UInt8] = []
        while let chunk = try raw.extendedChunk() {
            #expect(chunk.type == 1, "OFFSET_DATA")
            data += chunk.payload.dropFirst(8)
            if chunk.done { break }
        }
        #expect(data == other, "extended READ of 64 MiB")
        // One byte more, with PAYLOAD_LEN: the server hangs up (spec: SHOULD).
        try raw.send(RawClient.extendedRequest(type: 1, flags: 0x20, cookie: 3, offset: 0, length: UInt64(64 << 20) + 1) + [0, 0, 0, 0])
        #expect(try raw.extendedChunk() == nil)
    }

    // MARK: defect 6: ReplyWriter.failed read without the send lock

    /// FLUSHes in page mode are answered by workers. A client that shuts down its reading side
    /// (a Unix socket: the server's sends then fail with EPIPE) and goes on sending FLUSHes
    /// makes those replies fail on the workers while the connection's thread reads on and, after
    /// each batch (with no reply of its own queued, so without taking the send lock), checks
    /// whether sending failed. The flag was a plain variable written under the send lock and
    /// read without it: ThreadSanitizer reports the race on the old code. Others are not
    /// affected.
    @Test(.timeLimit(.minutes(2))) func repliesThatFailOnWorkersWhileTheReaderGoesOn() throws {
        let s = try TestServer()
        let bystander = try s.client()
        for _ in 0..<20 {
            let raw = try RawClient(unix: s.socketPath)
            _ = try raw.greet()
            _ = try raw.go()
            shutdown(raw.fd.rawValue, Int32(SHUT_RD))
            var cookie: UInt64 = 0
            sending: for _ in 0..<40 {
                var burst: [UInt8] = []
                for _ in 0..<4 {
                    burst += RawClient.request(type: 3, cookie: cookie, offset: 0, length: 0)
                    cookie += 1
                }
                guard (try? raw.send(burst)) != nil else { break sending }
                usleep(500)
            }
        }
        try bystander.pwrite([1, 2, 3], offset: 1 << 20)
        try bystander.flush()
        #expect(try bystander.pread(count: 3, offset: 1 << 20) == [1, 2, 3])
    }
}
