import Foundation
import Glibc
import PmemSystem
@testable import TestSupport
import Testing

/// Extended headers over a pool's volume: what the pool reports as allocated after writes,
/// trims and zeroes, 64-bit TRIM/WRITE_ZEROES/BLOCK_STATUS lengths on a large sparse pool
/// volume, and hostile extended clients (a WRITE whose payload never arrives fails inside the
/// pool's write) beside a client writing the same blocks. (The rest of the extended-header tests are in NBDServerTests.ExtendedHeadersTests,
/// against a RAM volume.)
@Suite(.timeLimit(.minutes(5))) struct PoolExtendedHeadersTests: ExtendedHeaderChecks {
    typealias Chunk = RawClient.ExtendedChunk

    /// A raw client in transmission with extended headers.
    func connect(_ s: TestServer, contexts: [String] = ["base:allocation"], structuredFirst: Bool = false) throws -> (RawClient, RawClient.ExtendedSession) {
        try connect(s.socketPath, contexts: contexts, structuredFirst: structuredFirst)
    }

    @Test func blockStatusExtOnWrittenAndTrimmedRegions() throws {
        let s = try TestServer()
        let (raw, session) = try connect(s)
        let id = try #require(session.contexts["base:allocation"])
        let k: UInt64 = 1024
        for (at, n) in [(0, 64), (128, 128), (512, 64)] as [(UInt64, UInt64)] {
            expectSuccess(try roundTrip(raw, Cmd.write, flags: Flag.payloadLen, cookie: 1, offset: at * k, length: n * k,
                                        payload: pattern(Int(n * k), seed: at)), "WRITE at \(at) KiB")
        }
        expectSuccess(try roundTrip(raw, Cmd.trim, cookie: 2, offset: 160 * k, length: 64 * k), "TRIM")
        let chunks = try roundTrip(raw, Cmd.blockStatus, cookie: 3, offset: 0, length: 1 << 20)
        #expect(chunks.count == 1 && chunks[0].done)
        let (context, list) = extents(chunks[0])
        #expect(context == id)
        let expected: [(UInt64, UInt64)] = [(64, 0), (64, 3), (32, 0), (64, 3), (32, 0), (256, 3), (64, 0), (448, 3)].map { ($0.0 * k, $0.1) }
        #expect(list.map { "\($0.0 / k)K:\($0.1)" } == expected.map { "\($0.0 / k)K:\($0.1)" })
        // REQ_ONE: one descriptor, no longer than asked.
        let one = try roundTrip(raw, Cmd.blockStatus, flags: Flag.reqOne, cookie: 4, offset: 256 * k, length: 100 * k)
        #expect(extents(one[0]).1.map { "\($0.0 / k)K:\($0.1)" } == ["100K:3"])
        // libnbd (compact headers, 32-bit BLOCK_STATUS) sees the same map.
        let c = try s.client { try $0.addMetaContext("base:allocation") }
        let compact = try c.blockStatus(count: 1 << 20, offset: 0)["base:allocation"] ?? []
        #expect(compact.map { "\(UInt64($0.0) / k)K:\($0.1)" } == expected.map { "\($0.0 / k)K:\($0.1)" })
    }

    /// 64-bit effect lengths on a 24 GiB sparse volume: TRIM and WRITE_ZEROES over more than
    /// 4 GiB, block status over a range longer than 32 bits can say, reads over the maximum.
    @Test func sixtyFourBitLengthsOnALargeSparseVolume() throws {
        let gib: UInt64 = 1 << 30
        let s = try TestServer(size: 96 << 20, volumeSize: 24 * gib)
        let (raw, session) = try connect(s)
        #expect(session.size == 24 * gib)
        let spots: [UInt64] = [1 << 20, 5 * gib, 9 * gib + 4096, 10 * gib, 13 * gib, 16 * gib + 8192, 17 * gib]
        for (i, at) in spots.enumerated() {
            expectSuccess(try roundTrip(raw, Cmd.write, flags: Flag.payloadLen, cookie: UInt64(i), offset: at, length: 65536,
                                        payload: pattern(65536, seed: at)), "WRITE at \(at)")
        }
        // TRIM [4 GiB, 10 GiB): 6 GiB, a length compact headers cannot carry.
        expectSuccess(try roundTrip(raw, Cmd.trim, cookie: 20, offset: 4 * gib, length: 6 * gib), "6 GiB TRIM")
        // WRITE_ZEROES [12 GiB, 17 GiB): 5 GiB.
        expectSuccess(try roundTrip(raw, Cmd.writeZeroes, cookie: 21, offset: 12 * gib, length: 5 * gib), "5 GiB WRITE_ZEROES")
        expectSuccess(try roundTrip(raw, Cmd.cache, cookie: 22, offset: 0, length: 24 * gib), "24 GiB CACHE")
        let zero = [UInt8](repeating: 0, count: 65536)
        let c = try s.client()
        for at in spots {
            let survives = at < 4 * gib || (at >= 10 * gib && at < 12 * gib) || at >= 17 * gib
            let want = survives ? pattern(65536, seed: at) : zero
            #expect(try read(raw, cookie: 30, offset: at, count: 65536).data == want, "extended read at \(at)")
            #expect(try c.pread(count: 65536, offset: at) == want, "libnbd read at \(at)")
        }
        // Block status over [0, 20 GiB): single descriptors longer than 4 GiB.
        let chunks = try roundTrip(raw, Cmd.blockStatus, cookie: 40, offset: 0, length: 20 * gib)
        let list = extents(chunks[0]).1
        let m: UInt64 = 1 << 20
        let expected: [(UInt64, UInt64)] = [
            (m, 3), (65536, 0), (10 * gib - m - 65536, 3), (65536, 0), (7 * gib - 65536, 3), (65536, 0), (3 * gib - 65536, 3),
        ]
        #expect(list.map { "\($0.0):\($0.1)" } == expected.map { "\($0.0):\($0.1)" })
        #expect(list.contains { $0.0 > UInt64(UInt32.max) }, "a descriptor only a 64-bit length can carry")
        let one = try roundTrip(raw, Cmd.blockStatus, flags: Flag.reqOne, cookie: 41, offset: m + 65536, length: 8 * gib)
        #expect(extents(one[0]).1.map { "\($0.0):\($0.1)" } == ["\(8 * gib):3"], "REQ_ONE clipped to a 64-bit request length")
        // A read over the maximum payload (and over 32 bits): EOVERFLOW, nothing else.
        expectError(try roundTrip(raw, Cmd.read, cookie: 50, offset: 0, length: 5 * gib), Self.EOVERFLOW, "5 GiB READ")
        expectError(try roundTrip(raw, Cmd.trim, cookie: 51, offset: 20 * gib, length: 5 * gib), Self.EINVAL, "TRIM past the end")
        expectError(try roundTrip(raw, Cmd.writeZeroes, cookie: 52, offset: 20 * gib, length: 5 * gib), Self.ENOSPC, "ZERO past the end")
        expectError(try roundTrip(raw, Cmd.blockStatus, cookie: 53, offset: 20 * gib, length: 5 * gib), Self.EINVAL, "STATUS past the end")
    }

    /// A libnbd client keeps writing and reading while extended-header clients misbehave on
    /// other connections: it sees no error and no wrong byte.
    @Test func misbehavingExtendedClientsDoNotDisturbAConcurrentClient() throws {
        let s = try TestServer()
        // Used by the writer thread only, until it signals `done`.
        nonisolated(unsafe) let bystander = try s.client()
        let failures = Locked(0)
        let rounds = Locked(0)
        let stop = Locked(false)
        let done = DispatchSemaphore(value: 0)
        Thread {
            defer { done.signal() }
            var i: UInt64 = 0
            while !stop.withLock({ $0 }) || i < 20 {
                let data = pattern(16 << 10, seed: i)
                let at = (i % 64) << 16
                do {
                    try bystander.pwrite(data, offset: at)
                    if try bystander.pread(count: data.count, offset: at) != data { failures.withLock { $0 += 1 } }
                } catch {
                    failures.withLock { $0 += 1 }
                }
                i += 1
                rounds.withLock { $0 += 1 }
            }
        }.start()
        for round in 0..<5 {
            // Over-maximum payload: hung up on.
            let (a, _) = try connect(s)
            try a.send(RawClient.extendedRequest(type: Cmd.write, flags: Flag.payloadLen, cookie: 1, offset: 0, length: 1 << 40))
            #expect(try a.extendedChunk() == nil)
            // A compact header after extended headers: hung up on.
            let (b, _) = try connect(s)
            try b.send(RawClient.request(type: Cmd.write, cookie: 2, offset: 0, length: 4) + [1, 2, 3, 4])
            #expect(try b.extendedChunk() == nil)
            // A payload that never arrives, then the client goes away.
            let (c, _) = try connect(s)
            try c.send(RawClient.extendedRequest(type: Cmd.write, flags: Flag.payloadLen, cookie: 3, offset: 0, length: 1 << 20) + [9, 9])
            Socket_shutdownWrite(c)
            #expect(c.isClosedByServer())
            // Requests with errors and huge effect lengths, then garbage.
            let (d, _) = try connect(s)
            expectError(try roundTrip(d, Cmd.trim, cookie: 4, offset: 0, length: UInt64.max - UInt64(round)), Self.EINVAL, "huge TRIM")
            try d.send([UInt8](repeating: 0xFF, count: 64))
            #expect(try d.extendedChunk() == nil)
        }
        stop.withLock { $0 = true }
        done.wait()
        #expect(failures.withLock { $0 } == 0)
        #expect(rounds.withLock { $0 } >= 20)
    }
}
