import CLibNBD
import Foundation
@testable import TestSupport
import Testing

/// Every command and flag, through libnbd, against a RAM volume. (What a pool reports as
/// holes after reads, trims and zeroes is IntegrationTests.PoolCommandTests.)
@Suite(.timeLimit(.minutes(5))) struct CommandTests {
    @Test(arguments: [(0, 1), (1, 1), (4095, 2), (4096, 4096), (100, 20_000), (8191, 65_537), (1 << 20, 1 << 20)])
    func readWriteRoundTrip(offset: Int, count: Int) throws {
        let s = try RAMServer()
        let c = try s.client()
        let data = pattern(count, seed: UInt64(offset * 31 + count))
        try c.pwrite(data, offset: UInt64(offset))
        #expect(try c.pread(count: count, offset: UInt64(offset)) == data)
        // Neighbouring bytes are untouched (zero).
        if offset > 0 { #expect(try c.pread(count: 1, offset: UInt64(offset - 1)) == [0]) }
        #expect(try c.pread(count: 1, offset: UInt64(offset + count)) == [0])
    }

    @Test func fuaWritesAndFlush() throws {
        let s = try RAMServer()
        let c = try s.client()
        try c.pwrite(pattern(8192, seed: 4), offset: 4096, flags: LibNBDFlags.fua)
        try c.flush()
        try c.zero(count: 4096, offset: 0, flags: LibNBDFlags.fua)
        try c.trim(count: 4096, offset: 20_480, flags: LibNBDFlags.fua)
        #expect(try c.pread(count: 8192, offset: 4096) == pattern(8192, seed: 4))
    }

    @Test func cacheIsAccepted() throws {
        let s = try RAMServer()
        let c = try s.client()
        try c.cache(count: 1 << 20, offset: 0)
    }

    @Test func errorsAnsweredPerSpec() throws {
        let s = try RAMServer()
        let c = try s.client {
            try $0.setStrictMode(0)
            try $0.addMetaContext("base:allocation")
        }
        let size = s.volume.size
        func errno(_ body: () throws -> Void) -> Int32? {
            do { try body(); return nil } catch let e as LibNBDError { return e.errno } catch { return -1 }
        }
        #expect(errno { _ = try c.pread(count: 4096, offset: size - 100) } == EINVAL)
        #expect(errno { try c.pwrite([1, 2], offset: size - 1) } == ENOSPC)
        #expect(errno { try c.trim(count: 4096, offset: size) } == EINVAL)
        #expect(errno { try c.zero(count: 8192, offset: size - 4096) } == ENOSPC)
        #expect(errno { _ = try c.blockStatus(count: 4096, offset: size) } == EINVAL)
        #expect(errno { _ = try c.pread(count: 16, offset: 0, flags: LibNBDFlags.noHole) } == EINVAL)
        #expect(errno { try c.cache(count: 4096, offset: size) } == EINVAL)
        // The connection is still good.
        try c.pwrite([9], offset: 0)
        #expect(try c.pread(count: 1, offset: 0) == [9])
    }

    @Test func blockStatusWithoutContextIsRejected() throws {
        let s = try RAMServer()
        let c = try s.client { try $0.setStrictMode(0) }
        do {
            _ = try c.blockStatus(count: 4096, offset: 0)
            Issue.record("BLOCK_STATUS without a negotiated context succeeded")
        } catch let e as LibNBDError {
            #expect(e.errno != 0)
        }
        #expect(try c.pread(count: 1, offset: 0) == [0])
    }

    @Test func multiConnWritesAreSharedAndFlushedFromAnyConnection() throws {
        let s = try RAMServer()
        let a = try s.client()
        let b = try s.client()
        #expect(try a.canMultiConn)
        try a.pwrite(pattern(8192, seed: 8), offset: 0)
        // B sees A's completed write at once, and B's flush covers it.
        #expect(try b.pread(count: 8192, offset: 0) == pattern(8192, seed: 8))
        try b.flush()
    }
}
