import Foundation
import Glibc
import NBDServer
import NBDWire
import PmemSystem
@testable import TestSupport
import Testing

/// A `BlockVolume` in process memory: the NBD server driven with storage that is not a pool
/// (issue 17: NBDServer knows nothing of pools). Blocks never written read as holes; the
/// last `spaceLeft` says how many more blocks may be written before ENOSPC.
final class RAMVolume: BlockVolume, @unchecked Sendable {
    let volumeID: UInt64 = 7
    let name = "ram"
    let size: UInt64
    let readOnly = false
    let flushIsCheap = true
    private let memory: UnsafeMutableRawPointer
    private let lock = PosixMutex()
    private var written = Set<UInt64>()
    var spaceLeft = Int.max
    private(set) var flushes = 0

    init(size: UInt64) {
        self.size = size
        memory = .allocate(byteCount: Int(size), alignment: 4096)
        memory.initializeMemory(as: UInt8.self, repeating: 0, count: Int(size))
    }

    deinit { memory.deallocate() }

    func read(offset: UInt64, length: Int, _ body: (Segment) -> Void) throws(StorageError) {
        var pos = offset
        let end = offset + UInt64(length)
        while pos < end {
            let blockEnd = min(end, (pos | 4095) + 1)
            let n = Int(blockEnd - pos)
            if lock.withLock({ written.contains(pos >> 12) }) { body(.data(memory + Int(pos), n)) } else { body(.hole(n)) }
            pos = blockEnd
        }
    }

    func write(offset: UInt64, length: Int, fua: Bool, from source: inout some ByteSource) throws(StorageError) {
        let blocks = Set((offset >> 12)...((offset + UInt64(length) - 1) >> 12))
        let new = lock.withLock { blocks.subtracting(written).count }
        guard new <= spaceLeft else { throw StorageError(.noSpace, "the RAM volume is full") }
        do { try source.fill(UnsafeMutableRawBufferPointer(start: memory + Int(offset), count: length), nonTemporal: false) } catch {
            throw StorageError(.io, "\(error)", sourceFailed: true)
        }
        lock.withLock {
            written.formUnion(blocks)
            spaceLeft -= new
        }
    }

    func writeZeroes(offset: UInt64, length: UInt64, mayTrim: Bool, fast: Bool, fua: Bool) throws(StorageError) {
        if fast && !mayTrim { throw StorageError(.notSupported, "not faster than writing") }
        (memory + Int(offset)).initializeMemory(as: UInt8.self, repeating: 0, count: Int(length))
    }

    func trim(offset: UInt64, length: UInt64, fua: Bool) throws(StorageError) {
        try writeZeroes(offset: offset, length: length, mayTrim: true, fast: false, fua: fua)
    }

    func flush() throws(StorageError) { lock.withLock { flushes += 1 } }

    func cache(offset: UInt64, length: UInt64) throws(StorageError) {}

    func status(context: String, offset: UInt64, length: UInt64, _ body: (UInt64, UInt32) -> Bool) throws(StorageError) {
        guard context == "base:allocation" else { throw StorageError(.invalid, "unknown context \(context)") }
        var pos = offset
        while pos < offset + length {
            let n = min(offset + length, (pos | 4095) + 1) - pos
            let hole = !lock.withLock { written.contains(pos >> 12) }
            guard body(n, hole ? ExtentStatus([.hole, .zero]).rawValue : 0) else { return }
            pos += n
        }
    }
}

/// One export, `ram`, of a `RAMVolume`.
final class RAMExports: ExportSource, @unchecked Sendable {
    let volume: RAMVolume
    init(_ volume: RAMVolume) { self.volume = volume }
    var descriptor: ExportDescriptor {
        ExportDescriptor(name: "ram", description: "memory", size: volume.size,
                         flags: [.hasFlags, .sendFlush, .sendFUA, .sendTrim, .sendWriteZeroes, .sendFastZero, .sendCache])
    }
    func lookup(_ name: String) -> ExportDescriptor? { name.isEmpty || name == "ram" ? descriptor : nil }
    func list() -> [ExportDescriptor] { [descriptor] }
    func volume(for export: ExportDescriptor) -> (any BlockVolume)? { export.name == "ram" ? volume : nil }
}

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
