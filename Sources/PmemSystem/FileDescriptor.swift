import Glibc
import CPmemSupport

/// An owned-by-convention file descriptor: a thin typed wrapper over the C calls.
/// Closing is explicit (`close()`), as in swift-system.
public struct FileDescriptor: Hashable, Sendable {
    public let rawValue: Int32
    public init(rawValue: Int32) { self.rawValue = rawValue }

    public static let standardInput = FileDescriptor(rawValue: 0)
    public static let standardOutput = FileDescriptor(rawValue: 1)
    public static let standardError = FileDescriptor(rawValue: 2)

    /// `open(2)` with O_CLOEXEC.
    public static func open(_ path: String, _ flags: Int32, mode: mode_t = 0o644) throws(Errno) -> FileDescriptor {
        let fd = try retryOnInterrupt { Glibc.open(path, flags | O_CLOEXEC, mode) }
        return FileDescriptor(rawValue: fd)
    }

    /// `close(2)`.
    public func close() { _ = Glibc.close(rawValue) }

    /// `read(2)`: returns 0 at end of file.
    public func read(into buffer: UnsafeMutableRawBufferPointer) throws(Errno) -> Int {
        try retryOnInterrupt { Glibc.read(rawValue, buffer.baseAddress, buffer.count) }
    }

    /// `readv(2)` into the first `count` vectors (at most IOV_MAX): returns 0 at end of file.
    public func read(vectors: UnsafePointer<iovec>, count: Int) throws(Errno) -> Int {
        try retryOnInterrupt { Glibc.readv(rawValue, vectors, Int32(count)) }
    }

    /// Reads exactly `count` bytes, looping over short reads (`read(2)`); nil when the end of
    /// file comes first.
    public func readExactly(_ count: Int) throws(Errno) -> [UInt8]? {
        var buffer = [UInt8](repeating: 0, count: count)
        var got = 0
        while got < count {
            let n = try buffer.withUnsafeMutableBytes { b in
                Result { () throws(Errno) in try read(into: UnsafeMutableRawBufferPointer(rebasing: b[got...])) }
            }.get()
            if n == 0 { return nil }
            got += n
        }
        return buffer
    }

    /// `write(2)`: may write less than asked.
    public func write(_ buffer: UnsafeRawBufferPointer) throws(Errno) -> Int {
        try retryOnInterrupt { Glibc.write(rawValue, buffer.baseAddress, buffer.count) }
    }

    /// `pread(2)`.
    public func read(at offset: Int, into buffer: UnsafeMutableRawBufferPointer) throws(Errno) -> Int {
        try retryOnInterrupt { Glibc.pread(rawValue, buffer.baseAddress, buffer.count, offset) }
    }

    /// `pwrite(2)`.
    public func write(at offset: Int, _ buffer: UnsafeRawBufferPointer) throws(Errno) -> Int {
        try retryOnInterrupt { Glibc.pwrite(rawValue, buffer.baseAddress, buffer.count, offset) }
    }

    /// Writes the whole buffer, looping over short writes.
    public func writeAll(_ buffer: UnsafeRawBufferPointer) throws(Errno) {
        var done = 0
        while done < buffer.count {
            let n = try write(UnsafeRawBufferPointer(rebasing: buffer[done...]))
            done += n
        }
    }

    /// Writes the whole buffer at an offset, looping over short writes.
    public func writeAll(at offset: Int, _ buffer: UnsafeRawBufferPointer) throws(Errno) {
        var done = 0
        while done < buffer.count {
            let n = try write(at: offset + done, UnsafeRawBufferPointer(rebasing: buffer[done...]))
            if n == 0 { throw Errno.ioError }
            done += n
        }
    }

    /// Reads exactly `buffer.count` bytes at an offset; throws EIO at a premature end of file.
    public func readAll(at offset: Int, into buffer: UnsafeMutableRawBufferPointer) throws(Errno) {
        var done = 0
        while done < buffer.count {
            let n = try read(at: offset + done, into: UnsafeMutableRawBufferPointer(rebasing: buffer[done...]))
            if n == 0 { throw Errno.ioError }
            done += n
        }
    }

    /// Writes a whole byte array at an offset.
    public func writeAll(at offset: Int, bytes: [UInt8]) throws(Errno) {
        let r: Result<Void, Errno> = bytes.withUnsafeBytes { b in Result { () throws(Errno) in try writeAll(at: offset, b) } }
        try r.get()
    }

    /// Writes a whole byte array at the current position.
    public func writeAll(bytes: [UInt8]) throws(Errno) {
        let r: Result<Void, Errno> = bytes.withUnsafeBytes { b in Result { () throws(Errno) in try writeAll(b) } }
        try r.get()
    }

    /// Reads up to `count` bytes at an offset into a new array (shorter at end of file).
    public func read(at offset: Int, count: Int) throws(Errno) -> [UInt8] {
        var buf = [UInt8](repeating: 0, count: count)
        let r: Result<Int, Errno> = buf.withUnsafeMutableBytes { b in Result { () throws(Errno) in try read(at: offset, into: b) } }
        let n = try r.get()
        buf.removeSubrange(n...)
        return buf
    }

    /// `fsync(2)`.
    public func sync() throws(Errno) { _ = try retryOnInterrupt { Glibc.fsync(rawValue) } }

    /// `fdatasync(2)`.
    public func dataSync() throws(Errno) { _ = try retryOnInterrupt { Glibc.fdatasync(rawValue) } }

    /// `sync_file_range(2)`: with `wait`, writes the range's dirty pages and waits until they
    /// are written; without, only starts writing them. No file metadata is written and the
    /// device's volatile cache is not flushed (an `fsync`/`msync` afterwards does that).
    public func writeBack(at offset: Int, count: Int, wait: Bool) throws(Errno) {
        _ = try retryOnInterrupt { pmem_write_back(rawValue, Int64(offset), Int64(count), wait ? 1 : 0) }
    }

    /// The kind of file system the (regular) file lives on, from `fstatfs`.
    public var fileSystem: FileSystemKind {
        switch pmem_fs_type(rawValue) {
        case 0x0102_1994, 0x8584_58f6: return .memory      // tmpfs, ramfs
        case 0xEF53: return .ext4
        case 0x5846_5342: return .xfs
        default: return .other
        }
    }

    public enum FileSystemKind: Sendable { case memory, ext4, xfs, other }

    /// `fallocate(2)` with mode 0: reserves the file's blocks over a range.
    public func allocate(at offset: Int, count: Int) throws(Errno) {
        _ = try retryOnInterrupt { pmem_fallocate(rawValue, Int64(offset), Int64(count)) }
    }

    /// The size in bytes of a block device (`ioctl(BLKGETSIZE64)`).
    public func blockDeviceSize() throws(Errno) -> UInt64 {
        UInt64(try retryOnInterrupt { pmem_block_device_size(rawValue) })
    }

    /// `memfd_create(name, MFD_CLOEXEC)`: an anonymous file to share by descriptor.
    public static func anonymousFile(name: String) throws(Errno) -> FileDescriptor {
        FileDescriptor(rawValue: try retryOnInterrupt { pmem_memfd(name) })
    }

    /// `ftruncate(2)`.
    public func truncate(to size: Int) throws(Errno) { _ = try retryOnInterrupt { Glibc.ftruncate(rawValue, size) } }

    /// `fstat(2)`.
    public func status() throws(Errno) -> stat {
        var st = stat()
        _ = try retryOnInterrupt { Glibc.fstat(rawValue, &st) }
        return st
    }

    /// `fcntl(F_SETFL, O_NONBLOCK)` on or off.
    public func setNonBlocking(_ on: Bool) throws(Errno) {
        let flags = try retryOnInterrupt { fcntl(rawValue, F_GETFL) }
        _ = try retryOnInterrupt { fcntl(rawValue, F_SETFL, on ? flags | O_NONBLOCK : flags & ~O_NONBLOCK) }
    }

    /// `flock(LOCK_SH | LOCK_NB)`, retried for up to `patience` seconds while an exclusive
    /// holder has it: readers share the lock, a writer's exclusive lock excludes them.
    public func lockShared(patience: Double = 1) throws(Errno) {
        var waited = 0.0
        while true {
            do {
                _ = try retryOnInterrupt { flock(rawValue, LOCK_SH | LOCK_NB) }
                return
            } catch {
                if error != .wouldBlock || waited >= patience { throw error }
                usleep(10_000)
                waited += 0.01
            }
        }
    }

    /// `flock(LOCK_UN)`.
    public func unlock() { _ = flock(rawValue, LOCK_UN) }

    /// `flock(LOCK_EX|LOCK_NB)`, retried for up to `patience` seconds (a child forked by this
    /// process holds a copy of the descriptor until it calls exec); throws EWOULDBLOCK when
    /// another process keeps holding it.
    public func lockExclusive(patience: Double = 1) throws(Errno) {
        var waited = 0.0
        while true {
            do {
                _ = try retryOnInterrupt { flock(rawValue, LOCK_EX | LOCK_NB) }
                return
            } catch {
                if error != .wouldBlock || waited >= patience { throw error }
                usleep(10_000)
                waited += 0.01
            }
        }
    }
}
