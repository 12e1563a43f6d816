import Foundation
import Glibc
import NBDServer
import PmemNBD
import PmemPool
import PmemVolumes
import PmemSystem
@testable import TestSupport
import Testing

/// Engine durability seen through the server: FLUSH on one connection covers writes completed
/// on another, checked on a traced image (moved from PmemPoolTests/EngineTests, which imports
/// neither NBDServer nor PmemNBD).
@Suite(.timeLimit(.minutes(5))) struct EngineFlushTests {
    /// Writes completed on one connection are durable once another connection's FLUSH returns:
    /// the tracer's durable image (what surely reached media) is recovered and read back.
    @Test(arguments: [Persistence.Domain.cacheline, .page])
    func flushOnAnyConnectionCoversEveryConnection(domain: Persistence.Domain) throws {
        let size: UInt64 = 24 << 20
        let image = UnsafeMutableRawPointer.allocate(byteCount: Int(size), alignment: 4096)
        defer { image.deallocate() }
        memset(image, 0, Int(size))
        _ = try PoolEngine.format(base: image, poolSize: size, volumeName: "vol", volumeSize: 8 << 20)
        let tracer = PersistenceTracer(image: UnsafeRawBufferPointer(start: image, count: Int(size)))
        let engine = try PoolEngine(media: PoolMedia(tracer: tracer, domain: domain))
        let pool = Pool(engine: engine)
        let server = Server(exports: PoolExports(pool: pool, readOnly: false))
        let scratch = ScratchDirectory()
        let sock = scratch.file("s.sock")
        try server.listen(on: [Socket.listenUnix(path: sock)])
        defer {
            server.shutdown(timeoutSeconds: 5)
            try? pool.close()
        }
        let a = try NBDClient(), b = try NBDClient()
        try a.connect(unix: sock)
        try b.connect(unix: sock)
        for i in 0..<20 { try a.pwrite(pattern(4096, seed: UInt64(50 + i)), offset: UInt64(i) * 8192 + 4096) }
        try a.pwrite(pattern(1000, seed: 77), offset: 300_000)
        try b.flush()
        // Recover what is durable now, in a separate image.
        let copy = UnsafeMutableRawPointer.allocate(byteCount: Int(size), alignment: 4096)
        defer { copy.deallocate() }
        copy.copyMemory(from: tracer.durable, byteCount: Int(size))
        let media = PoolMedia(base: copy, length: Int(size), persistence: Persistence(domain: domain, synchronousMapping: false, base: copy, length: Int(size), fd: nil))
        let recovered = try PoolEngine(media: media, commitMode: .inline)
        let v = Pool(engine: recovered).volume(named: "vol")!
        func read(_ off: UInt64, _ n: Int) throws -> [UInt8] {
            var out: [UInt8] = []
            try v.read(offset: off, length: n) { seg in
                switch seg {
                case .data(let p, let k): out += Array(UnsafeRawBufferPointer(start: p, count: k))
                case .hole(let k): out += [UInt8](repeating: 0, count: k)
                }
            }
            return out
        }
        for i in 0..<20 { #expect(try read(UInt64(i) * 8192 + 4096, 4096) == pattern(4096, seed: UInt64(50 + i))) }
        #expect(try read(300_000, 1000) == pattern(1000, seed: 77))
        #expect(try PoolCheck.run(media: media, repair: false).clean)
    }
}
