import CLibNBD
import Foundation
@testable import TestSupport
import Testing

/// Commands whose answers show the pool's allocation, through libnbd: never-written ranges are
/// holes, TRIM and WRITE_ZEROES punch them (NO_HOLE keeps the range allocated), FAST_ZERO, block
/// status over the whole volume. (The other commands are in NBDServerTests.CommandTests.)
@Suite(.timeLimit(.minutes(5))) struct PoolCommandTests {
    @Test func neverWrittenRangesAreHoles() throws {
        let s = try TestServer()
        let c = try s.client()
        let empty = try c.preadChunks(count: 65_536, offset: 0)
        #expect(empty.data == [UInt8](repeating: 0, count: 65_536))
        #expect(empty.chunks.count == 1 && empty.chunks[0].2, "one hole chunk")
        try c.pwrite(pattern(4096, seed: 3), offset: 8192)
        let mixed = try c.preadChunks(count: 16_384, offset: 0)
        let shape = mixed.chunks.sorted { $0.0 < $1.0 }.map { "\($0.0)+\($0.1)\($0.2 ? "h" : "d")" }
        #expect(shape == ["0+8192h", "8192+4096d", "12288+4096h"])
        #expect(Array(mixed.data[8192..<12288]) == pattern(4096, seed: 3))
        // DF: one data chunk with the zeroes present.
        let df = try c.preadChunks(count: 16_384, offset: 0, flags: LibNBDFlags.df)
        #expect(df.chunks.count == 1 && !df.chunks[0].2)
        #expect(df.data == mixed.data)
    }

    @Test func trimMakesHoles() throws {
        let s = try TestServer()
        let c = try s.client { try $0.addMetaContext("base:allocation") }
        try c.pwrite(pattern(65_536, seed: 5), offset: 0)
        try c.trim(count: 32_768, offset: 16_384)
        #expect(try c.pread(count: 32_768, offset: 16_384) == [UInt8](repeating: 0, count: 32_768))
        #expect(try c.pread(count: 16_384, offset: 0) == Array(pattern(65_536, seed: 5)[0..<16_384]))
        let status = try c.blockStatus(count: 65_536, offset: 0)["base:allocation"] ?? []
        #expect(status.map { "\($0.0):\($0.1)" } == ["16384:0", "32768:3", "16384:0"])
    }

    @Test func writeZeroesWithAndWithoutHoles() throws {
        let s = try TestServer()
        let c = try s.client { try $0.addMetaContext("base:allocation") }
        try c.pwrite(pattern(32_768, seed: 6), offset: 0)
        try c.zero(count: 8192, offset: 0, flags: LibNBDFlags.noHole)
        try c.zero(count: 8192, offset: 8192)
        try c.zero(count: 100, offset: 20_000)
        var expected = pattern(32_768, seed: 6)
        for i in 0..<16_384 { expected[i] = 0 }
        for i in 20_000..<20_100 { expected[i] = 0 }
        #expect(try c.pread(count: 32_768, offset: 0) == expected)
        let status = try c.blockStatus(count: 32_768, offset: 0)["base:allocation"] ?? []
        #expect(status.first.map { $0.0 == 8192 && $0.1 == 0 } == true, "NO_HOLE keeps the range allocated")
        #expect(status.count > 1 && status[1].0 == 8192 && status[1].1 == 3, "plain WRITE_ZEROES punches a hole")
        // FAST_ZERO: punching is fast; provisioning zeroes is not.
        try c.zero(count: 4096, offset: 0, flags: LibNBDFlags.fastZero)
        do {
            try c.zero(count: 4096, offset: 0, flags: LibNBDFlags.fastZero | LibNBDFlags.noHole)
            Issue.record("fast zero with NO_HOLE should fail with ENOTSUP")
        } catch let e as LibNBDError {
            #expect(e.errno == ENOTSUP)
        }
    }

    @Test func blockStatusRequestOneAndLongRanges() throws {
        let s = try TestServer()
        let c = try s.client { try $0.addMetaContext("base:allocation") }
        try c.pwrite(pattern(4096, seed: 7), offset: 1 << 20)
        let one = try c.blockStatus(count: 8192, offset: 0, flags: LibNBDFlags.reqOne)["base:allocation"] ?? []
        #expect(one.count == 1 && one[0].0 <= 8192 && one[0].1 == 3)
        let all = try c.blockStatus(count: s.volume.size, offset: 0)["base:allocation"] ?? []
        #expect(all.map { "\($0.0):\($0.1)" } == ["1048576:3", "4096:0", "\(s.volume.size - (1 << 20) - 4096):3"])
    }
}
