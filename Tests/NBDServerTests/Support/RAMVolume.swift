import Foundation
import Glibc
import NBDServer
import NBDWire
import PmemSystem
@testable import TestSupport

/// A `BlockVolume` in process memory: the NBD server driven with storage that is not a pool
/// (issue 17: NBDServer knows nothing of pools). Sparse: a 4 KiB block takes memory when it is
/// first written, so a volume may be far larger than memory. Blocks never written, trimmed or
/// zeroed whole without NO_HOLE read as holes; zeroing with NO_HOLE keeps them allocated. The
/// last `spaceLeft` says how many more blocks may be allocated before ENOSPC. A block's memory
/// stays until the volume goes (a read in flight may still point at it); a hole is only marked.
final class RAMVolume: BlockVolume, @unchecked Sendable {
    let volumeID: UInt64 = 7
    let name: String
    let size: UInt64
    let readOnly: Bool
    let flushIsCheap = true
    private let lock = PosixMutex()
    /// Every block that has memory, allocated or not.
    private var memory: [UInt64: UnsafeMutableRawPointer] = [:]
    /// The allocated blocks (the rest read as holes).
    private var written = Set<UInt64>()
    var spaceLeft = Int.max
    private(set) var flushes = 0

    init(size: UInt64, name: String = "ram", readOnly: Bool = false) {
        self.size = size
        self.name = name
        self.readOnly = readOnly
    }

    deinit { for p in memory.values { p.deallocate() } }

    /// Gives `n` blocks back to `spaceLeft` (which stays at most `Int.max`). Lock held.
    private func release(_ n: Int) { spaceLeft = spaceLeft > Int.max - n ? Int.max : spaceLeft + n }

    /// The memory of `block`, allocated (zeroed) on first use. Called with the lock held.
    private func block(_ block: UInt64) -> UnsafeMutableRawPointer {
        if let p = memory[block] { return p }
        let p = UnsafeMutableRawPointer.allocate(byteCount: 4096, alignment: 4096)
        p.initializeMemory(as: UInt8.self, repeating: 0, count: 4096)
        memory[block] = p
        return p
    }

    func read(offset: UInt64, length: Int, _ body: (Segment) -> Void) throws(StorageError) {
        var pos = offset
        let end = offset + UInt64(length)
        while pos < end {
            let blockEnd = min(end, (pos | 4095) + 1)
            let n = Int(blockEnd - pos)
            let p: UnsafeMutableRawPointer? = lock.withLock { written.contains(pos >> 12) ? memory[pos >> 12] : nil }
            if let p { body(.data(p + Int(pos & 4095), n)) } else { body(.hole(n)) }
            pos = blockEnd
        }
    }

    func write(offset: UInt64, length: Int, fua: Bool, from source: inout some ByteSource) throws(StorageError) {
        guard length > 0 else { return }
        let first = offset >> 12, last = (offset + UInt64(length) - 1) >> 12
        let new = lock.withLock { (first...last).filter { !written.contains($0) }.count }
        guard new <= spaceLeft else { throw StorageError(.noSpace, "the RAM volume is full") }
        var pos = offset
        let end = offset + UInt64(length)
        while pos < end {
            let blockEnd = min(end, (pos | 4095) + 1)
            let p = lock.withLock { block(pos >> 12) }
            do { try source.fill(UnsafeMutableRawBufferPointer(start: p + Int(pos & 4095), count: Int(blockEnd - pos)), nonTemporal: false) } catch {
                throw StorageError(.io, "\(error)", sourceFailed: true)
            }
            pos = blockEnd
        }
        lock.withLock {
            let before = written.count
            written.formUnion(first...last)
            spaceLeft -= written.count - before
        }
    }

    func writeZeroes(offset: UInt64, length: UInt64, mayTrim: Bool, fast: Bool, fua: Bool) throws(StorageError) {
        if fast && !mayTrim { throw StorageError(.notSupported, "not faster than writing") }
        guard length > 0 else { return }
        let end = offset + length
        try lock.withLock { () throws(StorageError) in
            /// Zeroes [from, to) inside one block, allocating it when `allocate`.
            func zero(_ from: UInt64, _ to: UInt64, allocate: Bool) {
                let b = from >> 12
                guard allocate || written.contains(b) else { return }
                (block(b) + Int(from & 4095)).initializeMemory(as: UInt8.self, repeating: 0, count: Int(to - from))
                if written.insert(b).inserted { spaceLeft -= 1 }
            }
            if !mayTrim {
                let new = ((offset >> 12)...((end - 1) >> 12)).filter { !written.contains($0) }.count
                guard new <= spaceLeft else { throw StorageError(.noSpace, "the RAM volume is full") }
                var pos = offset
                while pos < end {
                    let blockEnd = min(end, (pos | 4095) + 1)
                    zero(pos, blockEnd, allocate: true)
                    pos = blockEnd
                }
                return
            }
            // Whole blocks become holes; the partial blocks at either end are zeroed if allocated.
            let firstWhole = (offset + 4095) >> 12, endWhole = end >> 12
            if firstWhole >= endWhole {
                var pos = offset
                while pos < end {
                    let blockEnd = min(end, (pos | 4095) + 1)
                    zero(pos, blockEnd, allocate: false)
                    pos = blockEnd
                }
                return
            }
            if offset & 4095 != 0 { zero(offset, firstWhole << 12, allocate: false) }
            if end & 4095 != 0 { zero(endWhole << 12, end, allocate: false) }
            let before = written.count
            written = written.filter { $0 < firstWhole || $0 >= endWhole }
            release(before - written.count)
        }
    }

    func trim(offset: UInt64, length: UInt64, fua: Bool) throws(StorageError) {
        try writeZeroes(offset: offset, length: length, mayTrim: true, fast: false, fua: fua)
    }

    func flush() throws(StorageError) { lock.withLock { flushes += 1 } }

    func cache(offset: UInt64, length: UInt64) throws(StorageError) {}

    /// Runs of allocated blocks and holes, each run one extent.
    func status(context: String, offset: UInt64, length: UInt64, _ body: (UInt64, UInt32) -> Bool) throws(StorageError) {
        guard context == "base:allocation" else { throw StorageError(.invalid, "unknown context \(context)") }
        let end = offset + length
        let allocated = lock.withLock { written.filter { $0 >= offset >> 12 && $0 <= (end - 1) >> 12 }.sorted() }
        var pos = offset
        var next = allocated.makeIterator()
        var b = next.next()
        while pos < end {
            let runEnd: UInt64, hole: Bool
            if let block = b, block == pos >> 12 {
                var last = block
                b = next.next()
                while let n = b, n == last + 1 { last = n; b = next.next() }
                runEnd = min(end, (last + 1) << 12)
                hole = false
            } else {
                runEnd = min(end, b.map { $0 << 12 } ?? end)
                hole = true
            }
            guard body(runEnd - pos, hole ? ExtentStatus([.hole, .zero]).rawValue : 0) else { return }
            pos = runEnd
        }
    }
}

/// One export of a `RAMVolume`, under the volume's name; the empty name is the default export.
/// Its flags are those a writable or read-only volume of the pool advertises.
final class RAMExports: ExportSource, @unchecked Sendable {
    let volume: RAMVolume
    init(_ volume: RAMVolume) { self.volume = volume }
    var descriptor: ExportDescriptor {
        var flags: TransmissionFlags = [.hasFlags, .sendFlush, .sendFUA, .sendCache, .canMultiConn]
        if volume.readOnly { flags.insert(.readOnly) } else { flags.formUnion([.sendTrim, .sendWriteZeroes, .sendFastZero]) }
        return ExportDescriptor(name: volume.name, description: "memory \(volume.name)", size: volume.size, flags: flags)
    }
    func lookup(_ name: String) -> ExportDescriptor? { name.isEmpty || name == volume.name ? descriptor : nil }
    func list() -> [ExportDescriptor] { [descriptor] }
    func volume(for export: ExportDescriptor) -> (any BlockVolume)? { export.name == volume.name ? volume : nil }
}

/// A `RAMVolume` served in this process on a Unix socket in a scratch directory: what
/// IntegrationTests' TestServer is for a pool. It stops when it goes.
final class RAMServer {
    let scratch = ScratchDirectory()
    let socketPath: String
    let volume: RAMVolume
    let server: Server

    /// A volume of `size` bytes (default 64 MiB, the size of TestServer's volume) exported as `ram`.
    init(size: UInt64 = 64 << 20, readOnly: Bool = false, handshakeTimeoutSeconds: Int? = nil) throws {
        socketPath = scratch.file("s.sock")
        volume = RAMVolume(size: size, readOnly: readOnly)
        server = Server(exports: RAMExports(volume))
        if let handshakeTimeoutSeconds { server.handshakeTimeoutSeconds = handshakeTimeoutSeconds }
        try server.listen(on: [Socket.listenUnix(path: socketPath)])
    }

    var uri: String { "nbd+unix:///?socket=\(socketPath)" }

    /// A connected libnbd client.
    func client(_ configure: (NBDClient) throws -> Void = { _ in }) throws -> NBDClient {
        let c = try NBDClient()
        try configure(c)
        try c.connect(unix: socketPath)
        return c
    }

    deinit { server.shutdown(timeoutSeconds: 10) }
}
