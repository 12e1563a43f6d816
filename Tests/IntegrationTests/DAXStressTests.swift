import CLibNBD
import Foundation
import Glibc
import PmemDAX
import PmemNBD
import PmemSystem
import Synchronization
@testable import TestSupport
import Testing

/// The DAX coherence stress test: NBD writers (libnbd), a loop of snapshot create / delete /
/// rollback, and DAX readers through the library, all at once on a small pool so freed blocks
/// are reused quickly.
///
/// Odd-numbered readers also borrow blocks in place (`withMappedBlock`, zero copy) and look at
/// them twice: a borrowed block may be older than the volume but must be the block's own and
/// must not change while lent — only the read lease's quarantine guarantees that.
///
/// Every written block carries (magic, block index, write ID, CRC of the rest). A DAX read of
/// block b over the interval [t0, t1] that returned write ID W is correct only if some version V
/// of b that holds W (a write, or a rollback that restored W) began before t1 and was not
/// certainly overwritten before t0 — no later version V' began after V finished and finished
/// before t0. A block from someone else (wrong index), a torn or mixed block (bad CRC), or
/// content that had already been overwritten is a violation. Reading a physical block that was
/// reused while a lease covered it shows up as one of those: the reuser writes another block
/// index or a newer write ID the reader should not see yet.
///
/// `PMEM_NBD_DAX_READS` sets the number of DAX reads (default 30 000; the long mode is 1 000 000
/// or more, e.g. `PMEM_NBD_DAX_READS=1000000 swift test -c release --filter DAXStress`).
@Suite(.timeLimit(.minutes(5))) struct DAXStressTests {
    @Test func daxReadsNeverSeeStaleOrReusedBlocks() throws {
        let target = ProcessInfo.processInfo.environment["PMEM_NBD_DAX_READS"].flatMap(Int.init) ?? 30_000
        let run = try StressRun(blocks: 1024, writers: 2, readers: 2, targetReads: target)
        let report = try run.go()
        print("dax stress: \(report)")
        #expect(report.violations.isEmpty, "\(report.violations.prefix(10))")
        #expect(report.reads >= target)
        #expect(report.direct > report.reads / 2, "most reads were served from pool memory")
        #expect(report.writes > 1000 && report.snapshots > 2 && report.rollbacks > 0 && report.deletes > 0,
                "the run exercised writes, snapshots, rollbacks and deletes")
        #expect(report.retries > 0, "some reads overlapped a remap and were retried")
    }

    /// The checker is not vacuous: reads recorded as having seen an overwritten version, a
    /// torn block, or another block's data are reported.
    @Test func checkerCatchesStaleTornAndForeignReads() {
        var history = BlockHistory()
        history.add(block: 3, value: 10, issue: 100, ack: 200)
        history.add(block: 3, value: 11, issue: 300, ack: 400)
        history.prepare()
        #expect(history.possible(block: 3, value: 10, t0: 150, t1: 350))
        #expect(history.possible(block: 3, value: 11, t0: 250, t1: 350))
        #expect(!history.possible(block: 3, value: 10, t0: 450, t1: 500), "overwritten before the read began")
        #expect(!history.possible(block: 3, value: 11, t0: 50, t1: 90), "not written yet")
        #expect(history.possible(block: 3, value: 0, t0: 50, t1: 150), "still unwritten")
        #expect(!history.possible(block: 3, value: 0, t0: 250, t1: 260))
        var b = [UInt8](repeating: 0, count: 4096)
        StressBlock.fill(&b, block: 7, value: 99)
        #expect(StressBlock.decode(b, block: 7) == .value(99))
        #expect(StressBlock.decode(b, block: 8) == .foreign)
        b[2000] ^= 1
        #expect(StressBlock.decode(b, block: 7) == .torn)
    }
}

/// What a stress block holds.
enum StressBlock: Equatable {
    case zero, value(UInt64), foreign, torn

    static let magic: UInt64 = 0x5353_4552_5453_5844 // "DXSTRESS"

    static func fill(_ b: inout [UInt8], block: UInt64, value: UInt64) {
        b.withUnsafeMutableBytes { p in
            var x = value &* 0x9E37_79B9_7F4A_7C15 ^ block
            for i in stride(from: 32, to: 4096, by: 8) {
                x ^= x << 13; x ^= x >> 7; x ^= x << 17
                p.storeBytes(of: x, toByteOffset: i, as: UInt64.self)
            }
            p.storeBytes(of: magic, toByteOffset: 0, as: UInt64.self)
            p.storeBytes(of: block, toByteOffset: 8, as: UInt64.self)
            p.storeBytes(of: value, toByteOffset: 16, as: UInt64.self)
            let sum = PersistentMemory.crc32c(p.baseAddress! + 32, count: 4096 - 32, seed: UInt32(truncatingIfNeeded: value ^ block))
            p.storeBytes(of: UInt64(sum), toByteOffset: 24, as: UInt64.self)
        }
    }

    static func decode(_ b: UnsafeRawBufferPointer, block: UInt64) -> StressBlock {
        let m = b.load(fromByteOffset: 0, as: UInt64.self)
        if m == 0 {
            return b.allSatisfy { $0 == 0 } ? .zero : .torn
        }
        guard m == magic else { return .torn }
        guard b.load(fromByteOffset: 8, as: UInt64.self) == block else { return .foreign }
        let value = b.load(fromByteOffset: 16, as: UInt64.self)
        let sum = PersistentMemory.crc32c(b.baseAddress! + 32, count: 4096 - 32, seed: UInt32(truncatingIfNeeded: value ^ block))
        return b.load(fromByteOffset: 24, as: UInt64.self) == UInt64(sum) ? .value(value) : .torn
    }

    static func decode(_ b: [UInt8], block: UInt64) -> StressBlock { b.withUnsafeBytes { decode($0, block: block) } }
}

/// Every version each block went through: (value, issue time, acknowledgement time), value 0
/// being the initial zeros.
struct BlockHistory {
    struct Version { var value: UInt64; var issue: UInt64; var ack: UInt64 }
    private var versions: [UInt64: [Version]] = [:]
    /// Per block, after `prepare`: versions sorted by issue time, the least acknowledgement time
    /// from each index on, and where each value's versions are.
    private var suffixMinAck: [UInt64: [UInt64]] = [:]
    private var byValue: [UInt64: [UInt64: [Int]]] = [:]
    private var prepared = true

    mutating func add(block: UInt64, value: UInt64, issue: UInt64, ack: UInt64) {
        versions[block, default: [Version(value: 0, issue: 0, ack: 0)]].append(Version(value: value, issue: issue, ack: ack))
        prepared = false
    }

    /// Call once after the last `add`.
    mutating func prepare() {
        for (b, list) in versions {
            let sorted = list.sorted { $0.issue < $1.issue }
            versions[b] = sorted
            var mins = [UInt64](repeating: .max, count: sorted.count + 1)
            for i in stride(from: sorted.count - 1, through: 0, by: -1) { mins[i] = min(mins[i + 1], sorted[i].ack) }
            suffixMinAck[b] = mins
            var index: [UInt64: [Int]] = [:]
            for (i, v) in sorted.enumerated() { index[v.value, default: []].append(i) }
            byValue[b] = index
        }
        prepared = true
    }

    /// Whether `value` may have been in `block` at some instant in [t0, t1]: a version V holding
    /// it began before t1, and no version that began after V finished had finished before t0.
    func possible(block: UInt64, value: UInt64, t0: UInt64, t1: UInt64) -> Bool {
        precondition(prepared, "prepare() after the last add")
        guard let list = versions[block], let mins = suffixMinAck[block] else { return value == 0 }
        for i in byValue[block]?[value] ?? [] where list[i].issue < t1 {
            // The first version issued after V was acknowledged.
            var lo = i + 1, hi = list.count
            while lo < hi {
                let mid = (lo + hi) / 2
                if list[mid].issue > list[i].ack { hi = mid } else { lo = mid + 1 }
            }
            if mins[lo] >= t0 { return true }
        }
        return false
    }
}

/// One stress run (see DAXStressTests).
final class StressRun: @unchecked Sendable {
    let blocks: UInt64
    static let hot: UInt64 = 16
    let writerCount: Int
    let readerCount: Int
    let targetReads: Int
    let server: TestServer

    /// Writers pause here while the snapshot loop works; a new generation means "reconnect"
    /// (a rollback disconnects the volume's NBD clients).
    let gate = PosixCondition()
    var paused = false
    var idleWriters = 0
    var generation = 0
    let stop = Atomic<Bool>(false)
    let readsDone = Atomic<Int>(0)
    let writesDone = Atomic<Int>(0)

    /// Logs, each written by one thread and read after the run.
    /// One log per thread, each appended to by its thread alone (boxes, so threads never
    /// mutate a shared array).
    final class Log<Entry>: @unchecked Sendable { var entries: [Entry] = [] }
    let writeLogs: [Log<(block: UInt64, value: UInt64, issue: UInt64, ack: UInt64)>]
    let readLogs: [Log<(block: UInt64, result: StressBlock, t0: UInt64, t1: UInt64, lent: Bool)>]
    var rollbackLog: [(values: [UInt64: UInt64], issue: UInt64, ack: UInt64)] = []
    var errors: [String] = []
    let errorLock = PosixMutex()
    var snapshots = 0, deletes = 0, rollbacks = 0
    var direct = 0, retries = 0

    init(blocks: UInt64, writers: Int, readers: Int, targetReads: Int) throws {
        self.blocks = blocks
        writerCount = writers
        readerCount = readers
        self.targetReads = targetReads
        // 40 MiB: 16 MiB of metadata, the 4 MiB volume, a few snapshots' worth of copies and
        // little else, so freed blocks come back into use within a few thousand writes.
        server = try TestServer(size: 40 << 20, volumeSize: blocks << 12, withFeed: true)
        writeLogs = (0..<writers).map { _ in Log() }
        readLogs = (0..<readers).map { _ in Log() }
    }

    struct Report: CustomStringConvertible {
        var reads = 0, direct = 0, retries = 0, writes = 0, snapshots = 0, deletes = 0, rollbacks = 0
        var violations: [String] = []
        var description: String {
            "\(reads) DAX reads (\(direct) direct, \(retries) retried), \(writes) NBD writes, \(snapshots) snapshots, \(deletes) deletes, \(rollbacks) rollbacks, \(violations.count) violations"
        }
    }

    func fail(_ s: String) { errorLock.withLock { errors.append(s) } }

    func go() throws -> Report {
        // Every block starts with a known value.
        let seed = try server.client()
        var buf = [UInt8](repeating: 0, count: 4096)
        var firstValues: [UInt64: UInt64] = [:]
        for b in 0..<blocks {
            let value = (b + 1) << 8
            StressBlock.fill(&buf, block: b, value: value)
            let t0 = now()
            try seed.pwrite(buf, offset: b << 12)
            writeLogs[0].entries.append((b, value, t0, now()))
            firstValues[b] = value
        }
        let wg = WaitGroup()
        func spawn(_ name: String, _ body: @escaping @Sendable () -> Void) {
            wg.enter()
            OSThread.spawn(name: name) { body(); wg.leave() }
        }
        for w in 0..<writerCount { spawn("stress-writer-\(w)") { [self] in writer(w) } }
        for r in 0..<readerCount { spawn("stress-reader-\(r)") { [self] in reader(r) } }
        spawn("stress-snapshots") { [self] in snapshotLoop() }
        _ = wg.wait()

        var report = Report()
        report.reads = readLogs.reduce(0) { $0 + $1.entries.count }
        report.writes = writeLogs.reduce(0) { $0 + $1.entries.count }
        report.snapshots = snapshots
        report.deletes = deletes
        report.rollbacks = rollbacks
        report.direct = direct
        report.retries = retries
        report.violations = errors
        var history = BlockHistory()
        for log in writeLogs { for w in log.entries { history.add(block: w.block, value: w.value, issue: w.issue, ack: w.ack) } }
        for rb in rollbackLog { for (b, v) in rb.values { history.add(block: b, value: v, issue: rb.issue, ack: rb.ack) } }
        history.prepare()
        for log in readLogs {
            for r in log.entries {
                switch r.result {
                case .torn: report.violations.append("block \(r.block): torn or mixed content (\(r.lent ? "lent" : "copied"))")
                case .foreign: report.violations.append("block \(r.block): another block's data (\(r.lent ? "lent" : "copied"))")
                case .zero where r.lent, .value(0) where r.lent:
                    break
                case .value(let v) where r.lent:
                    // A lent block may be older than the volume, never from the future.
                    if !history.possible(block: r.block, value: v, t0: 0, t1: r.t1) {
                        report.violations.append("block \(r.block): lent block holds value \(v), never written before \(r.t1)")
                    }
                case .zero:
                    if !history.possible(block: r.block, value: 0, t0: r.t0, t1: r.t1) { report.violations.append("block \(r.block): zeros") }
                case .value(let v):
                    if !history.possible(block: r.block, value: v, t0: r.t0, t1: r.t1) {
                        report.violations.append("block \(r.block): value \(v) was not current during [\(r.t0), \(r.t1)]")
                    }
                }
            }
        }
        return report
    }

    /// Waits at the gate while paused; returns whether to reconnect.
    func checkGate(_ seen: inout Int) -> Bool {
        gate.lock()
        defer { gate.unlock() }
        if paused {
            idleWriters += 1
            gate.broadcast()
            while paused { _ = gate.wait(seconds: 1) }
            idleWriters -= 1
        }
        defer { seen = generation }
        return generation != seen
    }

    func writer(_ w: Int) {
        do {
            var c = try server.client()
            var seen = 0
            var rng = SystemRandomNumberGenerator()
            var buf = [UInt8](repeating: 0, count: 4096)
            var n: UInt64 = 1
            while !stop.load(ordering: .relaxed) {
                if checkGate(&seen) { c = try server.client() }
                // Writer w owns the blocks b ≡ w (mod writers): a block's versions are sequential.
                // Half the writes go to 16 hot blocks, which therefore move all the time.
                let span = Bool.random(using: &rng) ? StressRun.hot : blocks
                let b = UInt64.random(in: 0..<(span / UInt64(writerCount)), using: &rng) * UInt64(writerCount) + UInt64(w)
                let value = (n << 8) | UInt64(w + 1) << 4 | 1
                n += 1
                StressBlock.fill(&buf, block: b, value: value)
                let t0 = now()
                try c.pwrite(buf, offset: b << 12)
                writeLogs[w].entries.append((b, value, t0, now()))
                writesDone.add(1, ordering: .relaxed)
            }
        } catch {
            fail("writer \(w): \(error)")
        }
        stop.store(true, ordering: .relaxed)
    }

    func reader(_ r: Int) {
        do {
            let dax = try DAXPool(feed: server.feedPath, nbd: server.socketPath, name: "stress-reader-\(r)")
            defer { dax.close() }
            let vol = try dax.volume(named: "vol0")
            let buf = UnsafeMutableRawBufferPointer.allocate(byteCount: 4096, alignment: 4096)
            defer { buf.deallocate() }
            // Odd readers borrow blocks in place (zero copy) every other read.
            var lend = false
            var lent = 0
            while !stop.load(ordering: .relaxed) {
                lend = r % 2 == 1 && !lend
                let b = UInt64.random(in: 0..<(lend ? StressRun.hot : blocks))
                let t0 = now()
                if lend, let seen = try vol.withMappedBlock(b, { p -> StressBlock in
                    // Look twice, letting the writers run in between: a lent block must not
                    // change under the borrower, whatever the server does meanwhile.
                    let first = StressBlock.decode(p, block: b)
                    lent += 1
                    // Now and then hold on for a few milliseconds: several commits go by, and
                    // without the quarantine the block would be reused meanwhile.
                    if lent % 8 == 0 { usleep(2000) } else { sched_yield() }
                    let second = StressBlock.decode(p, block: b)
                    if first != second {
                        fail("block \(b): lent block changed from \(first) to \(second) while borrowed")
                    }
                    return first
                }) {
                    readLogs[r].entries.append((b, seen, t0, now(), true))
                    errorLock.withLock { direct += 1 }
                } else {
                    let path = try vol.read(offset: b << 12, count: 4096, into: buf.baseAddress!)
                    let t1 = now()
                    readLogs[r].entries.append((b, StressBlock.decode(UnsafeRawBufferPointer(buf), block: b), t0, t1, false))
                    if path == .direct { errorLock.withLock { direct += 1 } }
                }
                readsDone.add(1, ordering: .relaxed)
            }
            errorLock.withLock { retries += dax.retries }
        } catch {
            fail("reader \(r): \(error)")
            stop.store(true, ordering: .relaxed)
        }
    }

    /// Pauses the writers, waits until they are idle (every write acknowledged), runs `body`,
    /// and lets them go on.
    func quiesced(reconnect: Bool = false, _ body: () throws -> Void) rethrows {
        gate.withLock {
            paused = true
            while idleWriters < writerCount && !stop.load(ordering: .relaxed) { _ = gate.wait(seconds: 0.1) }
        }
        defer {
            gate.withLock {
                if reconnect { generation += 1 }
                paused = false
                gate.broadcast()
            }
        }
        try body()
    }

    /// The current value of every block, from the logs (valid while the writers are idle).
    func currentValues() -> [UInt64: UInt64] {
        var values: [UInt64: (UInt64, UInt64)] = [:] // block → (ack, value)
        for log in writeLogs { for w in log.entries where (values[w.block]?.0 ?? 0) <= w.ack { values[w.block] = (w.ack, w.value) } }
        var result = values.mapValues { $0.1 }
        // A rollback after the last write of a block restored the snapshot's value.
        if let last = rollbackLog.last {
            for (b, v) in last.values where (values[b]?.0 ?? 0) < last.ack { result[b] = v }
        }
        return result
    }

    func snapshotLoop() {
        var live: [(name: String, values: [UInt64: UInt64])] = []
        var n = 0
        while !stop.load(ordering: .relaxed) {
            // Runs until the readers reach their target and every kind of change happened a few
            // times under load.
            if readsDone.load(ordering: .relaxed) >= targetReads && writesDone.load(ordering: .relaxed) >= max(6000, targetReads / 100)
                && snapshots >= 6 && deletes >= 3 && rollbacks >= 3 {
                stop.store(true, ordering: .relaxed)
                break
            }
            usleep(10_000)
            let op = n % 5
            n += 1
            if op == 4, let s = live.randomElement() {
                // Rollback: every block goes back to the snapshot's value.
                quiesced(reconnect: true) {
                    let t0 = now()
                    let r = VolumeRequests.perform(["op": "snapshot-rollback", "name": s.name], on: server.pool)
                    let t1 = now()
                    if r["ok"] as? Bool == true {
                        rollbackLog.append((s.values, t0, t1))
                        rollbacks += 1
                    } else { fail("rollback: \(r)") }
                }
            } else if op == 2 && live.count > 1 || live.count >= 3 {
                let s = live.removeFirst()
                let r = VolumeRequests.perform(["op": "snapshot-delete", "name": s.name], on: server.pool)
                if r["ok"] as? Bool == true { deletes += 1 } else { fail("delete: \(r)") }
            } else {
                quiesced {
                    let name = "vol0@s\(n)"
                    let r = VolumeRequests.perform(["op": "snapshot-create", "name": name], on: server.pool)
                    if r["ok"] as? Bool == true {
                        live.append((name, currentValues()))
                        snapshots += 1
                    } else { fail("snapshot: \(r)") }
                }
            }
        }
        // Let paused writers see the stop.
        gate.withLock { paused = false; gate.broadcast() }
    }
}

func now() -> UInt64 {
    var ts = timespec()
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return UInt64(ts.tv_sec) * 1_000_000_000 + UInt64(ts.tv_nsec)
}
