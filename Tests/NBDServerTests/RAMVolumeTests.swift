import Foundation
import Glibc
import NBDServer
import NBDWire
import PmemSystem
@testable import TestSupport
import Testing

@Suite(.timeLimit(.minutes(3))) struct RAMVolumeTests {
    @Test func theServerServesAnyBlockVolume() throws {
        let scratch = ScratchDirectory()
        let ram = RAMVolume(size: 1 << 20)
        let server = Server(exports: RAMExports(ram))
        defer { server.shutdown(timeoutSeconds: 10) }
        try server.listen(on: [Socket.listenUnix(path: scratch.file("s.sock"))])
        let c = try NBDClient()
        try c.addMetaContext("base:allocation")
        try c.connect(unix: scratch.file("s.sock"))

        let data = pattern(10_000, seed: 17)
        try c.pwrite(data, offset: 5000)
        #expect(try c.pread(count: 10_000, offset: 5000) == data)
        #expect(try c.pread(count: 4096, offset: 65_536) == [UInt8](repeating: 0, count: 4096))
        // Holes come back as holes (structured replies), and as status.
        let chunks = try c.preadChunks(count: 8192, offset: 0).chunks.sorted { $0.0 < $1.0 }
        #expect(chunks.map(\.2) == [true, false], "a hole, then data")
        let status = try c.blockStatus(count: 16_384, offset: 16_384)["base:allocation"] ?? []
        #expect(status.first?.1 == 3, "hole|zero after the data")
        try c.flush()
        #expect(ram.flushes == 1)
        // The storage's errors are the replies: ENOTSUP for a FAST_ZERO that is not fast, and
        // ENOSPC when it is full; the connection carries on after each.
        do {
            try c.zero(count: 4096, offset: 0, flags: LibNBDFlags.fastZero | LibNBDFlags.noHole)
            Issue.record("FAST_ZERO with NO_HOLE should fail")
        } catch let e as LibNBDError { #expect(e.errno == ENOTSUP) }
        ram.spaceLeft = 0
        do {
            try c.pwrite(pattern(4096, seed: 18), offset: 512 << 10)
            Issue.record("a write into a full volume should fail")
        } catch let e as LibNBDError { #expect(e.errno == ENOSPC) }
        #expect(try c.pread(count: 10_000, offset: 5000) == data)
        try c.shutdown()
    }
}
