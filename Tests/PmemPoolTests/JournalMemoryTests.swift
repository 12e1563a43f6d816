import Glibc
@testable import PmemPool
import PmemSystem
import PmemVolumes
@testable import TestSupport
import Testing

/// The journal's pending overlay stays bounded over many commit and checkpoint cycles: a word
/// table grown for a large batch is released once that batch is committed. (Format 4 kept every
/// table at the largest batch it had held, and a server's memory crept up for as long as it
/// ran: Docs/RELIABILITY.md, "Load and soak"; scripts/soak checks the whole server.)
@Suite(.timeLimit(.minutes(3))) struct JournalMemoryTests {
    @Test(arguments: [Persistence.Domain.cacheline, .page])
    func overlayTablesShrinkAfterLargeBatches(domain: Persistence.Domain) throws {
        let size: UInt64 = 64 << 20
        let image = UnsafeMutableRawPointer.allocate(byteCount: Int(size), alignment: 4096)
        defer { image.deallocate() }
        memset(image, 0, Int(size))
        _ = try PoolEngine.format(base: image, poolSize: size, volumeName: "vol", volumeSize: 16 << 20)
        let media = PoolMedia(base: image, length: Int(size),
                              persistence: Persistence(domain: domain, synchronousMapping: false, base: image, length: Int(size), fd: nil))
        let engine = try PoolEngine(media: media, commitMode: .inline)
        let pool = Pool(engine: engine)
        defer { try? pool.close() }
        let v = pool.volume(named: "vol")!
        let retained = Journal.retainedTableSlots
        let chunk = 512 << 10
        let payload = pattern(chunk, seed: 3)
        var largestSeen = 0
        for cycle in 0..<12 {
            // A large batch: the whole volume rewritten (4,096 map entries in 8 leaf nodes and
            // the refcounts of 8,192 blocks, a few pages each in one shard).
            for off in stride(from: 0, to: 16 << 20, by: chunk) {
                try payload.withUnsafeBytes { (bytes) throws in
                    var src = BufferByteSource(bytes)
                    try v.write(offset: UInt64(off), length: chunk, fua: false, from: &src)
                }
            }
            largestSeen = max(largestSeen, engine.overlaySlots.largest)
            try v.flush()
            let after = engine.overlaySlots
            #expect(after.largest <= retained, "cycle \(cycle): a table of \(after.largest) slots kept after its batch was committed")
            #expect(after.total <= 2 * 64 * retained, "cycle \(cycle): \(after.total) slots kept")
            // Small batches in between, and a checkpoint now and then.
            for i in 0..<8 {
                try pattern(4096, seed: UInt64(cycle * 8 + i)).withUnsafeBytes { (bytes) throws in
                    var src = BufferByteSource(bytes)
                    try v.write(offset: UInt64(i) * 4096 * 97, length: 4096, fua: false, from: &src)
                }
                try v.flush()
            }
            if cycle % 4 == 3 { try engine.checkpoint() }
        }
        // The batches were large enough to grow tables past what is kept (else this proves nothing).
        #expect(largestSeen > retained, "the largest table held \(largestSeen) slots: the batches never grew one past \(retained)")
        let end = engine.overlaySlots
        #expect(end.largest <= retained && end.total <= 2 * 64 * retained)
    }
}
