import Glibc
import PmemPool
import PmemSystem
import PmemVolumes

/// Damaged media: bad byte ranges from a `--badblocks FILE` (lines `OFFSET LENGTH`, bytes of
/// the pool, `#` comments) and, for a pool on a pmem block device, from its sysfs `badblocks`
/// (`SECTOR COUNT`, 512-byte sectors). Bad blocks are marked in the engine (reads fail with
/// EIO, a write relocates the block, the block is never reused) and reported on the feed with
/// their owners from the reverse map. The sources are read again every two seconds.
public final class MediaErrors: @unchecked Sendable {
    let hub: FeedHub
    let file: String?
    let sysfs: String?
    private var stopping = false
    private let cond = PosixCondition()

    public init(hub: FeedHub, file: String?, poolPath: String) {
        self.hub = hub
        self.file = file
        let base = poolPath.split(separator: "/").last.map(String.init) ?? ""
        let candidate = "/sys/block/\(base)/badblocks"
        sysfs = poolPath.hasPrefix("/dev/") && FileManagerLite.exists(candidate) ? candidate : nil
    }

    /// Reads the sources now, then every two seconds on a background thread.
    public func start() {
        scan()
        guard file != nil || sysfs != nil else { return }
        OSThread.spawn(name: "pmem-badblocks") { [self] in
            cond.lock()
            while !stopping {
                _ = cond.wait(seconds: 2)
                if stopping { break }
                cond.unlock()
                scan()
                cond.lock()
            }
            cond.unlock()
        }
    }

    public func stop() { cond.withLock { stopping = true; cond.broadcast() } }

    /// Physical blocks a list of byte ranges covers (within the block area).
    static func blocks(ranges: [(UInt64, UInt64)], layout: PoolLayout) -> [UInt64] {
        var out: [UInt64] = []
        for (offset, length) in ranges where length > 0 {
            let end = offset + length
            guard end > layout.blockAreaOffset else {
                Log.error("bad media at pool offset \(offset): in the pool's metadata; run 'pmem-nbd check' and restore from backup")
                continue
            }
            let first = (max(offset, layout.blockAreaOffset) - layout.blockAreaOffset) >> 12
            let last = min((end - 1 - layout.blockAreaOffset) >> 12, layout.blockCount - 1)
            if first <= last { out += Array(first...last) }
        }
        return out
    }

    func scan() {
        var ranges: [(UInt64, UInt64)] = []
        if let file, let text = readText(file) { ranges += MediaErrors.parse(text, unit: 1) }
        if let sysfs, let text = readText(sysfs) { ranges += MediaErrors.parse(text, unit: 512) }
        let engine = hub.engine
        let new = engine.markBad(MediaErrors.blocks(ranges: ranges, layout: engine.layout))
        for b in new {
            let owners = (try? hub.pool.owners(of: b)) ?? []
            Log.warning("bad media: physical block \(b)" + (owners.isEmpty ? " (unused)" : ", used by \(owners.map { "volume \($0.0) block \($0.1)" }.joined(separator: ", "))"))
            hub.mediaError(block: b, owners: owners)
        }
    }

    /// Lines of two numbers, multiplied by `unit`.
    static func parse(_ text: String, unit: UInt64) -> [(UInt64, UInt64)] {
        text.split(separator: "\n").compactMap { line in
            let words = line.split(whereSeparator: { $0 == " " || $0 == "\t" })
            guard words.count >= 2, !words[0].hasPrefix("#"), let a = UInt64(words[0]), let b = UInt64(words[1]) else { return nil }
            return (a * unit, b * unit)
        }
    }

    private func readText(_ path: String) -> String? {
        guard let fd = try? FileDescriptor.open(path, O_RDONLY) else { return nil }
        defer { fd.close() }
        guard let bytes = try? fd.read(at: 0, count: 1 << 20) else { return nil }
        return String(decoding: bytes, as: UTF8.self)
    }
}

enum FileManagerLite {
    static func exists(_ path: String) -> Bool {
        var st = stat()
        return stat(path, &st) == 0
    }
}
