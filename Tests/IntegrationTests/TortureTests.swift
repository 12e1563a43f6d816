import CLibNBD
import FeedWire
import Foundation
import Glibc
import PmemDAX
import PmemFeedClient
import PmemNBD
import PmemPool
import PmemSystem
import PmemVolumes
import Synchronization
@testable import TestSupport
import Testing

/// The torture run's length (PMEM_NBD_TORTURE_SECONDS; 20 s in the suite).
let tortureSeconds: Int = ProcessInfo.processInfo.environment["PMEM_NBD_TORTURE_SECONDS"].flatMap(Int.init) ?? 20

/// The model-based DAX torture test (Docs/FEED.md, "The torture test"): every kind of
/// operation that moves, frees, recalls or fences at once against one in-process server, and
/// every result checked afterwards against a model of what each block may hold.
///
/// `PMEM_NBD_TORTURE_SECONDS` sets the length (default 20; `scripts/torture 600` is the long
/// run). Guarantees checked: G1 (copy reads), G2 (loans, of volumes, snapshots and clones),
/// G3/G4 (no block reused while a session may read it, whole-map frees after their event),
/// G5 (write leases recalled before a snapshot, a rollback or an NBD write moves their
/// blocks), G6 (holders told), G7 (stores after FENCED reach nothing), G8 (requests from many
/// threads on one connection), G9 (handles and reused names).
@Suite(.timeLimit(.minutes(tortureSeconds / 60 + 8))) struct TortureTests {
    static let seconds = tortureSeconds

    @Test(.timeLimit(.minutes(TortureTests.seconds / 60 + (TortureTests.seconds > 60 ? 6 : 2))))
    func daxCoherenceUnderAttack() throws {
        let run = try TortureRun(seconds: Double(TortureTests.seconds))
        let report = try run.go()
        print("dax torture:\n\(report)")
        #expect(report.violations.isEmpty, "\(report.violations.prefix(20).joined(separator: "\n"))")
        // The negative control: a reader that maps blocks without a lease and copies them
        // later without looking at the status page. A checker that does not flag it is vacuous.
        #expect(report.negativeFlagged > 0, "the checker did not flag the negative control's \(report.negativeReads) reads")
        #expect(report.missing.isEmpty, "operations that never happened: \(report.missing)")
    }

    /// The checker itself flags what it must (a unit test of the model, independent of timing).
    @Test(.timeLimit(.minutes(1)))
    func checkerFlagsStaleForeignTornAndPoisonedBlocks() {
        var b = [UInt8](repeating: 0, count: 4096)
        b.withUnsafeMutableBytes { TortureStamp.fill($0.baseAddress!, family: 1, block: 7, version: 42) }
        #expect(b.withUnsafeBytes { TortureStamp.decode($0, family: 1, block: 7) } == .value(42))
        #expect(b.withUnsafeBytes { TortureStamp.decode($0, family: 1, block: 8) } == .foreign(1, 7))
        #expect(b.withUnsafeBytes { TortureStamp.decode($0, family: 2, block: 7) } == .foreign(1, 7))
        b[3000] ^= 1
        #expect(b.withUnsafeBytes { TortureStamp.decode($0, family: 1, block: 7) } == .torn)
        b.withUnsafeMutableBytes { TortureStamp.fill($0.baseAddress!, family: 1, block: 7, version: 5 | TortureStamp.poison) }
        #expect(b.withUnsafeBytes { TortureStamp.decode($0, family: 1, block: 7) } == .poison(5 | TortureStamp.poison))
        var m = TortureModel(blocks: 16)
        m.version(block: 3, value: 10, issue: 100, ack: 200)
        m.version(block: 3, value: 11, issue: 300, ack: 400)
        m.window(block: 4, from: 500, to: 600)
        m.prepare()
        #expect(m.check(block: 3, seen: .value(10), t0: 150, t1: 350) == nil)
        #expect(m.check(block: 3, seen: .value(10), t0: 450, t1: 460) != nil, "overwritten before the read")
        #expect(m.check(block: 3, seen: .value(11), t0: 50, t1: 90) != nil, "not written yet")
        #expect(m.check(block: 3, seen: .torn, t0: 150, t1: 350) != nil, "torn outside a direct store")
        #expect(m.check(block: 4, seen: .torn, t0: 550, t1: 700) == nil, "torn during a direct store")
        #expect(m.check(block: 4, seen: .foreign(1, 5), t0: 550, t1: 700) != nil)
        #expect(m.check(block: 3, seen: .poison(7), t0: 0, t1: 1000) != nil)
    }
}

// MARK: stamps

/// A 4 KiB block that says what it is: magic, family (volume lineage), block, version, CRC-32C
/// of the rest (a fill derived from the header). Same layout as `pmem-dax-read --stamp-writer`.
enum TortureStamp {
    static let magic: UInt64 = 0x5254_524F_5458_4144
    /// Versions stored after FENCED carry this bit: they must never be seen anywhere.
    static let poison: UInt64 = 1 << 63

    enum Seen: Equatable, Sendable {
        case zero
        case value(UInt64)
        case torn
        /// Another family's or another block's stamp: (family, block) found.
        case foreign(UInt64, UInt64)
        case poison(UInt64)
    }

    static func fill(_ p: UnsafeMutableRawPointer, family: UInt64, block: UInt64, version: UInt64) {
        var x = version &* 0x9E37_79B9_7F4A_7C15 ^ block ^ family << 32 | 1
        for i in stride(from: 40, to: 4096, by: 8) {
            x ^= x << 13; x ^= x >> 7; x ^= x << 17
            p.storeBytes(of: x, toByteOffset: i, as: UInt64.self)
        }
        p.storeBytes(of: magic, toByteOffset: 0, as: UInt64.self)
        p.storeBytes(of: family, toByteOffset: 8, as: UInt64.self)
        p.storeBytes(of: block, toByteOffset: 16, as: UInt64.self)
        p.storeBytes(of: version, toByteOffset: 24, as: UInt64.self)
        let sum = PersistentMemory.crc32c(p + 40, count: 4096 - 40, seed: UInt32(truncatingIfNeeded: version ^ block ^ family))
        p.storeBytes(of: UInt64(sum), toByteOffset: 32, as: UInt64.self)
    }

    static func decode(_ b: UnsafeRawBufferPointer, family: UInt64, block: UInt64) -> Seen {
        let m = b.load(fromByteOffset: 0, as: UInt64.self)
        if m != magic { return m == 0 && b.allSatisfy({ $0 == 0 }) ? .zero : .torn }
        let f = b.load(fromByteOffset: 8, as: UInt64.self), blk = b.load(fromByteOffset: 16, as: UInt64.self)
        let version = b.load(fromByteOffset: 24, as: UInt64.self)
        let sum = PersistentMemory.crc32c(b.baseAddress! + 40, count: 4096 - 40, seed: UInt32(truncatingIfNeeded: version ^ blk ^ f))
        guard b.load(fromByteOffset: 32, as: UInt64.self) == UInt64(sum) else { return .torn }
        if version & poison != 0 { return .poison(version) }
        guard f == family, blk == block else { return .foreign(f, blk) }
        return .value(version)
    }
}

// MARK: the model

/// What each block of the volume may hold: its versions (value, issue, acknowledgement time;
/// 0 = zeros, and every block starts as zeros at time 0) and windows in which it may hold
/// anything of its own, torn included (a direct store in progress, a holder that died
/// mid-store until the block is rewritten). Lookups are logarithmic: a long run checks
/// millions of reads against hundreds of thousands of versions.
struct TortureModel {
    private struct Block {
        var versions: [(value: UInt64, issue: UInt64, ack: UInt64)] = [(0, 0, 0)]
        var windows: [(from: UInt64, to: UInt64)] = []
        // After prepare():
        var suffixMinAck: [UInt64] = []
        var byValue: [UInt64: [Int]] = [:]
        /// Per value: the greatest acknowledgement time among its versions up to each one.
        var byValueMaxAck: [UInt64: [UInt64]] = [:]
        var windowMaxTo: [UInt64] = []
    }
    private var blocks: [Block]

    init(blocks: Int) { self.blocks = Array(repeating: Block(), count: blocks) }

    mutating func version(block: UInt64, value: UInt64, issue: UInt64, ack: UInt64) {
        blocks[Int(block)].versions.append((value, issue, ack))
    }

    mutating func window(block: UInt64, from: UInt64, to: UInt64) { blocks[Int(block)].windows.append((from, to)) }

    /// Call once after the last `version` and `window`.
    mutating func prepare() {
        for i in blocks.indices {
            blocks[i].versions.sort { $0.issue < $1.issue }
            let v = blocks[i].versions
            var mins = [UInt64](repeating: .max, count: v.count + 1)
            for k in stride(from: v.count - 1, through: 0, by: -1) { mins[k] = min(mins[k + 1], v[k].ack) }
            blocks[i].suffixMinAck = mins
            var index: [UInt64: [Int]] = [:]
            for (k, x) in v.enumerated() { index[x.value, default: []].append(k) }
            blocks[i].byValue = index
            blocks[i].byValueMaxAck = index.mapValues { list in
                var m: UInt64 = 0
                return list.map { m = max(m, v[$0].ack); return m }
            }
            blocks[i].windows.sort { $0.from < $1.from }
            var m: UInt64 = 0
            blocks[i].windowMaxTo = blocks[i].windows.map { m = max(m, $0.to); return m }
        }
    }

    /// Whether some window of the block overlaps [t0, t1].
    func inWindow(_ block: UInt64, _ t0: UInt64, _ t1: UInt64) -> Bool {
        let b = blocks[Int(block)]
        // The last window starting at or before t1; the latest end among those up to it.
        var lo = 0, hi = b.windows.count
        while lo < hi {
            let mid = (lo + hi) / 2
            if b.windows[mid].from <= t1 { lo = mid + 1 } else { hi = mid }
        }
        return lo > 0 && b.windowMaxTo[lo - 1] >= t0
    }

    /// Whether `value` was the block's at some instant in [t0, t1]: a version V holding it was
    /// issued before t1, and no version issued after V was acknowledged had been acknowledged
    /// before t0.
    func possible(block: UInt64, value: UInt64, t0: UInt64, t1: UInt64) -> Bool {
        let b = blocks[Int(block)]
        guard let candidates = b.byValue[value], let maxAck = b.byValueMaxAck[value] else { return false }
        // Candidates issued before t1, latest first (the likeliest to be still current).
        var lo = 0, hi = candidates.count
        while lo < hi {
            let mid = (lo + hi) / 2
            if b.versions[candidates[mid]].issue < t1 { lo = mid + 1 } else { hi = mid }
        }
        var k = lo - 1
        // A candidate fails when a version issued after its acknowledgement was acknowledged
        // before t0; that version disqualifies every candidate acknowledged no later. So once
        // the candidates left were all acknowledged no later than one that failed, stop.
        var failedAck: UInt64?
        while k >= 0 {
            if let f = failedAck, maxAck[k] <= f { return false }
            let i = candidates[k]
            if let f = failedAck, b.versions[i].ack <= f {
                k -= 1
                continue
            }
            // The first version issued after V was acknowledged.
            var a = i + 1, z = b.versions.count
            while a < z {
                let mid = (a + z) / 2
                if b.versions[mid].issue > b.versions[i].ack { z = mid } else { a = mid + 1 }
            }
            if b.suffixMinAck[a] >= t0 { return true }
            failedAck = max(failedAck ?? 0, b.versions[i].ack)
            k -= 1
        }
        return false
    }

    /// nil if a read of `block` over [t0, t1] may have seen `seen`; else why not.
    func check(block: UInt64, seen: TortureStamp.Seen, t0: UInt64, t1: UInt64) -> String? {
        switch seen {
        case .poison(let v): return "block \(block): a store made after FENCED (version \(v & ~TortureStamp.poison)) is visible"
        case .foreign(let f, let b): return "block \(block): holds family \(f) block \(b)"
        case .torn: return inWindow(block, t0, t1) ? nil : "block \(block): torn or mixed content"
        case .zero:
            return possible(block: block, value: 0, t0: t0, t1: t1) || inWindow(block, t0, t1) ? nil : "block \(block): zeros were not current during [\(t0), \(t1)]"
        case .value(let v):
            return possible(block: block, value: v, t0: t0, t1: t1) || inWindow(block, t0, t1) ? nil
                : "block \(block): version \(v) was not current during [\(t0), \(t1)]"
        }
    }
}

// MARK: the run

final class TortureRun: @unchecked Sendable {
    // Layout of vol0 (1024 blocks, two map leaves):
    static let blocks: UInt64 = 1024
    /// NBD writers own [0, 768); the first 32 blocks are hot.
    static let nbdBlocks: UInt64 = 768
    static let hot: UInt64 = 32
    /// Write-lease slots of 64 blocks from 768: two good holders, the ignoring holder, the
    /// crashing child.
    static func slot(_ k: UInt64) -> UInt64 { 768 + 64 * k }
    static let family: UInt64 = 1, otherFamily: UInt64 = 2

    let seconds: Double
    let server: TestServer
    var pool: Pool { server.pool }
    let vol0: UInt64
    let stop = Atomic<Bool>(false)
    let versionCounter = Atomic<UInt64>(1)
    func nextVersion() -> UInt64 { versionCounter.add(1, ordering: .relaxed).oldValue << 8 }

    /// One log per thread (each appended to by its thread alone, read after the run).
    final class Log: @unchecked Sendable {
        var versions: [(block: UInt64, value: UInt64, issue: UInt64, ack: UInt64)] = []
        var windows: [(block: UInt64, from: UInt64, to: UInt64)] = []
        /// Reads of vol0 (`negative`: the negative control's).
        var reads: [(block: UInt64, seen: TortureStamp.Seen, t0: UInt64, t1: UInt64, loan: Bool)] = []
        /// Reads of snapshots and clones, by record id.
        var recordReads: [(record: UInt64, block: UInt64, seen: TortureStamp.Seen, t0: UInt64, t1: UInt64)] = []
        /// Loans of snapshots and clones: record, interval (for coverage: did one span a deletion?).
        var recordLoans: [(record: UInt64, t0: UInt64, t1: UInt64)] = []
        /// Name lookups: name, id returned, interval.
        var lookups: [(name: String, id: UInt64, t0: UInt64, t1: UInt64)] = []
        /// Reads that failed: record, interval, message.
        var failures: [(record: UInt64, t0: UInt64, t1: UInt64, message: String)] = []
        var violations: [String] = []
        /// Reads not logged once the log is full (the long run keeps one in 16 after that).
        var unlogged = 0
        private var offered = 0
        static let cap = 1_500_000
        private func keep(_ count: Int) -> Bool {
            offered += 1
            if count < Log.cap || offered % 16 == 0 { return true }
            unlogged += 1
            return false
        }
        func read(_ b: UInt64, _ seen: TortureStamp.Seen, _ t0: UInt64, _ t1: UInt64, loan: Bool = false) {
            if keep(reads.count) { reads.append((b, seen, t0, t1, loan)) }
        }
        func recordRead(_ r: UInt64, _ b: UInt64, _ seen: TortureStamp.Seen, _ t0: UInt64, _ t1: UInt64) {
            if keep(recordReads.count) { recordReads.append((r, b, seen, t0, t1)) }
        }
    }
    private let logLock = PosixMutex()
    private var logs: [Log] = []
    func newLog() -> Log { let l = Log(); logLock.withLock { logs.append(l) }; return l }
    let negative = Log()
    /// Threads that failed (any thread may add).
    let threadFailures = Shared<[String]>([])

    /// The controller's records (its thread alone writes them while the run lasts).
    var captures: [UInt64: [TortureStamp.Seen]] = [:]
    var captureWindows: [UInt64: (UInt64, UInt64)] = [:]
    var cloneSource: [UInt64: UInt64] = [:]
    /// Every record created: name, creation start, deletion start and end (nil while it lives).
    var lifetimes: [UInt64: (name: String, created: UInt64, deleting: UInt64?, deleted: UInt64?)] = [:]
    let control = Log()

    /// Live names for the snapshot reader to look up (guarded by `namesLock`).
    private let namesLock = PosixMutex()
    private var liveNames: [String] = []
    func names() -> [String] { namesLock.withLock { liveNames } }
    func setNames(_ n: [String]) { namesLock.withLock { liveNames = n } }

    /// Counts of everything that happened.
    final class Counts: @unchecked Sendable {
        private let lock = PosixMutex()
        private var c: [String: Int] = [:]
        func add(_ k: String, _ n: Int = 1) { lock.withLock { c[k, default: 0] += n } }
        var all: [String: Int] { lock.withLock { c } }
    }
    let counts = Counts()

    /// NBD clients of vol0 pause here for a rollback (which disconnects them) and reconnect.
    let gate = PosixCondition()
    var paused = false
    var parked = 0
    var generation = 0
    static let gatedThreads = 3

    init(seconds: Double) throws {
        self.seconds = seconds
        server = try TestServer(size: 48 << 20, volumeSize: TortureRun.blocks << 12, withFeed: true, recallDeadline: 1, ackDeadline: 10)
        vol0 = server.pool.volume(named: "vol0")!.id
        let r = VolumeRequests.perform(["op": "volume-create", "name": "other", "size": 4 << 20], on: server.pool)
        guard r["ok"] as? Bool == true else { throw DAXError("create other: \(r)") }
    }

    func now() -> UInt64 { IntegrationTests.now() }
    var running: Bool { !stop.load(ordering: .relaxed) }

    // MARK: running

    struct Report: CustomStringConvertible {
        var counts: [String: Int] = [:]
        var readsChecked = 0, readsUnlogged = 0
        var negativeReads = 0, negativeFlagged = 0
        var violations: [String] = []
        var missing: [String] = []
        var history = ""
        var seconds = 0.0, checkSeconds = 0.0
        var description: String {
            var lines = ["\(Int(seconds)) s (checked in \(Int(checkSeconds)) s); \(readsChecked) reads checked against the model (\(readsUnlogged) more not logged); \(violations.count) violations"]
            lines.append("negative control: \(negativeFlagged) of \(negativeReads) reads flagged")
            lines.append(counts.sorted { $0.key < $1.key }.map { "\($0.key) \($0.value)" }.joined(separator: ", "))
            if let fences = counts["holder fenced after ignoring a recall"], fences > 0, let ms = counts["recall to FENCED (ms, summed)"] {
                lines.append("recall to FENCED: \(ms / fences) ms on average")
            }
            return lines.joined(separator: "\n") + (history.isEmpty ? "" : "\n" + history)
        }
    }

    func go() throws -> Report {
        let started = now()
        // Every block of vol0 starts with a stamp, every block of `other` too.
        let seed = try server.client()
        let setup = newLog()
        let buf = UnsafeMutableRawPointer.allocate(byteCount: 1 << 20, alignment: 4096)
        defer { buf.deallocate() }
        for chunk in 0..<(TortureRun.blocks / 256) {
            var values: [UInt64] = []
            for i in 0..<256 {
                let v = nextVersion()
                values.append(v)
                TortureStamp.fill(buf + i << 12, family: TortureRun.family, block: chunk * 256 + UInt64(i), version: v)
            }
            let t0 = now()
            try seed.pwrite(Array(UnsafeRawBufferPointer(start: buf, count: 1 << 20)), offset: chunk << 20)
            let t1 = now()
            for (i, v) in values.enumerated() { setup.versions.append((chunk * 256 + UInt64(i), v, t0, t1)) }
        }

        var threads: [(String, Background)] = []
        func spawn(_ name: String, _ body: @escaping @Sendable () throws -> Void) {
            threads.append((name, Background(name) { [self] in
                do { try body() } catch {
                    if running { threadFailures.update { $0.append("\(name) failed: \(error)") } }
                    throw error
                }
            }))
        }
        let shared = try DAXPool(feed: server.feedPath, nbd: server.socketPath, writable: true, name: "shared")
        let snapshotOnly = try DAXPool(feed: server.feedPath, nbd: server.socketPath, name: "snapshot-only")
        for w in 0..<2 { spawn("writer-\(w)") { [self] in try nbdWriter(w) } }
        spawn("intruder") { [self] in try intruder() }
        spawn("other") { [self] in try otherWriter() }
        for r in 0..<2 { spawn("reader-\(r)") { [self] in try volumeReader(shared, r) } }
        spawn("lister") { [self] in try lister(shared) }
        for k in 0..<2 { spawn("holder-\(k)") { [self] in try goodHolder(shared, UInt64(k)) } }
        spawn("ignorer") { [self] in try ignoringHolder() }
        spawn("snapshot-reader") { [self] in try snapshotReader(snapshotOnly) }
        spawn("negative") { [self] in try negativeControl() }
        do {
            try controller(until: started + UInt64(seconds * 1e9))
        } catch {
            control.violations.append("controller failed: \(error)")
        }
        stop.store(true, ordering: .relaxed)
        gate.withLock { paused = false; gate.broadcast() }
        for (name, t) in threads {
            if let problem = t.join(timeout: 60), problem.contains("did not finish") { threadFailures.update { $0.append("\(name) \(problem)") } }
        }
        control.violations += threadFailures.get
        shared.close()
        snapshotOnly.close()
        try finalCheck()
        // The pool itself: a copy taken after a sync (what a crash would leave) must pass check.
        try pool.engine.sync()
        let copy = server.scratch.file("pool-copy")
        try FileManager.default.copyItem(atPath: server.poolPath, toPath: copy)
        let fsck = try PoolCheck.run(path: copy, repair: false)
        for problem in fsck.problems { control.violations.append("pmem-nbd check: \(problem)") }
        counts.add("pmem-nbd check of the pool after the run (problems)", fsck.problems.count)
        let checking = now()
        var report = check()
        report.seconds = Double(checking - started) / 1e9
        report.checkSeconds = Double(now() - checking) / 1e9
        return report
    }

    // MARK: NBD writers

    /// Waits at the gate while a rollback is prepared; true when the client must reconnect.
    func atGate(_ seen: inout Int) -> Bool {
        gate.lock()
        defer { gate.unlock() }
        if paused {
            parked += 1
            gate.broadcast()
            while paused && running { _ = gate.wait(seconds: 0.1) }
            parked -= 1
        }
        defer { seen = generation }
        return generation != seen
    }

    /// Writes `count` blocks from `first`, each a new stamp, as one NBD request; logs them.
    func stampWrite(_ c: NBDClient, _ log: Log, first: UInt64, count: Int, fua: Bool, buf: UnsafeMutableRawPointer) throws {
        var values: [UInt64] = []
        for i in 0..<count {
            let v = nextVersion()
            values.append(v)
            TortureStamp.fill(buf + i << 12, family: TortureRun.family, block: first + UInt64(i), version: v)
        }
        let t0 = now()
        try c.pwrite(Array(UnsafeRawBufferPointer(start: buf, count: count << 12)), offset: first << 12, flags: fua ? LibNBDFlags.fua : 0)
        let t1 = now()
        for (i, v) in values.enumerated() { log.versions.append((first + UInt64(i), v, t0, t1)) }
    }

    func nbdWriter(_ w: Int) throws {
        let log = newLog()
        var c = try server.client()
        var seen = 0
        var rng = SystemRandomNumberGenerator()
        let buf = UnsafeMutableRawPointer.allocate(byteCount: 8 << 12, alignment: 4096)
        defer { buf.deallocate() }
        while running {
            if atGate(&seen) { c = try server.client() }
            if !running { break }
            let hot = Bool.random(using: &rng)
            let first = UInt64.random(in: 0..<(hot ? TortureRun.hot : TortureRun.nbdBlocks - 8), using: &rng)
            let roll = Int.random(in: 0..<100, using: &rng)
            switch roll {
            case 0..<55:
                let fua = roll < 12
                try stampWrite(c, log, first: first, count: 1, fua: fua, buf: buf)
                counts.add(fua ? "nbd write fua" : "nbd write")
            case 55..<70:
                let n = Int.random(in: 2...8, using: &rng)
                try stampWrite(c, log, first: first, count: n, fua: false, buf: buf)
                counts.add("nbd multi-block write")
            case 70..<80:
                let n = UInt64.random(in: 1...8, using: &rng)
                let t0 = now()
                try c.trim(count: n << 12, offset: first << 12)
                let t1 = now()
                for b in first..<(first + n) { log.versions.append((b, 0, t0, t1)) }
                counts.add("nbd trim")
            case 80..<90:
                let n = UInt64.random(in: 1...8, using: &rng)
                let noHole = Bool.random(using: &rng)
                let t0 = now()
                try c.zero(count: n << 12, offset: first << 12, flags: noHole ? LibNBDFlags.noHole : 0)
                let t1 = now()
                for b in first..<(first + n) { log.versions.append((b, 0, t0, t1)) }
                counts.add(noHole ? "nbd write-zeroes (no hole)" : "nbd write-zeroes")
            case 90..<92 where w == 0:
                // A whole map leaf: dropped from its parent at once.
                let t0 = now()
                try c.trim(count: 512 << 12, offset: 0)
                let t1 = now()
                for b in 0..<UInt64(512) { log.versions.append((b, 0, t0, t1)) }
                counts.add("nbd whole-leaf trim")
            default:
                try c.flush()
                counts.add("nbd flush")
            }
        }
    }

    /// NBD writes into the write-lease slots: each recalls the holder of the range first.
    func intruder() throws {
        let log = newLog()
        var c = try server.client()
        var seen = 0
        var rng = SystemRandomNumberGenerator()
        let buf = UnsafeMutableRawPointer.allocate(byteCount: 4096, alignment: 4096)
        defer { buf.deallocate() }
        while running {
            if atGate(&seen) { c = try server.client() }
            if !running { break }
            usleep(UInt32.random(in: 5_000...30_000, using: &rng))
            let b = UInt64.random(in: TortureRun.slot(0)..<TortureRun.blocks, using: &rng)
            if Int.random(in: 0..<10, using: &rng) == 0 {
                let t0 = now()
                try c.trim(count: 4096, offset: b << 12)
                log.versions.append((b, 0, t0, now()))
                counts.add("nbd trim into a write lease")
            } else {
                try stampWrite(c, log, first: b, count: 1, fua: false, buf: buf)
                counts.add("nbd write into a write lease")
            }
        }
    }

    /// Another volume, written and trimmed fast: its stamps fill blocks vol0 and its snapshots
    /// freed, so a block reused too early shows another family's data.
    func otherWriter() throws {
        let c = try server.client { try $0.setExportName("other") }
        var rng = SystemRandomNumberGenerator()
        let buf = UnsafeMutableRawPointer.allocate(byteCount: 16 << 12, alignment: 4096)
        defer { buf.deallocate() }
        var n: UInt64 = 0
        while running {
            let first = UInt64.random(in: 0..<(1024 - 16), using: &rng)
            if Int.random(in: 0..<8, using: &rng) == 0 {
                try c.trim(count: 16 << 12, offset: first << 12)
                counts.add("other trim")
                continue
            }
            for i in 0..<16 {
                n += 1
                TortureStamp.fill(buf + i << 12, family: TortureRun.otherFamily, block: first + UInt64(i), version: n)
            }
            try c.pwrite(Array(UnsafeRawBufferPointer(start: buf, count: 16 << 12)), offset: first << 12)
            counts.add("other write")
        }
    }

    // MARK: DAX readers

    /// Copy reads and loans of vol0 through the shared pool.
    func volumeReader(_ dax: DAXPool, _ r: Int) throws {
        let log = newLog()
        var vol = try dax.volume(named: "vol0")
        var rng = SystemRandomNumberGenerator()
        let buf = UnsafeMutableRawPointer.allocate(byteCount: 4 << 12, alignment: 4096)
        defer { buf.deallocate() }
        var i = 0
        while running {
            i += 1
            if i % 2000 == 0 { vol = try dax.volume(named: "vol0") }
            let hot = Bool.random(using: &rng)
            if Int.random(in: 0..<10, using: &rng) < 3 {
                let b = UInt64.random(in: 0..<(hot ? TortureRun.hot : TortureRun.blocks), using: &rng)
                let hold = Int.random(in: 0..<8, using: &rng)
                let t0 = now()
                let seen = try vol.withMappedBlock(b) { p -> TortureStamp.Seen in
                    let first = TortureStamp.decode(p, family: TortureRun.family, block: b)
                    let sum = PersistentMemory.crc32c(p)
                    if hold == 0 { usleep(UInt32.random(in: 500...3000)) } else { sched_yield() }
                    if PersistentMemory.crc32c(p) != sum || TortureStamp.decode(p, family: TortureRun.family, block: b) != first {
                        // A write-lease holder may be storing into it (direct stores are not
                        // out of place): that is checked against the model instead.
                        if b < TortureRun.nbdBlocks { log.violations.append("G2: vol0 block \(b) changed while lent (was \(first))") }
                    }
                    return first
                }
                if let seen {
                    log.read(b, seen, t0, now(), loan: true)
                    counts.add("loan of vol0")
                }
            } else {
                let n = Int.random(in: 1...4, using: &rng)
                let b = UInt64.random(in: 0...(TortureRun.blocks - UInt64(n)), using: &rng)
                let t0 = now()
                let path: DAXReadPath
                do {
                    path = try vol.read(offset: b << 12, count: n << 12, into: buf)
                } catch let e as DAXError where e.description.contains("kept moving") {
                    // Allowed (G1: the right bytes or an error), if rare.
                    counts.add("copy read gave up (blocks kept moving)")
                    continue
                }
                let t1 = now()
                for k in 0..<n {
                    log.read(b + UInt64(k), TortureStamp.decode(UnsafeRawBufferPointer(start: buf + k << 12, count: 4096), family: TortureRun.family,
                                                                 block: b + UInt64(k)), t0, t1)
                }
                counts.add(path == .direct ? "copy read of vol0 (direct)" : "copy read of vol0 (NBD)")
            }
        }
        if r == 0 { counts.add("copy reads retried", dax.retries) }
    }

    /// Lists volumes and looks names up on the shared connection while the others use it.
    func lister(_ dax: DAXPool) throws {
        let log = newLog()
        while running {
            usleep(3_000)
            try dax.refreshVolumes()
            counts.add("volume list (pipelined)")
            if let name = names().randomElement() {
                let t0 = now()
                if let v = try? dax.volume(named: name) { log.lookups.append((name, v.info.id, t0, now())) }
            }
        }
    }

    /// Reads only snapshots and clones (its session never leases vol0): copy reads and loans
    /// through handles opened by name, kept after the name was deleted and reused.
    func snapshotReader(_ dax: DAXPool) throws {
        let log = newLog()
        var rng = SystemRandomNumberGenerator()
        var handles: [DAXVolume] = []
        let buf = UnsafeMutableRawPointer.allocate(byteCount: 4 << 12, alignment: 4096)
        defer { buf.deallocate() }
        while running {
            if handles.isEmpty || Int.random(in: 0..<20, using: &rng) == 0 {
                // Half the time the oldest snapshot: the next to be deleted.
                let all = names()
                guard let name = Bool.random(using: &rng) ? all.first : all.randomElement() else { usleep(10_000); continue }
                let t0 = now()
                guard let h = try? dax.volume(named: name) else { continue }
                log.lookups.append((name, h.info.id, t0, now()))
                handles.append(h)
                if handles.count > 4 { handles.removeFirst() }
            }
            let h = handles.randomElement()!
            // Half the time a hot block: the snapshots' copies of those differ from one another,
            // so deleting a snapshot frees them.
            let b = UInt64.random(in: 0..<(Bool.random(using: &rng) ? TortureRun.hot : TortureRun.blocks - 4), using: &rng)
            let t0 = now()
            do {
                if Bool.random(using: &rng) {
                    // One loan in four is held long enough for a deletion, the deleter and
                    // the reuse of what it freed to happen meanwhile.
                    let hold = Int.random(in: 0..<4, using: &rng) == 0 ? UInt32.random(in: 100_000...300_000, using: &rng)
                        : UInt32.random(in: 0...4000, using: &rng)
                    let seen = try h.withMappedBlock(b) { p -> TortureStamp.Seen in
                        let first = TortureStamp.decode(p, family: TortureRun.family, block: b)
                        let sum = PersistentMemory.crc32c(p)
                        usleep(hold)
                        if PersistentMemory.crc32c(p) != sum { log.violations.append("G2: block \(b) of \(h.info.name) (id \(h.info.id)) changed while lent") }
                        return first
                    }
                    if let seen {
                        let t1 = now()
                        log.recordRead(h.info.id, b, seen, t0, t1)
                        log.recordLoans.append((h.info.id, t0, t1))
                        counts.add("loan of a snapshot or clone")
                    }
                } else {
                    let n = Int.random(in: 1...4, using: &rng)
                    try h.read(offset: b << 12, count: n << 12, into: buf)
                    let t1 = now()
                    for k in 0..<n {
                        log.recordRead(h.info.id, b + UInt64(k), TortureStamp.decode(UnsafeRawBufferPointer(start: buf + k << 12, count: 4096),
                                                                                    family: TortureRun.family, block: b + UInt64(k)), t0, t1)
                    }
                    counts.add("copy read of a snapshot or clone")
                }
            } catch {
                log.failures.append((h.info.id, t0, now(), "\(error)"))
                if "\(error)".contains("was deleted") {
                    counts.add("read through a handle of a deleted record refused")
                    handles.removeAll { $0 === h }
                }
            }
        }
    }

    /// The negative control: maps vol0 with MAP queries (no lease: nothing pinned) and copies
    /// blocks from pool memory later without looking at the status page.
    func negativeControl() throws {
        let c = try FeedConnection(path: server.feedPath, name: "negative-control")
        guard let fd = c.poolFD else { throw DAXError("no pool descriptor") }
        let w = c.welcome!
        guard let map = mmap(nil, Int(w.poolSize), PROT_READ, MAP_SHARED, fd.rawValue, 0), map != MAP_FAILED else { throw DAXError("mmap") }
        defer { munmap(map, Int(w.poolSize)) }
        var tv = timeval(tv_sec: 5, tv_usec: 0)
        setsockopt(c.fd.rawValue, SOL_SOCKET, SO_RCVTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
        var rng = SystemRandomNumberGenerator()
        var request: UInt64 = 1
        while running {
            try c.requestMap(request, volume: vol0, first: 0, count: UInt32(TortureRun.blocks))
            var blocks: [UInt64] = []
            while let (type, payload) = try c.receive() {
                guard type == FeedMessage.mapReply.rawValue else { continue }
                var r = FeedReader(payload)
                guard try r.u64() == request else { continue }
                _ = try r.u64(); _ = try r.u64(); _ = try r.u64()
                let n = Int(try r.u32())
                _ = try r.u32()
                blocks = try (0..<n).map { _ in try r.u64() }
                break
            }
            request += 1
            let end = now() + 300_000_000
            while running && now() < end {
                let b = UInt64.random(in: 0..<(Bool.random(using: &rng) ? TortureRun.hot : TortureRun.blocks), using: &rng)
                let p = blocks[Int(b)]
                let t0 = now()
                let seen: TortureStamp.Seen
                if p == 0 {
                    seen = .zero
                } else {
                    seen = TortureStamp.decode(UnsafeRawBufferPointer(start: map + Int(w.blockAreaOffset) + Int(p) << 12, count: 4096),
                                               family: TortureRun.family, block: b)
                }
                negative.read(b, seen, t0, now())
                counts.add("negative-control read")
                usleep(200)
            }
        }
    }

    // MARK: write-lease holders

    /// A holder that plays by the rules on the shared connection: stores only inside
    /// `withStores`, which a recall closes; takes a new lease when one ends.
    func goodHolder(_ dax: DAXPool, _ k: UInt64) throws {
        let log = newLog()
        let vol = try dax.volume(named: "vol0")
        var rng = SystemRandomNumberGenerator()
        let stamp = UnsafeMutableRawPointer.allocate(byteCount: 4096, alignment: 4096)
        defer { stamp.deallocate() }
        while running {
            let count = UInt64.random(in: 4...16, using: &rng)
            let first = TortureRun.slot(k) + UInt64.random(in: 0...(64 - count), using: &rng)
            let recalled = Shared(false)
            let lease: DAXWriteLease
            do {
                lease = try vol.writeLease(first: first, count: UInt32(count)) { recalled.set(true) }
            } catch {
                // Refused while the range is being moved (a snapshot, a rollback): try again.
                usleep(5_000)
                continue
            }
            counts.add("write lease (good holder)")
            let budget = Int.random(in: 5...200, using: &rng)
            var stores = 0
            while running && stores < budget {
                let i = Int.random(in: 0..<Int(count), using: &rng)
                let v = nextVersion()
                TortureStamp.fill(stamp, family: TortureRun.family, block: first + UInt64(i), version: v)
                var t0: UInt64 = 0, t1: UInt64 = 0
                do {
                    try lease.withStores {
                        t0 = now()
                        lease.pointer(i).copyMemory(from: stamp, byteCount: 4096)
                        t1 = now()
                    }
                } catch { break }
                log.versions.append((first + UInt64(i), v, t0, t1))
                log.windows.append((first + UInt64(i), t0, t1))
                stores += 1
                counts.add("direct store (good holder)")
                usleep(UInt32.random(in: 0...300, using: &rng))
            }
            if lease.state == .held {
                try lease.release()
                counts.add("write lease released by its holder")
            }
            let end = lease.waitUntilEnded(timeout: 30)
            switch end {
            case .returned: counts.add(recalled.get ? "write lease recalled and returned" : "write lease release confirmed")
            case .fenced: log.violations.append("G7: a holder that answered in time was fenced (lease \(lease.id))")
            default: log.violations.append("G6: lease \(lease.id) ended \(end)")
            }
            if recalled.get && !(end == .returned || end == .fenced) { log.violations.append("G6: lease \(lease.id) recalled but \(end)") }
        }
    }

    /// A holder that stops storing when recalled but never answers: fenced each time. After
    /// FENCED it stores poison into its old blocks (which must reach nothing), then
    /// reconnects.
    func ignoringHolder() throws {
        let log = newLog()
        var rng = SystemRandomNumberGenerator()
        let stamp = UnsafeMutableRawPointer.allocate(byteCount: 4096, alignment: 4096)
        defer { stamp.deallocate() }
        while running {
            let dax = try DAXPool(feed: server.feedPath, nbd: server.socketPath, writable: true, name: "ignoring-holder")
            defer { dax.close() }
            let vol = try dax.volume(named: "vol0")
            let count = UInt64.random(in: 2...8, using: &rng)
            let first = TortureRun.slot(2) + UInt64.random(in: 0...(64 - count), using: &rng)
            let recalled = Shared<UInt64>(0)
            let fenced = Shared(false)
            let lease: DAXWriteLease
            do {
                lease = try vol.writeLease(first: first, count: UInt32(count)) {
                    recalled.set(IntegrationTests.now())
                    // Ignores the recall: returns only once fenced (the deadline is 1 s).
                    _ = eventually(timeout: 20) { fenced.get }
                }
            } catch {
                usleep(20_000)
                continue
            }
            counts.add("write lease (ignoring holder)")
            while running && recalled.get == 0 {
                let i = Int.random(in: 0..<Int(count), using: &rng)
                let v = nextVersion()
                TortureStamp.fill(stamp, family: TortureRun.family, block: first + UInt64(i), version: v)
                let t0 = now()
                guard recalled.get == 0 else { break }
                lease.pointer(i).copyMemory(from: stamp, byteCount: 4096)
                let t1 = now()
                log.versions.append((first + UInt64(i), v, t0, t1))
                log.windows.append((first + UInt64(i), t0, t1))
                counts.add("direct store (ignoring holder)")
                usleep(UInt32.random(in: 100...2000, using: &rng))
            }
            guard running else { fenced.set(true); break }
            let state = lease.waitUntilEnded(timeout: 30)
            fenced.set(true)
            guard state == .fenced else {
                log.violations.append("G7: a holder that ignored a recall ended \(state), not fenced")
                continue
            }
            counts.add("holder fenced after ignoring a recall")
            counts.add("recall to FENCED (ms, summed)", Int((now() - recalled.get) / 1_000_000))
            // Stores after FENCED: they must reach no volume and no snapshot.
            for i in 0..<Int(count) {
                TortureStamp.fill(stamp, family: TortureRun.family, block: first + UInt64(i), version: nextVersion() | TortureStamp.poison)
                lease.pointer(i).copyMemory(from: stamp, byteCount: 4096)
                counts.add("store after FENCED (poison)")
            }
            lease.flush()
            usleep(UInt32.random(in: 100_000...1_000_000, using: &rng))
        }
    }

    // MARK: the controller

    func controller(until end: UInt64) throws {
        var rng = SystemRandomNumberGenerator()
        let snapNames = ["s0", "s1", "s2", "s3"]
        var live: [(name: String, id: UInt64)] = []
        var clone: UInt64?
        var lastRollback = now(), lastClone = now(), nextKill: UInt64 = 0
        var child: TortureChild?
        defer {
            // On the way out (an error too): the child's stores go into the model all the same.
            if let c = child {
                let (versions, torn) = c.kill()
                control.versions += versions
                for v in versions { control.windows.append((v.block, v.issue, v.ack)) }
                for (b, from) in torn { control.windows.append((b, from, .max)) }
            }
        }
        var childTag: UInt64 = 1
        func publishNames() { setNames(live.map { "vol0@\($0.name)" } + (clone == nil ? [] : ["cl"])) }
        func perform(_ request: [String: Any]) throws {
            let r = VolumeRequests.perform(request, on: pool)
            guard r["ok"] as? Bool == true else { throw DAXError("\(request): \(r)") }
        }
        while now() < end {
            usleep(UInt32.random(in: 100_000...300_000, using: &rng))
            // The crashing holder: started, and killed at a random moment.
            if let c = child, now() >= nextKill {
                try killChild(c)
                child = nil
            } else if child == nil {
                childTag += 1
                child = try TortureChild(run: self, first: TortureRun.slot(3) + UInt64.random(in: 0...48, using: &rng),
                                         count: UInt64.random(in: 4...16, using: &rng), tag: childTag)
                nextKill = now() + UInt64.random(in: 200_000_000...2_000_000_000, using: &rng)
                counts.add("crashing holder started")
            }
            // The oldest snapshot goes first: the copy-on-write burst that follows the next
            // snapshot reuses at once what the deletion freed (the allocator hands out the most
            // recently freed blocks first), while sessions may still be lending them.
            if live.count >= 3 {
                let victim = live.removeFirst()
                publishNames()
                lifetimes[victim.id]?.deleting = now()
                try perform(["op": "snapshot-delete", "name": "vol0@\(victim.name)"])
                lifetimes[victim.id]?.deleted = now()
                counts.add("snapshot delete")
            }
            // A snapshot, read back at once through NBD: its content is what the model checks
            // every later read of it against.
            if let name = snapNames.first(where: { n in !live.contains { $0.name == n } }) {
                let t0 = now()
                try perform(["op": "snapshot-create", "name": "vol0@\(name)"])
                let t1 = now()
                guard let id = pool.volume(named: "vol0@\(name)")?.id else { throw DAXError("no vol0@\(name)") }
                lifetimes[id] = ("vol0@\(name)", t0, nil, nil)
                if lifetimes.values.contains(where: { $0.name == "vol0@\(name)" && $0.deleted != nil }) { counts.add("snapshot name reused") }
                try capture(id, "vol0@\(name)", window: (t0, t1))
                live.append((name, id))
                counts.add("snapshot")
                publishNames()
            }
            if now() - lastClone > 2_000_000_000, let source = live.randomElement() {
                lastClone = now()
                if let old = clone {
                    clone = nil
                    publishNames()
                    lifetimes[old]?.deleting = now()
                    try perform(["op": "volume-delete", "name": "cl"])
                    lifetimes[old]?.deleted = now()
                    counts.add("clone delete")
                }
                let t0 = now()
                try perform(["op": "clone", "source": "vol0@\(source.name)", "name": "cl"])
                guard let id = pool.volume(named: "cl")?.id else { throw DAXError("no clone") }
                lifetimes[id] = ("cl", t0, nil, nil)
                cloneSource[id] = source.id
                clone = id
                counts.add("clone")
                publishNames()
            }
            if now() - lastRollback > 3_000_000_000, let target = live.randomElement() {
                lastRollback = now()
                try rollback(to: target.id, "vol0@\(target.name)")
            }
        }
        if let c = child {
            child = nil
            try killChild(c)
        }
    }

    /// Reads a new snapshot whole through NBD and records it (checked against the model later).
    func capture(_ id: UInt64, _ name: String, window: (UInt64, UInt64)) throws {
        let c = try server.client { try $0.setExportName(name) }
        let data = try c.pread(count: Int(TortureRun.blocks) << 12, offset: 0)
        captures[id] = data.withUnsafeBytes { p in
            (0..<Int(TortureRun.blocks)).map { b in
                TortureStamp.decode(UnsafeRawBufferPointer(rebasing: p[(b << 12)..<((b + 1) << 12)]), family: TortureRun.family, block: UInt64(b))
            }
        }
        captureWindows[id] = window
    }

    /// Rolls vol0 back with its NBD clients parked (a rollback disconnects them).
    func rollback(to id: UInt64, _ name: String) throws {
        let parkedAll = gate.withLock { () -> Bool in
            paused = true
            let deadline = now() + 20_000_000_000
            while parked < TortureRun.gatedThreads && running && now() < deadline { _ = gate.wait(seconds: 0.1) }
            return parked == TortureRun.gatedThreads
        }
        if !parkedAll { threadFailures.update { $0.append("rollback: the NBD writers did not park within 20 s") } }
        defer { gate.withLock { generation += 1; paused = false; gate.broadcast() } }
        guard let content = captures[id] else { return }
        let t0 = now()
        let r = VolumeRequests.perform(["op": "snapshot-rollback", "name": name], on: pool)
        let t1 = now()
        guard r["ok"] as? Bool == true else { throw DAXError("rollback: \(r)") }
        for (b, seen) in content.enumerated() {
            switch seen {
            case .zero: control.versions.append((UInt64(b), 0, t0, t1))
            case .value(let v): control.versions.append((UInt64(b), v, t0, t1))
            default: control.windows.append((UInt64(b), t0, t1))
            }
        }
        counts.add("rollback")
    }

    /// Kills the crashing holder (SIGKILL, reaped with a deadline), then rewrites through NBD
    /// every block it may have left half-stored.
    func killChild(_ c: TortureChild) throws {
        let (versions, torn) = c.kill()
        counts.add("crashing holder killed")
        counts.add("direct store (crashing holder)", versions.count)
        control.versions += versions
        for v in versions { control.windows.append((v.block, v.issue, v.ack)) }
        guard !torn.isEmpty else { return }
        // The parked writers do not matter here: one NBD write per block, logged like theirs.
        let w = try server.client()
        let buf = UnsafeMutableRawPointer.allocate(byteCount: 4096, alignment: 4096)
        defer { buf.deallocate() }
        for (b, from) in torn {
            let before = control.versions.count
            try stampWrite(w, control, first: b, count: 1, fua: false, buf: buf)
            control.windows.append((b, from, control.versions[before].ack))
            counts.add("block repaired after a holder died mid-store")
        }
    }

    // MARK: checking

    /// After the run: vol0 read whole through NBD and through a fresh DAX pool must match the
    /// model at the end.
    func finalCheck() throws {
        let t0 = now()
        let data = try server.client().pread(count: Int(TortureRun.blocks) << 12, offset: 0)
        let t1 = now()
        let dax = try DAXPool(feed: server.feedPath, nbd: server.socketPath, name: "final")
        defer { dax.close() }
        let vol = try dax.volume(named: "vol0")
        let buf = UnsafeMutableRawPointer.allocate(byteCount: Int(TortureRun.blocks) << 12, alignment: 4096)
        defer { buf.deallocate() }
        try vol.read(offset: 0, count: Int(TortureRun.blocks) << 12, into: buf)
        let t2 = now()
        data.withUnsafeBytes { p in
            for b in 0..<Int(TortureRun.blocks) {
                control.read(UInt64(b), TortureStamp.decode(UnsafeRawBufferPointer(rebasing: p[(b << 12)..<((b + 1) << 12)]),
                                                            family: TortureRun.family, block: UInt64(b)), t0, t1)
                control.read(UInt64(b), TortureStamp.decode(UnsafeRawBufferPointer(start: buf + b << 12, count: 4096),
                                                            family: TortureRun.family, block: UInt64(b)), t1, t2)
            }
        }
    }

    func check() -> Report {
        var report = Report()
        var model = TortureModel(blocks: Int(TortureRun.blocks))
        let all = logLock.withLock { logs } + [control]
        for log in all {
            for v in log.versions { model.version(block: v.block, value: v.value, issue: v.issue, ack: v.ack) }
            for w in log.windows { model.window(block: w.block, from: w.from, to: w.to) }
        }
        model.prepare()
        var violations: [String] = []
        for log in all {
            violations += log.violations
            report.readsUnlogged += log.unlogged
            for r in log.reads {
                report.readsChecked += 1
                // A loan may be older than the volume (never newer, never foreign, never torn).
                if let why = model.check(block: r.block, seen: r.seen, t0: r.loan ? 0 : r.t0, t1: r.t1) {
                    violations.append("\(r.loan ? "G2 loan" : "G1 copy read") of vol0: \(why)")
                }
            }
            for r in log.recordReads {
                report.readsChecked += 1
                let source = cloneSource[r.record] ?? r.record
                guard let content = captures[source] else {
                    violations.append("G9: read of record \(r.record), which the run never created")
                    continue
                }
                if case .poison = r.seen { violations.append("G7: a store after FENCED is visible in record \(r.record)") }
                if r.seen != content[Int(r.block)] {
                    violations.append("G1/G2: block \(r.block) of record \(r.record) read \(r.seen), it holds \(content[Int(r.block)])")
                }
            }
            for l in log.lookups {
                guard let life = lifetimes[l.id], life.name == l.name else {
                    violations.append("G9: volume(named: \(l.name)) returned id \(l.id), never that name's")
                    continue
                }
                if life.created > l.t1 || (life.deleted.map { $0 < l.t0 } ?? false) {
                    violations.append("G9: volume(named: \(l.name)) returned id \(l.id), which did not hold the name during the call")
                }
            }
            for l in log.recordLoans {
                if let life = lifetimes[l.record], let deleting = life.deleting, l.t0 < deleting, let deleted = life.deleted, l.t1 > deleted {
                    report.counts["loan of a snapshot or clone held through its deletion", default: 0] += 1
                }
            }
            for f in log.failures {
                // A read of a record that lived throughout may not fail.
                if let life = lifetimes[f.record], life.created < f.t0, life.deleting.map({ $0 > f.t1 }) ?? true {
                    violations.append("G1: a read of live record \(f.record) failed: \(f.message)")
                } else {
                    report.counts["read of a deleted record failed cleanly", default: 0] += 1
                }
            }
        }
        // Snapshot contents: each block held at some instant while the snapshot was taken.
        for (id, content) in captures {
            guard let (t0, t1) = captureWindows[id] else { continue }
            for (b, seen) in content.enumerated() {
                if let why = model.check(block: UInt64(b), seen: seen, t0: t0, t1: t1) { violations.append("snapshot \(id) (G5): \(why)") }
            }
        }
        for r in negative.reads {
            report.negativeReads += 1
            if model.check(block: r.block, seen: r.seen, t0: r.t0, t1: r.t1) != nil { report.negativeFlagged += 1 }
        }
        report.violations = violations
        report.counts.merge(counts.all) { $0 + $1 }
        // The history of the first blocks in trouble, to tell a bug from a model error.
        let troubled = Set(violations.compactMap { v -> UInt64? in
            guard let r = v.range(of: "block ") else { return nil }
            return UInt64(v[r.upperBound...].prefix { $0.isNumber })
        }).sorted().prefix(3)
        for b in troubled {
            var lines = ["history of block \(b) (value issue ack, relative to the start; windows):"]
            for log in all { for v in log.versions where v.block == b { lines.append("  v \(v.value) \(v.issue) \(v.ack == .max ? "-" : String(v.ack))") } }
            for log in all { for w in log.windows where w.block == b { lines.append("  w \(w.from) \(w.to)") } }
            report.history += lines.sorted().joined(separator: "\n") + "\n"
        }
        let required = ["nbd write", "nbd write fua", "nbd multi-block write", "nbd trim", "nbd write-zeroes", "nbd write-zeroes (no hole)",
                        "nbd whole-leaf trim", "nbd write into a write lease", "other write", "copy read of vol0 (direct)", "loan of vol0",
                        "loan of a snapshot or clone", "copy read of a snapshot or clone", "volume list (pipelined)",
                        "write lease (good holder)", "write lease recalled and returned", "direct store (good holder)",
                        "holder fenced after ignoring a recall", "store after FENCED (poison)", "crashing holder started",
                        "crashing holder killed", "direct store (crashing holder)", "snapshot", "snapshot delete", "snapshot name reused",
                        "clone", "clone delete", "rollback", "negative-control read"]
        report.missing = required.filter { (report.counts[$0] ?? 0) == 0 }
        return report
    }
}

/// The crashing holder: `pmem-dax-read --stamp-writer` in a child process, its reports read
/// as they come, killed with SIGKILL and reaped (deadlines on both sides).
final class TortureChild: @unchecked Sendable {
    let process: ActivatedProcess
    let lines = Shared<[String]>([])
    let reader: Background
    let first: UInt64, count: UInt64

    static var binary: String { (pmemNBDBinary as NSString).deletingLastPathComponent + "/pmem-dax-read" }

    init(run: TortureRun, first: UInt64, count: UInt64, tag: UInt64) throws {
        self.first = first
        self.count = count
        process = try ActivatedProcess([TortureChild.binary, "--feed", run.server.feedPath, "vol0", "--stamp-writer", String(first), String(count),
                                        String(TortureRun.family), String(tag), "60"],
                                       passing: [], environment: [:], stderrPath: run.server.scratch.file("child-\(tag).err"))
        let fd = process.process.standardOutput!.rawValue
        let lines = self.lines
        reader = Background("child-stdout") {
            var buffer: [UInt8] = []
            var chunk = [UInt8](repeating: 0, count: 65536)
            while true {
                let n = read(fd, &chunk, chunk.count)
                if n <= 0 { break }
                buffer += chunk[0..<n]
                if let last = buffer.lastIndex(of: 10) {
                    let text = String(decoding: buffer[...last], as: UTF8.self)
                    buffer.removeSubrange(...last)
                    lines.update { $0 += text.split(separator: "\n").map(String.init) }
                }
            }
        }
    }

    /// Kills and reaps the child; returns the stores it completed and, per block it may have
    /// left half-written, when that store began.
    func kill() -> (versions: [(block: UInt64, value: UInt64, issue: UInt64, ack: UInt64)], torn: [(UInt64, UInt64)]) {
        _ = process.stop(signal: SIGKILL, timeout: 10)
        _ = reader.join(timeout: 10)
        var versions: [(block: UInt64, value: UInt64, issue: UInt64, ack: UInt64)] = []
        var intent: [UInt64: (UInt64, UInt64)] = [:] // block → (version, issue)
        for line in lines.get {
            let f = line.split(separator: " ")
            guard f.count == 4, let b = UInt64(f[1]), let v = UInt64(f[2]), let t = UInt64(f[3]) else { continue }
            if f[0] == "I" { intent[b] = (v, t) }
            if f[0] == "S", let i = intent.removeValue(forKey: b), i.0 == v { versions.append((b, v, i.1, t)) }
        }
        return (versions, intent.map { ($0.key, $0.value.1) })
    }
}
