import CPmemSupport
import Glibc
import PmemSystem

/// An open pool: its descriptor, its mapping and its validated header. Owns the mapping.
public final class PoolFile: @unchecked Sendable {
    public let path: String
    public let fd: FileDescriptor
    public let region: MappedRegion
    public let header: PoolHeader
    public let persistence: Persistence
    public let readOnly: Bool
    /// What backs the pool: a regular file, a character device (device DAX) or a block device.
    public let backing: Backing

    public enum Backing: String, Sendable { case file, characterDevice = "device-dax", blockDevice = "block-device" }

    private init(path: String, fd: FileDescriptor, region: MappedRegion, header: PoolHeader,
                 persistence: Persistence, readOnly: Bool, backing: Backing) {
        self.path = path
        self.fd = fd
        self.region = region
        self.header = header
        self.persistence = persistence
        self.readOnly = readOnly
        self.backing = backing
    }

    deinit { fd.close() }

    /// Formats a new pool. A regular file is created sparse and must not exist (or be empty);
    /// a device is formatted in place unless it already holds a pool (then `force` is needed).
    @discardableResult
    public static func create(path: String, size: UInt64?, volumeName: String = "pmem0", force: Bool = false) throws(PoolError) -> PoolHeader {
        var st = stat()
        let exists = stat(path, &st) == 0
        let isDevice = exists && ((st.st_mode & S_IFMT) == S_IFCHR || (st.st_mode & S_IFMT) == S_IFBLK)
        if exists && !isDevice && st.st_size > 0 && !force {
            throw PoolError(.exists, "\(path) already exists and is not empty; refusing to overwrite it (use --force to reformat)")
        }
        let fd: FileDescriptor
        do { fd = try FileDescriptor.open(path, O_RDWR | (isDevice ? 0 : O_CREAT)) } catch {
            throw PoolError.system(error, "cannot open \(path)")
        }
        defer { fd.close() }
        let backing = try backingKind(fd)
        let available = try byteSize(fd, backing)
        let poolSize: UInt64
        if backing == .file {
            guard let size else { throw PoolError(.invalid, "--size is required to create a pool file") }
            poolSize = size & ~UInt64(4095)
        } else {
            if !force, let existing = try? readHeader(fd, available: available) {
                throw PoolError(.exists, "\(path) already holds pool \(existing.uuidString); use --force to reformat it")
            }
            poolSize = min(size ?? available, available) & ~UInt64((2 << 20) - 1)
        }
        let header = try PoolHeader.layout(poolSize: poolSize, volumeName: volumeName)
        do throws(Errno) {
            if backing == .file {
                try fd.truncate(to: 0)
                try fd.truncate(to: Int(poolSize))
            } else {
                // A device holds old bytes: clear the metadata area the layout relies on being zero.
                var off: UInt64 = 0
                while off < header.dataOffset {
                    let n = Int(min(1 << 20, header.dataOffset - off))
                    try fd.writeAll(at: Int(off), bytes: [UInt8](repeating: 0, count: n))
                    off += UInt64(n)
                }
            }
            try fd.writeAll(at: 0, bytes: header.encode())
            try fd.sync()
        } catch {
            throw PoolError.system(error, "cannot write \(path)")
        }
        if backing == .file { syncDirectory(of: path) }
        return header
    }

    /// Opens and maps an existing pool. A file that is not a valid pool is refused with a
    /// message saying why; it is never reformatted.
    public static func open(path: String, readOnly: Bool = false, persistence mode: PersistenceMode = .auto,
                            lock: Bool = true) throws(PoolError) -> PoolFile {
        let fd: FileDescriptor
        do { fd = try FileDescriptor.open(path, readOnly ? O_RDONLY : O_RDWR) } catch {
            if error == .noSuchFile { throw PoolError(.notFound, "\(path) does not exist; create a pool with 'pmem-nbd create \(path) --size 4G'") }
            throw PoolError.system(error, "cannot open \(path)")
        }
        do throws(PoolError) {
            if lock {
                do { try fd.lockExclusive() } catch {
                    throw PoolError(.exists, "\(path) is in use by another pmem-nbd process (\(error))")
                }
            }
            let backing = try backingKind(fd)
            let available = try byteSize(fd, backing)
            let header = try readHeader(fd, available: available)
            let region: MappedRegion
            do {
                region = try MappedRegion.map(fd, length: Int(header.poolSize), writable: !readOnly,
                                              preferSynchronous: mode != .page)
            } catch { throw PoolError.system(error, "cannot map \(path)") }
            let sync = region.kind == .synchronous || (readOnly && mode != .page && MappedRegion.supportsSynchronous(fd))
            let domain: Persistence.Domain
            switch mode {
            case .auto: domain = sync ? .cacheline : .page
            case .cacheline:
                domain = .cacheline
                if !sync { Log.warning("\(path): cache-line persistence forced on a mapping without MAP_SYNC (for testing: not power-fail safe)") }
            case .page: domain = .page
            }
            let persistence = Persistence(domain: domain, synchronousMapping: sync, region: region, fd: fd)
            return PoolFile(path: path, fd: fd, region: region, header: header, persistence: persistence,
                            readOnly: readOnly, backing: backing)
        } catch {
            fd.close()
            throw error
        }
    }

    static func readHeader(_ fd: FileDescriptor, available: UInt64) throws(PoolError) -> PoolHeader {
        let buf: [UInt8]
        do { buf = try fd.read(at: 0, count: PoolHeader.encodedSize) } catch {
            throw PoolError.system(error, "cannot read the pool header")
        }
        let r: Result<PoolHeader, PoolError> = buf.withUnsafeBytes { b in
            Result { () throws(PoolError) in try PoolHeader.decode(b, available: available) }
        }
        return try r.get()
    }

    static func backingKind(_ fd: FileDescriptor) throws(PoolError) -> Backing {
        let st: stat
        do { st = try fd.status() } catch { throw PoolError.system(error, "fstat") }
        switch st.st_mode & S_IFMT {
        case S_IFREG: return .file
        case S_IFCHR: return .characterDevice
        case S_IFBLK: return .blockDevice
        default: throw PoolError(.invalid, "a pool must be a regular file or a DAX device")
        }
    }

    /// Bytes available in the backing: file size, device DAX size from sysfs, or BLKGETSIZE64.
    static func byteSize(_ fd: FileDescriptor, _ backing: Backing) throws(PoolError) -> UInt64 {
        let st: stat
        do { st = try fd.status() } catch { throw PoolError.system(error, "fstat") }
        switch backing {
        case .file:
            return UInt64(st.st_size)
        case .blockDevice:
            let n = pmem_block_device_size(fd.rawValue)
            if n < 0 { throw PoolError.system(.current, "BLKGETSIZE64") }
            return UInt64(n)
        case .characterDevice:
            let rdev = UInt64(st.st_rdev)
            let major = ((rdev >> 8) & 0xfff) | ((rdev >> 32) & ~UInt64(0xfff))
            let minor = (rdev & 0xff) | ((rdev >> 12) & ~UInt64(0xff))
            let sysfs = "/sys/dev/char/\(major):\(minor)/size"
            guard let text = readSmallFile(sysfs), let n = UInt64(text.trimmingCharacters(in: " \n")) else {
                throw PoolError(.invalid, "cannot read the size of the device from \(sysfs)")
            }
            return n
        }
    }

    /// The pool's bytes as a raw pointer for a byte offset.
    @inline(__always)
    public func pointer(_ offset: UInt64) -> UnsafeMutableRawPointer { region.base + Int(offset) }
}

func readSmallFile(_ path: String) -> String? {
    guard let fd = try? FileDescriptor.open(path, O_RDONLY) else { return nil }
    defer { fd.close() }
    var buf = [UInt8](repeating: 0, count: 4096)
    guard let n = try? buf.withUnsafeMutableBytes({ try fd.read(into: $0) }) else { return nil }
    return String(decoding: buf[0..<n], as: UTF8.self)
}

func syncDirectory(of path: String) {
    let dir = path.contains("/") ? String(path[..<path.lastIndex(of: "/")!]) : "."
    if let fd = try? FileDescriptor.open(dir.isEmpty ? "/" : dir, O_RDONLY | O_DIRECTORY) {
        try? fd.sync()
        fd.close()
    }
}

extension String {
    func trimmingCharacters(in set: String) -> String {
        var s = Substring(self)
        while let f = s.first, set.contains(f) { s.removeFirst() }
        while let l = s.last, set.contains(l) { s.removeLast() }
        return String(s)
    }
}
