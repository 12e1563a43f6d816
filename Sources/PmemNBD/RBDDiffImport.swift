import Glibc
import PmemPool
import PmemSystem
import PmemVolumes

/// Applies an RBD stream to a volume (`pmem-nbd import-diff`, Docs/SCALE-OUT.md): a diff in
/// format v1 or v2 (`rbd export-diff [--export-format 2]`, Ceph doc/dev/rbd-diff.rst), or a
/// whole image with its snapshots (`rbd export --export-format 2`, doc/dev/rbd-export.rst: an
/// "rbd image v2" header, image metadata records up to `E`, a le64 count of diffs, then the
/// diffs in v2 form, oldest snapshot first, the head last).
///
/// Each diff is applied as `rbd import-diff` applies one: its from-snapshot (`f`) must exist as
/// a snapshot of the volume, its size (`s`) becomes the volume's, its data (`w`) is written, its
/// zero records (`z`) are deallocated (holes), and at its end (`e`) the snapshot it names (`t`)
/// is taken. A volume that does not exist is created by a stream that starts from nothing (no
/// `f`). The stream is checked as it is read; malformed input is an error naming the offset.
/// What was applied before an error stays (as with rbd import-diff); snapshots are taken only
/// for diffs read to their end.
public struct RBDDiffImport {
    public struct Summary: Sendable {
        public var diffs = 0
        public var dataBytes: UInt64 = 0
        public var zeroBytes: UInt64 = 0
        public var snapshots: [String] = []
        public var createdVolume = false
        public var size: UInt64 = 0
        public var streamBytes: UInt64 = 0
    }

    let pool: Pool
    let volumeName: String
    /// In a whole-image stream, the last snapshot to apply (the rest of the stream is read only).
    let until: String?

    public init(pool: Pool, volume: String, until: String? = nil) {
        self.pool = pool
        self.volumeName = volume
        self.until = until
    }

    /// Reads the stream from `path` (a file, FIFO, or character device).
    public func apply(from path: String, progress: (UInt64, UInt64) -> Void = { _, _ in }) throws(PoolError) -> Summary {
        let fd: FileDescriptor
        do { fd = try FileDescriptor.open(path, O_RDONLY | O_CLOEXEC) } catch {
            throw PoolError(.system(error), "cannot open \(path): \(error)")
        }
        defer { fd.close() }
        var total: UInt64 = 0
        if let st = try? fd.status(), (st.st_mode & S_IFMT) == S_IFREG { total = UInt64(st.st_size) }
        var input = StreamReader(fd: fd, path: path)
        var summary = Summary()
        let header = try input.bytes(12)
        switch header {
        case Array("rbd diff v1\n".utf8):
            try applyDiff(&input, v2: false, &summary, total: total, progress: progress)
        case Array("rbd diff v2\n".utf8):
            try applyDiff(&input, v2: true, &summary, total: total, progress: progress)
        case Array("rbd image v2".utf8):
            guard try input.byte() == UInt8(ascii: "\n") else { throw input.bad("a bad header") }
            // Image metadata (order, format, features, striping, …): sized records up to `E`.
            while true {
                let tag = try input.byte()
                if tag == UInt8(ascii: "E") { break }
                let n = try input.le64()
                try input.skip(n)
            }
            // Ceph 16 writes a second header here, which doc/dev/rbd-export.rst does not show.
            let diffsHeader = Array("rbd image diffs v2\n".utf8)
            if try input.peek(diffsHeader.count) == diffsHeader { _ = try input.bytes(diffsHeader.count) }
            let count = try input.le64()
            guard count > 0, count < 1 << 20 else { throw input.bad("a diff count of \(count)") }
            var applying = true
            for _ in 0..<count {
                // Each diff may repeat its own header.
                if try input.peek(12) == Array("rbd diff v2\n".utf8) { _ = try input.bytes(12) }
                let to = try applyDiff(&input, v2: true, &summary, total: total, apply: applying, progress: progress)
                // `until`: the diffs after that snapshot's are read, not applied.
                if let until, to == until { applying = false }
            }
            if let until, applying { throw PoolError(.notFound, "the stream has no snapshot @\(until)") }
        default:
            throw PoolError(.invalid, "\(path) is not an RBD diff or export (its first bytes are not 'rbd diff v1', 'rbd diff v2' or 'rbd image v2')")
        }
        guard try input.atEnd() else { throw input.bad("data after the end record") }
        try volume().flush()
        summary.streamBytes = input.consumed
        progress(total, total)
        return summary
    }

    func volume() throws(PoolError) -> Volume {
        guard let v = pool.volume(named: volumeName), v.kind == .volume else {
            throw PoolError(.notFound, "no volume named '\(volumeName)'")
        }
        return v
    }

    /// One diff, from its first record to its `e`.
    @discardableResult
    func applyDiff(_ input: inout StreamReader, v2: Bool, _ summary: inout Summary, total: UInt64, apply: Bool = true,
                   progress: (UInt64, UInt64) -> Void) throws(PoolError) -> String? {
        var from: String?, to: String?, size: UInt64?
        var prepared = false
        var target: Volume?
        func prepare() throws(PoolError) -> Volume {
            if let target { return target }
            guard let size else { throw input.bad("a data record before the size record") }
            guard size > 0, size % 4096 == 0 else {
                throw PoolError(.invalid, "the image is \(size) bytes, not a whole number of 4 KiB blocks: pmem-nbd volumes are (resize the RBD image first)")
            }
            let all = pool.records()
            let existing = all.first { $0.kind == .volume && $0.name == volumeName }
            if let from {
                guard existing != nil else { throw PoolError(.notFound, "no volume named '\(volumeName)': the diff starts from its snapshot @\(from)") }
                guard all.contains(where: { Pool.exportName($0, in: all) == "\(volumeName)@\(from)" }) else {
                    throw PoolError(.notFound, "the diff starts from snapshot @\(from), which volume '\(volumeName)' does not have (pmem-nbd snapshot list \(volumeName))")
                }
            }
            if let to, all.contains(where: { Pool.exportName($0, in: all) == "\(volumeName)@\(to)" }) {
                throw PoolError(.exists, "volume '\(volumeName)' already has a snapshot @\(to), which the diff would create")
            }
            if existing == nil {
                try pool.createVolume(name: volumeName, size: size)
                summary.createdVolume = true
            } else if existing!.size != size {
                try pool.resize(volumeName, size: size)
            }
            summary.size = size
            prepared = true
            let v = try volume()
            target = v
            return v
        }
        func name() throws(PoolError) -> String {
            let n = try input.le32()
            guard n > 0, n <= 63 else { throw input.bad("a snapshot name of \(n) bytes") }
            let s = String(decoding: try input.bytes(Int(n)), as: UTF8.self)
            guard VolumeRecord.validName(s) else { throw input.bad("the snapshot name '\(s)', which pmem-nbd cannot use") }
            return s
        }
        while true {
            let tagOffset = input.consumed
            let tag = try input.byte()
            let length: UInt64? = v2 && tag != UInt8(ascii: "e") ? try input.le64() : nil
            let bodyStart = input.consumed
            switch tag {
            case UInt8(ascii: "f"), UInt8(ascii: "t"):
                guard !prepared else { throw input.bad("a metadata record after data", at: tagOffset) }
                let s = try name()
                if tag == UInt8(ascii: "f") { from = s } else { to = s }
            case UInt8(ascii: "s"):
                guard !prepared else { throw input.bad("a metadata record after data", at: tagOffset) }
                size = try input.le64()
            case UInt8(ascii: "w") where !apply, UInt8(ascii: "z") where !apply:
                _ = try input.le64()
                let n = try input.le64()
                if tag == UInt8(ascii: "w") { try input.skip(n) }
            case UInt8(ascii: "p"):
                // The snapshot's protection: Ceph 16 declares 8 bytes and writes one (a bool).
                _ = try input.byte()
                continue
            case UInt8(ascii: "e") where !apply:
                return to
            case UInt8(ascii: "w"), UInt8(ascii: "z"):
                let v = try prepare()
                let offset = try input.le64(), n = try input.le64()
                guard offset <= v.size, n <= v.size - offset else {
                    throw input.bad("a record past the end (\(offset) + \(n) > \(v.size))", at: tagOffset)
                }
                if tag == UInt8(ascii: "w") {
                    if let length, length != 16 + n { throw input.bad("a 'w' record of length \(length) carrying \(n) bytes", at: tagOffset) }
                    var at = offset
                    var left = n
                    while left > 0 {
                        let k = Int(min(left, 1 << 20))
                        try input.withBytes(k) { (buffer) throws(PoolError) in
                            var source = BufferByteSource(buffer)
                            try v.write(offset: at, length: k, fua: false, from: &source)
                        }
                        at += UInt64(k); left -= UInt64(k)
                        progress(input.consumed, total)
                    }
                    summary.dataBytes += n
                } else {
                    if n > 0 { try v.writeZeroes(offset: offset, length: n, mayTrim: true, fast: false, fua: false) }
                    summary.zeroBytes += n
                }
            case UInt8(ascii: "e"):
                let v = try prepare()
                try v.flush()
                if let to {
                    try pool.createSnapshot(volume: volumeName, snapshot: to)
                    summary.snapshots.append(to)
                }
                summary.diffs += 1
                return to
            default:
                // v2 names its length, so records it does not know can be skipped; v1 cannot.
                guard let length else { throw input.bad("an unknown record '\(Self.show(tag))'", at: tagOffset) }
                try input.skip(length)
            }
            if let length, input.consumed - bodyStart != length {
                throw input.bad("a '\(Self.show(tag))' record whose length says \(length) bytes but holds \(input.consumed - bodyStart)", at: tagOffset)
            }
        }
    }

    static func show(_ b: UInt8) -> String { b >= 32 && b < 127 ? String(UnicodeScalar(b)) : "\\x" + String(b, radix: 16) }
}

/// Buffered reading of the stream, with the offset for messages.
struct StreamReader {
    let fd: FileDescriptor
    let path: String
    var buffer = [UInt8](repeating: 0, count: 1 << 20)
    var start = 0, end = 0
    var consumed: UInt64 = 0
    var eof = false

    init(fd: FileDescriptor, path: String) {
        self.fd = fd
        self.path = path
    }

    func bad(_ what: String, at offset: UInt64? = nil) -> PoolError {
        PoolError(.invalid, "\(path) is not a valid RBD stream: \(what) at byte \(offset ?? consumed)")
    }

    /// Makes at least `n` bytes (n ≤ buffer size) available, unless the stream ends first.
    mutating func fill(_ n: Int) throws(PoolError) {
        if end - start >= n || eof { return }
        if start > 0 {
            buffer.withUnsafeMutableBytes { b in
                if end > start { memmove(b.baseAddress!, b.baseAddress! + start, end - start) }
            }
            end -= start; start = 0
        }
        while end - start < n && !eof {
            let e = end
            let got = buffer.withUnsafeMutableBytes { b -> Result<Int, Errno> in
                Result { () throws(Errno) -> Int in try fd.read(into: UnsafeMutableRawBufferPointer(rebasing: b[e...])) }
            }
            guard case .success(let gotCount) = got else {
                if case .failure(let error) = got { throw PoolError(.system(error), "cannot read \(path): \(error)") }
                return
            }
            if gotCount == 0 { eof = true } else { end += gotCount }
        }
    }

    mutating func need(_ n: Int) throws(PoolError) {
        try fill(n)
        guard end - start >= n else { throw bad("the stream ends early (no end record)") }
    }

    mutating func atEnd() throws(PoolError) -> Bool {
        try fill(1)
        return end == start
    }

    mutating func byte() throws(PoolError) -> UInt8 {
        try need(1)
        let b = buffer[start]
        start += 1; consumed += 1
        return b
    }

    mutating func bytes(_ n: Int) throws(PoolError) -> [UInt8] {
        try need(n)
        let out = Array(buffer[start..<start + n])
        start += n; consumed += UInt64(n)
        return out
    }

    mutating func peek(_ n: Int) throws(PoolError) -> [UInt8] {
        try fill(n)
        return Array(buffer[start..<min(end, start + n)])
    }

    mutating func le32() throws(PoolError) -> UInt32 {
        let b = try bytes(4)
        return b.enumerated().reduce(UInt32(0)) { $0 | UInt32($1.element) << (8 * UInt32($1.offset)) }
    }

    mutating func le64() throws(PoolError) -> UInt64 {
        let b = try bytes(8)
        return b.enumerated().reduce(UInt64(0)) { $0 | UInt64($1.element) << (8 * UInt64($1.offset)) }
    }

    mutating func skip(_ n: UInt64) throws(PoolError) {
        var left = n
        while left > 0 {
            let k = Int(min(left, UInt64(buffer.count)))
            try need(k)
            start += k; consumed += UInt64(k); left -= UInt64(k)
        }
    }

    /// Hands `n` (≤ 1 MiB) bytes to `body` without copying them out.
    mutating func withBytes(_ n: Int, _ body: (UnsafeRawBufferPointer) throws(PoolError) -> Void) throws(PoolError) {
        try need(n)
        let s = start
        let r = buffer.withUnsafeBytes { b -> Result<Void, PoolError> in
            Result { () throws(PoolError) in try body(UnsafeRawBufferPointer(rebasing: b[s..<s + n])) }
        }
        try r.get()
        start += n; consumed += UInt64(n)
    }
}
