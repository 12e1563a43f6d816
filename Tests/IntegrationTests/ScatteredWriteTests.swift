import Foundation
import Glibc
import PmemSystem
@testable import TestSupport
import Testing

/// Large writes into a pool whose free space random 4K writes have scattered: each 1 MiB payload
/// lands in blocks that do not follow each other, read with `readv` straight into them
/// (`Volume.fillScattered`, `ReceiveBuffer.move(scatter:)`). Through libnbd against the server
/// process, pool on tmpfs (written through the mapping), page and cache-line mode.
@Suite(.timeLimit(.minutes(3))) struct ScatteredWriteTests {
    @Test(arguments: ["page", "cacheline"])
    func largeWritesIntoScatteredFreeSpaceReadBack(persistence: String) throws {
        guard FileManager.default.fileExists(atPath: "/dev/shm") else { return }
        let scratch = ScratchDirectory()
        let pool = "/dev/shm/pmem-nbd-scatter-\(getpid())-\(persistence).pool"
        defer { unlink(pool) }
        let sock = scratch.file("s.sock")
        let server = try ServerProcess(["serve", pool, "--create", "32M", "-U", sock, "--persistence", persistence])
        defer { _ = server.stop() }
        #expect(server.waitForSocket(sock))
        let h = try connectWhenReady(sock)
        let size = 32 << 20
        var model = [UInt8](repeating: 0, count: size)
        var rng = SplitMix64(seed: persistence.count == 4 ? 1 : 2)
        func write(_ data: [UInt8], at offset: Int) throws {
            try h.pwrite(data, offset: UInt64(offset))
            model.replaceSubrange(offset..<(offset + data.count), with: data)
        }
        // Fill, then scatter the free space: random 4K overwrites, committed so that the blocks
        // they freed are handed out again.
        for off in stride(from: 0, to: size, by: 1 << 20) { try write(pattern(1 << 20, seed: rng.next()), at: off) }
        for _ in 0..<3000 { try write(pattern(4096, seed: rng.next()), at: Int(rng.next() % UInt64(size / 4096)) * 4096) }
        try h.flush()
        let before = model
        // 1 MiB writes, block-aligned and not (partial first and last blocks), with a flush now
        // and then so that freed blocks keep coming back scattered.
        for i in 0..<40 {
            let misalign = i % 3 == 0 ? Int(rng.next() % 4096) : 0
            let off = min(Int(rng.next() % UInt64(size - (1 << 20))) / 4096 * 4096 + misalign, size - (1 << 20))
            try write(pattern(1 << 20, seed: rng.next()), at: off)
            if i % 8 == 7 { try h.flush() }
        }
        var wrong: [Int] = []
        for off in stride(from: 0, to: size, by: 1 << 20) {
            let got = try h.pread(count: 1 << 20, offset: UInt64(off))
            for b in 0..<256 where !got[(b * 4096)..<((b + 1) * 4096)].elementsEqual(model[(off + b * 4096)..<(off + (b + 1) * 4096)]) {
                wrong.append(off / 4096 + b)
            }
        }
        #expect(wrong.isEmpty, "\(wrong.count) blocks read back differ from what was written, first \(wrong.prefix(8))")
        // Negative control: the large writes changed what the blocks held (a server that dropped
        // their payloads would read back as `before` and fail the comparison above).
        var changed = 0
        for b in 0..<(size / 4096) where !before[(b * 4096)..<((b + 1) * 4096)].elementsEqual(model[(b * 4096)..<((b + 1) * 4096)]) { changed += 1 }
        #expect(changed > 2000, "only \(changed) blocks were changed by the large writes")
    }
}
