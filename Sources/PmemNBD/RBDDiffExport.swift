import Glibc
import PmemPool
import PmemSystem
import PmemVolumes

/// Writes the difference between two snapshots of a volume (or a snapshot and the volume) as an
/// RBD diff v1 stream, the format `rbd import-diff` reads (Ceph doc/dev/rbd-diff.rst): the
/// header line, `f`/`t`/`s` metadata records, then `w` (data) and `z` (zeroes) records in
/// ascending offset order, and `e`. Integers are little-endian. See Docs/SCALE-OUT.md.
public struct RBDDiffExport {
    public static let header = Array("rbd diff v1\n".utf8)

    /// What an export wrote.
    public struct Summary: Sendable {
        public var size: UInt64 = 0
        public var dataBytes: UInt64 = 0
        public var zeroBytes: UInt64 = 0
        public var records = 0
        public var fileBytes: UInt64 = 0
    }

    let target: Volume
    let base: VolumeRecord?
    let fromName: String?
    let toName: String?

    /// Resolves `to` (`VOL@SNAP` or `VOL`) and the optional `from` (`VOL@SNAP`, a snapshot of the
    /// same volume) in `pool`.
    public init(pool: Pool, from: String?, to: String) throws(PoolError) {
        let all = pool.records()
        func record(_ name: String) throws(PoolError) -> VolumeRecord {
            guard let r = all.first(where: { Pool.exportName($0, in: all) == name }) else {
                throw PoolError(.notFound, "no volume or snapshot '\(name)' (see: pmem-nbd snapshot list)")
            }
            return r
        }
        let t = try record(to)
        guard let volume = pool.volume(slot: t.slot) else { throw PoolError(.notFound, "'\(to)' vanished") }
        let owner = t.kind == .volume ? t.id : t.parent
        var b: VolumeRecord?
        if let from {
            let f = try record(from)
            guard f.kind == .snapshot, f.parent == owner else {
                throw PoolError(.invalid, "'\(from)' is not a snapshot of the volume '\(to)' belongs to; a diff needs two points of one volume")
            }
            guard f.slot != t.slot else { throw PoolError(.invalid, "'\(from)' and '\(to)' are the same snapshot") }
            b = f
        }
        target = volume
        base = b
        fromName = b?.name
        toName = t.kind == .snapshot ? t.name : nil
    }

    /// The byte ranges the stream would carry (`w` and `z` records alike), in ascending order,
    /// adjacent ranges merged: what `rbd import-diff` of it writes or discards on the image.
    public func extents() throws(PoolError) -> [(offset: UInt64, length: UInt64)] {
        let total = (target.size + 4095) >> 12
        let window: UInt64 = 4096
        let guardian = target.makeReadGuard()
        var out: [(offset: UInt64, length: UInt64)] = []
        var at: UInt64 = 0
        while at < total {
            let end = min(total, at + window)
            guardian.enter()
            do {
                try target.changes(since: base, first: at, end: end) { first, n, _ in
                    let offset = first << 12, length = min(n << 12, target.size - offset)
                    if let last = out.last, last.offset + last.length == offset {
                        out[out.count - 1].length += length
                    } else {
                        out.append((offset, length))
                    }
                    return true
                }
            } catch {
                guardian.exit()
                throw error
            }
            guardian.exit()
            at = end
        }
        return out
    }

    /// Writes the stream to `path`, which must not exist unless `replacing` (then a regular file
    /// is replaced; a pipe or FIFO is written as it is); `progress(done, total)` is called in
    /// blocks. A failed export removes the file it created.
    public func write(to path: String, replacing: Bool = true, progress: (UInt64, UInt64) -> Void = { _, _ in }) throws(PoolError) -> Summary {
        let fd: FileDescriptor
        var st = stat()
        let special = stat(path, &st) == 0 && (st.st_mode & S_IFMT) != S_IFREG
        do {
            fd = try FileDescriptor.open(path, O_WRONLY | O_CLOEXEC | (special ? 0 : O_CREAT | (replacing ? O_TRUNC : O_EXCL)), mode: 0o644)
        } catch {
            if error == .exists { throw PoolError(.exists, "\(path) exists; add --force to replace it") }
            throw PoolError(.system(error), "cannot create \(path): \(error)")
        }
        var ok = false
        defer {
            fd.close()
            if !ok && !special { unlink(path) }
        }
        var out = OutputBuffer(fd: fd, path: path)
        var summary = Summary()
        summary.size = target.size
        out.append(Self.header)
        if let fromName { out.record(UInt8(ascii: "f"), string: fromName) }
        if let toName { out.record(UInt8(ascii: "t"), string: toName) }
        out.byte(UInt8(ascii: "s")); out.le64(target.size)

        let total = (target.size + 4095) >> 12
        let window: UInt64 = 256   // blocks per step: a `w` record carries at most 1 MiB
        let guardian = target.makeReadGuard()
        var at: UInt64 = 0
        var runs: [(UInt64, UInt64, BlockChange)] = []
        while at < total {
            let end = min(total, at + window)
            runs.removeAll(keepingCapacity: true)
            guardian.enter()
            do {
                try target.changes(since: base, first: at, end: end) { first, n, change in
                    runs.append((first, n, change)); return true
                }
                for (first, n, change) in runs {
                    let offset = first << 12
                    let length = min(n << 12, target.size - offset)
                    out.byte(change == .data ? UInt8(ascii: "w") : UInt8(ascii: "z"))
                    out.le64(offset); out.le64(length)
                    summary.records += 1
                    if change == .data {
                        summary.dataBytes += length
                        try target.read(offset: offset, length: Int(length)) { segment in
                            switch segment {
                            case .data(let p, let k): out.append(UnsafeRawBufferPointer(start: p, count: k))
                            case .hole(let k): out.zeroes(k)
                            }
                        }
                    } else {
                        summary.zeroBytes += length
                    }
                }
            } catch {
                guardian.exit()
                throw error
            }
            guardian.exit()
            try out.drainIfFull()
            at = end
            progress(at, total)
        }
        out.byte(UInt8(ascii: "e"))
        try out.drain()
        // A file is made durable; a pipe or FIFO (standard output) cannot be, and need not.
        if !special { do { try fd.sync() } catch { throw PoolError(.system(error), "cannot write \(path): \(error)") } }
        summary.fileBytes = out.written
        ok = true
        return summary
    }
}

/// The export's output: bytes gathered in memory and written in large pieces.
private struct OutputBuffer {
    let fd: FileDescriptor
    let path: String
    var bytes: [UInt8] = []
    var written: UInt64 = 0

    init(fd: FileDescriptor, path: String) {
        self.fd = fd
        self.path = path
        bytes.reserveCapacity(2 << 20)
    }

    mutating func byte(_ b: UInt8) { bytes.append(b) }
    mutating func le64(_ v: UInt64) { withUnsafeBytes(of: v.littleEndian) { bytes.append(contentsOf: $0) } }
    mutating func append(_ b: [UInt8]) { bytes.append(contentsOf: b) }
    mutating func append(_ b: UnsafeRawBufferPointer) { bytes.append(contentsOf: b) }
    mutating func zeroes(_ n: Int) { bytes.append(contentsOf: repeatElement(0, count: n)) }
    mutating func record(_ tag: UInt8, string: String) {
        let s = Array(string.utf8)
        byte(tag)
        withUnsafeBytes(of: UInt32(s.count).littleEndian) { bytes.append(contentsOf: $0) }
        append(s)
    }

    mutating func drainIfFull() throws(PoolError) { if bytes.count >= 1 << 20 { try drain() } }

    mutating func drain() throws(PoolError) {
        do { try fd.writeAll(bytes: bytes) } catch { throw PoolError(.system(error), "cannot write \(path): \(error)") }
        written += UInt64(bytes.count)
        bytes.removeAll(keepingCapacity: true)
    }
}
