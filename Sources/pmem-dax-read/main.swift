// pmem-dax-read: reads a volume of a served pool straight from pool memory through the
// PmemDAX library (falling back to NBD), or with --bench compares 4 KiB read latency through
// DAX and through NBD (libnbd) on the same blocks.
//   pmem-dax-read --feed POOL.feed --nbd SOCK VOLUME OFFSET LENGTH > out
//   pmem-dax-read --feed POOL.feed --nbd SOCK VOLUME --bench N
//   pmem-dax-read --feed POOL.feed VOLUME --hold SECONDS   (read leases on the whole volume,
//     following and acknowledging events: what a busy DAX reader costs the server)
//   pmem-dax-read --feed POOL.feed VOLUME --stamp-writer FIRST COUNT FAMILY TAG SECONDS
//     (a write-lease holder: leases blocks FIRST..<FIRST+COUNT again and again and stores
//     self-describing 4 KiB stamps into them, printing "I block version time" before and
//     "S block version time" after each store (CLOCK_MONOTONIC ns), "L lease" per lease and
//     "E state" when one ends; exits after SECONDS. The DAX torture test kills it at random.)
import CLibNBD
import Glibc
import PmemDAX
import PmemSystem

func fail(_ message: String) -> Never {
    _ = try? FileDescriptor.standardError.writeAll(bytes: Array("pmem-dax-read: \(message)\n".utf8))
    exit(1)
}

/// A number with `digits` decimals.
func fixed(_ x: Double, _ digits: Int = 2) -> String {
    var scale = 1.0
    for _ in 0..<digits { scale *= 10 }
    let n = Int((x * scale).rounded())
    let frac = String(n % Int(scale))
    return "\(n / Int(scale)).\(String(repeating: "0", count: digits - frac.count))\(frac)"
}

let usage = """
usage: pmem-dax-read --feed SOCKET [--nbd SOCKET] VOLUME OFFSET LENGTH   (bytes to standard output)
       pmem-dax-read --feed SOCKET --nbd SOCKET VOLUME --bench N        (DAX vs NBD 4 KiB read latency)
       pmem-dax-read --feed SOCKET VOLUME --hold SECONDS                (hold read leases on the volume)

Reads a volume of a pool a pmem-nbd server serves straight from pool memory, through the
server's mapping-change feed (POOL.feed); ranges it cannot lease are read over NBD (--nbd, the
server's Unix socket). VOLUME is an export name: pmem0 is a new pool's first volume, VOL@SNAP a
snapshot. See pmem-dax-read(1) in Docs/pmem-nbd.1 and Docs/FEED.md.

Example:
  pmem-dax-read --feed pmem-nbd.pool.feed --nbd /tmp/pmem.sock pmem0 0 4096 | od -A d -t x1 | head

"""

func main() {
var args = Array(CommandLine.arguments.dropFirst())
if args.contains("--help") || args.contains("-h") {
    print(usage, terminator: "")
    exit(0)
}
if args == ["--version"] || args == ["-V"] {
    print("pmem-dax-read (pmem-nbd)")
    exit(0)
}
func option(_ name: String) -> String? {
    guard let i = args.firstIndex(of: name), i + 1 < args.count else { return nil }
    defer { args.removeSubrange(i...(i + 1)) }
    return args[i + 1]
}
guard let feed = option("--feed") else { fail("usage: pmem-dax-read --feed SOCKET [--nbd SOCKET] VOLUME (OFFSET LENGTH | --bench N | --hold SECONDS); --help for more") }
let nbdSocket = option("--nbd")
let bench = option("--bench").flatMap { Int($0) }
let hold = option("--hold").flatMap { Double($0) }
let stampWriter = args.firstIndex(of: "--stamp-writer").map { i -> [UInt64] in
    let values = args.dropFirst(i + 1).prefix(5).compactMap { UInt64($0) }
    guard values.count == 5 else { fail("--stamp-writer FIRST COUNT FAMILY TAG SECONDS") }
    args.removeSubrange(i...(i + 5))
    return values
}
guard let volumeName = args.first else { fail("name a volume") }
if let w = stampWriter { writeStamps(feed: feed, volume: volumeName, first: w[0], count: w[1], family: w[2], tag: w[3], seconds: w[4]) }

do {
    let pool = try DAXPool(feed: feed, nbd: nbdSocket)
    let volume = try pool.volume(named: volumeName)
    if let seconds = hold {
        // One read per 2 MiB region leases the whole volume; then the feed thread keeps the
        // map current and acknowledges while this thread waits.
        pool.leaseDuration = max(60, seconds * 2)
        let buf = UnsafeMutableRawPointer.allocate(byteCount: 4096, alignment: 4096)
        var b: UInt64 = 0
        while b < volume.size >> 12 {
            try volume.read(offset: b << 12, count: 4096, into: buf)
            b += 512
        }
        let line = "holding read leases on \(volume.size >> 21) regions of \(volumeName) for \(Int(seconds)) s\n"
        try FileDescriptor.standardOutput.writeAll(bytes: Array(line.utf8))
        usleep(UInt32(seconds * 1_000_000))
    } else if let n = bench {
        guard let nbdSocket else { fail("--bench needs --nbd to compare with") }
        let blocks = max(1, min(volume.size >> 12, 16_384))
        let buf = UnsafeMutableRawPointer.allocate(byteCount: 4096, alignment: 4096)
        var rng = SystemRandomNumberGenerator()
        // Warm up the leases, then time DAX reads.
        for b in 0..<min(blocks, 4096) where b % 512 == 0 { try volume.read(offset: b << 12, count: 4096, into: buf) }
        func clock() -> Double { Double(MonotonicClock.nanoseconds()) }
        var dax: [Double] = []
        for _ in 0..<n {
            let b = UInt64.random(in: 0..<blocks, using: &rng)
            let t0 = clock()
            try volume.read(offset: b << 12, count: 4096, into: buf)
            dax.append(clock() - t0)
        }
        guard let h = nbd_create() else { fail("libnbd") }
        nbd_set_export_name(h, volumeName)
        guard nbd_connect_unix(h, nbdSocket) == 0 else { fail("libnbd: \(String(cString: nbd_get_error()))") }
        var nbd: [Double] = []
        for _ in 0..<n {
            let b = UInt64.random(in: 0..<blocks, using: &rng)
            let t0 = clock()
            guard nbd_pread(h, buf, 4096, b << 12, 0) == 0 else { fail("libnbd read failed") }
            nbd.append(clock() - t0)
        }
        nbd_close(h)
        func pct(_ a: [Double], _ p: Double) -> Double { let s = a.sorted(); return s[min(s.count - 1, Int(Double(s.count) * p))] / 1000 }
        print("4 KiB reads of \(volumeName), \(n) each:")
        print("DAX  p50 \(fixed(pct(dax, 0.5))) us  p99 \(fixed(pct(dax, 0.99))) us")
        print("NBD  p50 \(fixed(pct(nbd, 0.5))) us  p99 \(fixed(pct(nbd, 0.99))) us")
        print("ratio DAX/NBD  p50 \(fixed(pct(dax, 0.5) / pct(nbd, 0.5), 3))  p99 \(fixed(pct(dax, 0.99) / pct(nbd, 0.99), 3))")
        print("direct reads \(pool.daxReads), retries \(pool.retries), NBD fallbacks \(pool.fallbacks)")
    } else {
        guard args.count >= 3, let offset = UInt64(args[1]), let length = Int(args[2]) else { fail("give OFFSET and LENGTH (bytes)") }
        let buf = UnsafeMutableRawPointer.allocate(byteCount: max(1, length), alignment: 4096)
        try volume.read(offset: offset, count: length, into: buf)
        try FileDescriptor.standardOutput.writeAll(UnsafeRawBufferPointer(start: buf, count: length))
    }
    pool.close()
} catch {
    fail("\(error)")
}
}

main()

/// A 4 KiB stamp that says what it is: magic, family (which volume lineage wrote it), block,
/// version, then a CRC-32C of the rest, which is a pseudo-random fill derived from the header.
/// The DAX torture test (Tests/IntegrationTests/TortureTests.swift) decodes the same layout.
func fillStamp(_ p: UnsafeMutableRawPointer, family: UInt64, block: UInt64, version: UInt64) {
    var x = version &* 0x9E37_79B9_7F4A_7C15 ^ block ^ family << 32 | 1
    for i in stride(from: 40, to: 4096, by: 8) {
        x ^= x << 13; x ^= x >> 7; x ^= x << 17
        p.storeBytes(of: x, toByteOffset: i, as: UInt64.self)
    }
    p.storeBytes(of: 0x5254_524F_5458_4144 as UInt64, toByteOffset: 0, as: UInt64.self)
    p.storeBytes(of: family, toByteOffset: 8, as: UInt64.self)
    p.storeBytes(of: block, toByteOffset: 16, as: UInt64.self)
    p.storeBytes(of: version, toByteOffset: 24, as: UInt64.self)
    let sum = PersistentMemory.crc32c(p + 40, count: 4096 - 40, seed: UInt32(truncatingIfNeeded: version ^ block ^ family))
    p.storeBytes(of: UInt64(sum), toByteOffset: 32, as: UInt64.self)
}

/// `--stamp-writer`: see the header comment. Never returns.
func writeStamps(feed: String, volume name: String, first: UInt64, count: UInt64, family: UInt64, tag: UInt64, seconds: UInt64) -> Never {
    // A hard deadline of its own, whatever happens to the parent.
    alarm(UInt32(seconds + 5))
    func emit(_ line: String) { _ = try? FileDescriptor.standardOutput.writeAll(bytes: Array((line + "\n").utf8)) }
    do {
        let pool = try DAXPool(feed: feed, writable: true, name: "stamp-writer-\(tag)")
        let volume = try pool.volume(named: name)
        let end = MonotonicClock.nanoseconds() + seconds * 1_000_000_000
        let stamp = UnsafeMutableRawPointer.allocate(byteCount: 4096, alignment: 4096)
        var n: UInt64 = 0
        var rng = SystemRandomNumberGenerator()
        while MonotonicClock.nanoseconds() < end {
            guard let lease = try? volume.writeLease(first: first, count: UInt32(count), onRecall: {}) else {
                if pool.isFenced { emit("F"); exit(3) }
                usleep(20_000)
                continue
            }
            emit("L \(lease.id)")
            while MonotonicClock.nanoseconds() < end {
                let i = Int.random(in: 0..<Int(count), using: &rng)
                n += 1
                let version = tag << 32 | n
                fillStamp(stamp, family: family, block: first + UInt64(i), version: version)
                let stored: Void? = try? lease.withStores {
                    emit("I \(first + UInt64(i)) \(version) \(MonotonicClock.nanoseconds())")
                    lease.pointer(i).copyMemory(from: stamp, byteCount: 4096)
                    emit("S \(first + UInt64(i)) \(version) \(MonotonicClock.nanoseconds())")
                }
                if stored == nil { break }
                usleep(UInt32.random(in: 50...500, using: &rng))
            }
            emit("E \(lease.waitUntilEnded(timeout: 5))")
        }
        pool.close()
        exit(0)
    } catch {
        fail("\(error)")
    }
}
