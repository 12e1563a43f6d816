import Foundation
import Glibc
import PmemPool
import PmemVolumes
import PmemSystem
@testable import TestSupport
import Testing

/// Engine properties measured directly: open and recovery cost independent of pool size,
/// write amplification (multi-connection FLUSH durability, which needs the server, is
/// IntegrationTests/EngineFlushTests).
@Suite(.timeLimit(.minutes(5))) struct EngineTests {
    /// Opening (with recovery of the same in-flight batch) costs the same for a 1 GiB and a
    /// 64 GiB sparse pool, within 2×.
    @Test func openCostDoesNotGrowWithPoolSize() throws {
        let d = ScratchDirectory()
        func prepare(_ name: String, _ size: UInt64) throws -> (String, UInt64, [UInt8]) {
            let path = d.file(name)
            try PoolEngine.create(path: path, size: size, volumeName: "vol", volumeSize: 512 << 20)
            // Leave a committed batch of 2000 writes behind, as a crash would.
            let pool = try Pool.open(path: path, persistence: .page, commitMode: .inline)
            let engine = pool.engine
            let v = pool.volume(named: "vol")!
            let block = [UInt8](repeating: 7, count: 4096)
            for i in 0..<2000 {
                try block.withUnsafeBytes { (bytes) throws in
                    var src = BufferByteSource(bytes)
                    try v.write(offset: UInt64(i * 37 % 100_000) << 12, length: 4096, fua: false, from: &src)
                }
            }
            try engine.sync()
            // The whole journal area: its header and the ring of batches since the last checkpoint.
            let journal = try FileDescriptor.open(path, O_RDONLY).read(at: Int(engine.layout.journalOffset), count: Int(engine.layout.journalSize))
            // Drop the pool without closing it, as a crash would (the ring keeps the batches).
            engine.media.file?.fd.unlock()
            return (path, engine.layout.journalOffset, journal)
        }
        let small = try prepare("small.pool", 1 << 30)
        let large = try prepare("large.pool", 64 << 30)
        func timeOpen(_ p: (String, UInt64, [UInt8])) throws -> Double {
            var samples: [Double] = []
            for _ in 0..<7 {
                try patch(p.0, at: Int(p.1), p.2)
                let t0 = Date()
                let e = try PoolEngine.open(path: p.0, persistence: .page, commitMode: .inline)
                samples.append(Date().timeIntervalSince(t0))
                #expect(e.recoveredWords > 0)
                try e.close()
            }
            return samples.sorted()[samples.count / 2]
        }
        let ts = try timeOpen(small), tl = try timeOpen(large)
        print(String(format: "open + recovery: 1 GiB pool %.2f ms, 64 GiB pool %.2f ms, ratio %.2f", ts * 1e3, tl * 1e3, tl / ts))
        #expect(tl <= 2 * ts + 0.002, "64 GiB open \(tl) s vs 1 GiB \(ts) s")
    }

    /// Bytes made durable per 4 KiB random write, with a FLUSH every 64 writes: the data, the
    /// journal, and the map and refcount pages the checkpoints write (the ring fills about
    /// once in this run; a last checkpoint counts what the ring still held).
    @Test(arguments: [Persistence.Domain.cacheline, .page])
    func writeAmplification(domain: Persistence.Domain) throws {
        let size: UInt64 = 48 << 20
        let image = UnsafeMutableRawPointer.allocate(byteCount: Int(size), alignment: 4096)
        defer { image.deallocate() }
        memset(image, 0, Int(size))
        _ = try PoolEngine.format(base: image, poolSize: size, volumeName: "vol", volumeSize: 32 << 20)
        let tracer = PersistenceTracer(image: UnsafeRawBufferPointer(start: image, count: Int(size)))
        let engine = try PoolEngine(media: PoolMedia(tracer: tracer, domain: domain, pageWrites: .pwrite), commitMode: .inline)
        let v = Pool(engine: engine).volume(named: "vol")!
        var rng = SplitMix64(seed: 9)
        // Every write has its own contents, so that a reused block is really written again.
        func write(_ vblock: UInt64, _ n: Int) throws {
            try pattern(4096, seed: UInt64(n)).withUnsafeBytes { (bytes) throws in
                var src = BufferByteSource(bytes)
                try v.write(offset: vblock << 12, length: 4096, fua: false, from: &src)
            }
        }
        // Warm up: map every block once, so the measured writes are overwrites.
        for b in 0..<8192 {
            try write(UInt64(b), b)
            if b % 512 == 511 { try v.flush() }
        }
        try v.flush()
        try engine.checkpoint()
        let before = tracer.durableBytes
        let writes = 4096
        for i in 0..<writes {
            try write(rng.next() % 8192, 10_000 + i)
            if i % 64 == 63 { try v.flush() }
        }
        try engine.checkpoint()
        let amplification = Double(tracer.durableBytes - before) / Double(writes * 4096)
        print(String(format: "write amplification (%@, flush every 64 writes): %.2f bytes made durable per byte written, %d checkpoints",
                     domain.rawValue, amplification, engine.checkpoints))
        #expect(amplification >= 1.0)
        #expect(amplification <= (domain == .cacheline ? 1.3 : 2.5))
    }
}
