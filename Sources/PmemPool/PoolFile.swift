import Glibc
import PmemSystem

/// The memory a pool engine works on: a mapping of the pool file or device (or, in crash tests,
/// a traced image), and how to make it durable.
public struct PoolMedia: @unchecked Sendable {
    public let base: UnsafeMutableRawPointer
    public let length: Int
    public let persistence: Persistence
    /// Keeps the mapping (and descriptor) alive; nil for test images.
    public let file: PoolFile?

    public init(base: UnsafeMutableRawPointer, length: Int, persistence: Persistence, file: PoolFile? = nil) {
        self.base = base
        self.length = length
        self.persistence = persistence
        self.file = file
    }

    /// A crash-test image: the engine works on the tracer's volatile image, emulating `domain`
    /// (and, in the page domain, writing the way it would to a file on a device or on tmpfs).
    public init(tracer: PersistenceTracer, domain: Persistence.Domain, pageWrites: Persistence.PageWrites = .mapped) {
        self.init(base: tracer.volatile, length: tracer.length,
                  persistence: Persistence(domain: domain, synchronousMapping: domain == .cacheline,
                                           base: tracer.volatile, length: tracer.length, fd: nil, tracer: tracer,
                                           pageWrites: pageWrites))
    }
}

/// An open pool file or device: descriptor, lock, mapping. Validates the superblock before
/// mapping anything; a file that is not a valid pool is refused, never reformatted.
public final class PoolFile: @unchecked Sendable {
    public let path: String
    public let fd: FileDescriptor
    public let region: MappedRegion
    public let superblock: Superblock
    public let readOnly: Bool
    public let backing: Backing

    public enum Backing: String, Sendable { case file, characterDevice = "device-dax", blockDevice = "block-device" }

    private init(path: String, fd: FileDescriptor, region: MappedRegion, superblock: Superblock, readOnly: Bool, backing: Backing) {
        self.path = path
        self.fd = fd
        self.region = region
        self.superblock = superblock
        self.readOnly = readOnly
        self.backing = backing
    }

    deinit { fd.close() }

    /// Opens, locks (unless `lock` is false) and maps a pool; `media` is what the engine uses.
    public static func open(path: String, readOnly: Bool = false, persistence mode: PersistenceMode = .auto,
                            lock: Bool = true) throws(PoolError) -> (PoolFile, PoolMedia) {
        let fd: FileDescriptor
        do { fd = try FileDescriptor.open(path, readOnly ? O_RDONLY : O_RDWR) } catch {
            if error == .noSuchFile { throw PoolError(.notFound, "\(path) does not exist; create a pool with 'pmem-nbd create \(path) --size 4G'") }
            throw PoolError.system(error, "cannot open \(path)")
        }
        do throws(PoolError) {
            if lock {
                // Read-only opens share the lock (several read-only servers may serve a pool);
                // a writer's exclusive lock keeps everyone else out.
                do { try readOnly ? fd.lockShared() : fd.lockExclusive() } catch {
                    throw PoolError(.exists, "\(path) is in use by another pmem-nbd process (\(error))")
                }
            }
            let backing = try backingKind(fd)
            let available = try byteSize(fd, backing)
            let sb: Superblock
            do { sb = try readSuperblock(fd, available: available) } catch {
                throw damagedHeader(error, path: path, fd: fd, available: available)
            }
            let region: MappedRegion
            do {
                region = try MappedRegion.map(fd, length: Int(sb.layout.poolSize), writable: !readOnly, preferSynchronous: mode != .page)
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
            let file = PoolFile(path: path, fd: fd, region: region, superblock: sb, readOnly: readOnly, backing: backing)
            let (writes, rangeSync) = pageCacheBehaviour(fd, backing)
            let persistence = Persistence(domain: domain, synchronousMapping: sync, base: region.base, length: region.length, fd: fd,
                                          pageWrites: writes, rangeSync: rangeSync)
            return (file, PoolMedia(base: region.base, length: region.length, persistence: persistence, file: file))
        } catch {
            fd.close()
            // Every error names the file.
            throw error.naming(path)
        }
    }

    /// Prepares the file or device for a new pool of `size` bytes (a device's size when nil)
    /// and maps it: regular files are created sparse and must not exist (or be empty) unless
    /// `force`; a device that already holds a pool needs `force`.
    static func prepareNew(path: String, size: UInt64?, force: Bool) throws(PoolError) -> (FileDescriptor, MappedRegion, Backing, UInt64) {
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
        do throws(PoolError) {
            do { try fd.lockExclusive() } catch { throw PoolError(.exists, "\(path) is in use by another pmem-nbd process") }
            let backing = try backingKind(fd)
            let available = try byteSize(fd, backing)
            let poolSize: UInt64
            if backing == .file {
                guard let size else { throw PoolError(.invalid, "--size is required to create a pool file") }
                poolSize = size & ~UInt64(4095)
                _ = try PoolLayout.compute(poolSize: poolSize)
                do {
                    try fd.truncate(to: 0)
                    try fd.truncate(to: Int(poolSize))
                } catch { throw PoolError.system(error, "cannot size \(path)") }
            } else {
                if !force, let existing = try? readSuperblock(fd, available: available) {
                    throw PoolError(.exists, "\(path) already holds pool \(existing.uuidString); use --force to reformat it")
                }
                poolSize = min(size ?? available, available) & ~UInt64((2 << 20) - 1)
            }
            let region: MappedRegion
            do { region = try MappedRegion.map(fd, length: Int(poolSize), writable: true, preferSynchronous: true) } catch {
                throw PoolError.system(error, "cannot map \(path)")
            }
            return (fd, region, backing, poolSize)
        } catch {
            fd.close()
            throw error
        }
    }

    /// How the page domain should write a pool's backing and what its range syncs promise:
    /// memory-only files are written through the mapping; files on a device and block devices
    /// with `pwrite`; ext4, XFS and block devices flush the device's cache on a range sync.
    /// `PMEM_NBD_PAGE_WRITES=mapped|pwrite` overrides the first (tests, benchmarks).
    static func pageCacheBehaviour(_ fd: FileDescriptor, _ backing: Backing) -> (Persistence.PageWrites, Persistence.RangeSync) {
        var writes: Persistence.PageWrites
        let rangeSync: Persistence.RangeSync
        switch backing {
        case .blockDevice:
            (writes, rangeSync) = (.pwrite, .range)
        case .characterDevice:
            (writes, rangeSync) = (.mapped, .range)
        case .file:
            switch fd.fileSystem {
            case .memory: (writes, rangeSync) = (.mapped, .range)
            case .ext4, .xfs: (writes, rangeSync) = (.pwrite, .range)
            case .other: (writes, rangeSync) = (.pwrite, .wholeFile)
            }
        }
        if let forced = getenv("PMEM_NBD_PAGE_WRITES").map({ String(cString: $0) }), let w = Persistence.PageWrites(rawValue: forced) {
            writes = w
        }
        return (writes, rangeSync)
    }

    /// A superblock error that names the file and, when the backup copy at 4096 is good, says
    /// how to restore it.
    static func damagedHeader(_ error: PoolError, path: String, fd: FileDescriptor, available: UInt64) -> PoolError {
        guard case .badPool = error.kind else { return PoolError(error.kind, "\(path): \(error.message)") }
        var hint = ""
        if available >= UInt64(PoolLayout.backupSuperblockOffset + Superblock.encodedSize),
           let bytes = try? fd.read(at: PoolLayout.backupSuperblockOffset, count: Superblock.encodedSize),
           bytes.withUnsafeBytes({ b in (try? Superblock.decode(b, available: available)) != nil }) {
            hint = "; its backup header is intact: run 'pmem-nbd check --repair \(path)'"
        }
        return PoolError(.badPool, "\(path): \(error.message)\(hint)")
    }

    static func readSuperblock(_ fd: FileDescriptor, available: UInt64) throws(PoolError) -> Superblock {
        let buf: [UInt8]
        do { buf = try fd.read(at: 0, count: Superblock.encodedSize) } catch {
            throw PoolError.system(error, "cannot read the pool header")
        }
        let r: Result<Superblock, PoolError> = buf.withUnsafeBytes { b in
            Result { () throws(PoolError) in try Superblock.decode(b, available: available) }
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
            do { return try fd.blockDeviceSize() } catch { throw PoolError.system(error, "BLKGETSIZE64") }
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
}

func readSmallFile(_ path: String) -> String? {
    guard let fd = try? FileDescriptor.open(path, O_RDONLY) else { return nil }
    defer { fd.close() }
    guard let bytes = try? fd.read(at: 0, count: 4096) else { return nil }
    return String(decoding: bytes, as: UTF8.self)
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
