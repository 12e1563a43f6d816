import Foundation
@testable import PmemPool
import PmemVolumes
import PmemSystem
@testable import TestSupport

/// Enumerates crash states of the engine (see PersistenceTracer) and checks the guarantees:
/// 1. writes acknowledged with FUA, and every write completed before an acknowledged FLUSH,
///    survive;
/// 2. every 4 KiB block holds one whole version — never a mix;
/// 3. after recovery `check` is clean: no block leaked or owned twice, counters exact.
final class CrashHarness {
    struct Config {
        var domain: Persistence.Domain
        var poolSize: UInt64 = 6 << 20
        var volumeSize: UInt64 = 640 << 12
        var operations = 400
        /// Random subsets of uncertain words tried per crash point.
        var subsetsPerPoint = 8
        /// One crash image in this many also gets crash points enumerated inside its recovery.
        var recoveryCrashEvery = 12
        var seed: UInt64
        /// Deliberate engine bugs (to prove the harness finds them).
        var faults: PoolEngine.Faults = []
        /// Mix snapshot create/delete, clone and rollback into the workload.
        var snapshots = false
        /// Page domain: write the pool the way the engine writes a file on a device (`pwrite`)
        /// or tmpfs (stores through the mapping).
        var pageWrites: Persistence.PageWrites = .mapped
        /// A small journal, so that runs reach the ring's wrap-around and its checkpoints.
        var journalSize: UInt64? = 96 << 10
    }

    let config: Config
    var rng: SplitMix64
    /// Distinct crash images checked (by hash of the image).
    private(set) var distinct = Set<UInt64>()
    private(set) var points = 0
    private(set) var violations: [String] = []
    /// Number of 4 KiB blocks in the volume.
    let blocks: Int

    // The model: per block, the checksums of every version written, and which is durable.
    private var versions: [[UInt32]]
    private var durableIndex: [Int]
    private var latest: [[UInt8]]
    private var phase = ""

    /// Snapshots and clones in the model: exact contents (per-block CRCs) and where they stand.
    enum Status { case creating, live, deleting, gone }
    private var snapshots: [String: (crcs: [UInt32], status: Status)] = [:]
    private var clones: [String: (crcs: [UInt32], status: Status)] = [:]
    /// A rollback in flight: the contents it installs (the volume must be all old or all new).
    private var rollbackTarget: [UInt32]?
    private var serial = 0

    private let scratch: UnsafeMutableRawPointer
    private let verifyCopy: UnsafeMutableRawPointer

    init(_ config: Config) {
        self.config = config
        rng = SplitMix64(seed: config.seed)
        blocks = Int(config.volumeSize >> 12)
        let zero = [UInt8](repeating: 0, count: 4096)
        let zcrc = zero.withUnsafeBytes { PersistentMemory.crc32c($0) }
        versions = Array(repeating: [zcrc], count: blocks)
        durableIndex = Array(repeating: 0, count: blocks)
        latest = Array(repeating: zero, count: blocks)
        scratch = .allocate(byteCount: Int(config.poolSize), alignment: 4096)
        verifyCopy = .allocate(byteCount: Int(config.poolSize), alignment: 4096)
    }

    deinit {
        scratch.deallocate()
        verifyCopy.deallocate()
    }

    /// Runs one workload to the end, checking crash states along the way.
    func run(maxStates: Int) throws {
        let image = UnsafeMutableRawPointer.allocate(byteCount: Int(config.poolSize), alignment: 4096)
        defer { image.deallocate() }
        memset(image, 0, Int(config.poolSize))
        _ = try PoolEngine.format(base: image, poolSize: config.poolSize, volumeName: "vol", volumeSize: config.volumeSize,
                                  journalSize: config.journalSize)
        let tracer = PersistenceTracer(image: UnsafeRawBufferPointer(start: image, count: Int(config.poolSize)))
        tracer.crashPoint = { [unowned self] t, _ in
            if distinct.count < maxStates { crashPoint(t) }
        }
        let engine = try PoolEngine(media: PoolMedia(tracer: tracer, domain: config.domain, pageWrites: config.pageWrites),
                                    commitMode: .inline, faults: config.faults)
        let pool = Pool(engine: engine)
        for i in 0..<config.operations {
            if distinct.count >= maxStates || (!config.faults.isEmpty && !violations.isEmpty) { break }
            // The volume object changes when a rollback replaces the map.
            guard let volume = pool.volume(named: "vol") else { throw PoolError(.notFound, "no volume") }
            try operation(i, volume, pool)
        }
        try engine.sync()
        crashPoint(tracer)
        tracer.crashPoint = nil
        checkpoints = engine.checkpoints
    }

    /// Checkpoints the engine made during the run (the ring filled up).
    private(set) var checkpoints = 0

    // MARK: workload

    private func operation(_ i: Int, _ volume: Volume, _ pool: Pool) throws {
        let r = rng.next() % 100
        let fua = rng.next() % 5 == 0
        if config.snapshots && r >= 86 {
            try snapshotOperation(r, pool)
            return
        }
        switch r {
        case 0..<40:
            let b = Int(rng.next() % UInt64(blocks))
            try write(volume, offset: UInt64(b) << 12, length: 4096, fua: fua, id: i)
        case 40..<55:
            let n = Int(rng.next() % 8) + 2
            let b = Int(rng.next() % UInt64(blocks - n))
            try write(volume, offset: UInt64(b) << 12, length: n << 12, fua: fua, id: i)
        case 55..<70:
            let off = rng.next() % (config.volumeSize - 9000)
            let len = Int(rng.next() % 6000) + 1
            try write(volume, offset: off, length: len, fua: fua, id: i)
        case 70..<78:
            let off = rng.next() % (config.volumeSize / 2)
            let len = rng.next() % (config.volumeSize / 2) + 1
            phase = "trim"
            model(offset: off, length: len, zeroPartial: false)
            try volume.trim(offset: off, length: len, fua: fua)
            if fua { markDurable(offset: off, length: len) }
        case 78..<88:
            let off = rng.next() % (config.volumeSize - 70_000)
            let len = rng.next() % 65_536 + 1
            let noHole = r >= 83
            phase = noHole ? "zero-nohole" : "zero"
            model(offset: off, length: len, zeroPartial: true)
            try volume.writeZeroes(offset: off, length: len, mayTrim: !noHole, fast: false, fua: fua)
            if fua { markDurable(offset: off, length: len) }
        default:
            phase = "flush"
            try volume.flush()
            for b in 0..<blocks { durableIndex[b] = versions[b].count - 1 }
        }
    }

    private func currentCRCs() -> [UInt32] { (0..<blocks).map { versions[$0].last! } }

    /// Snapshot create and delete, clone and rollback: each durable on return.
    private func snapshotOperation(_ r: UInt64, _ pool: Pool) throws {
        let live = snapshots.filter { $0.value.status == .live }.keys.sorted()
        switch r {
        case 86..<91 where snapshots.values.filter({ $0.status != .gone }).count < 3:
            serial += 1
            let name = "s\(serial)"
            phase = "snapshot-create"
            snapshots[name] = (currentCRCs(), .creating)
            try pool.createSnapshot(volume: "vol", snapshot: name)
            snapshots[name]!.status = .live
            // Taking a snapshot makes every completed write durable.
            for b in 0..<blocks { durableIndex[b] = versions[b].count - 1 }
        case 91..<94 where !live.isEmpty:
            let name = live[Int(rng.next() % UInt64(live.count))]
            phase = "snapshot-delete"
            snapshots[name]!.status = .deleting
            try pool.delete("vol@\(name)")
            try pool.runDeletions()
            snapshots[name]!.status = .gone
        case 94..<97 where !live.isEmpty && clones.count < 2:
            let source = live[Int(rng.next() % UInt64(live.count))]
            serial += 1
            let name = "c\(serial)"
            phase = "clone"
            clones[name] = (snapshots[source]!.crcs, .creating)
            try pool.clone("vol@\(source)", as: name)
            clones[name]!.status = .live
        case 97..<100 where !live.isEmpty:
            let name = live[Int(rng.next() % UInt64(live.count))]
            let target = snapshots[name]!.crcs
            phase = "rollback"
            rollbackTarget = target
            try pool.rollback("vol@\(name)")
            rollbackTarget = nil
            for b in 0..<blocks {
                versions[b].append(target[b])
                durableIndex[b] = versions[b].count - 1
                latest[b] = []  // rebuilt below
            }
            // The model's byte contents follow the snapshot's (read back from the pool).
            let v = pool.volume(named: "vol")!
            for b in 0..<blocks { latest[b] = try readBlock(v, b) }
            try pool.runDeletions()
        default:
            phase = "flush"
            try pool.engine.sync()
            for b in 0..<blocks { durableIndex[b] = versions[b].count - 1 }
        }
    }

    private func readBlock(_ v: Volume, _ b: Int) throws -> [UInt8] {
        var out: [UInt8] = []
        try v.read(offset: UInt64(b) << 12, length: 4096) { seg in
            switch seg {
            case .data(let p, let n): out += Array(UnsafeRawBufferPointer(start: p, count: n))
            case .hole(let n): out += [UInt8](repeating: 0, count: n)
            }
        }
        return out
    }

    private func blockCRC(_ v: Volume, _ b: Int) throws -> UInt32 {
        var crc: UInt32 = 0
        try v.read(offset: UInt64(b) << 12, length: 4096) { seg in
            switch seg {
            case .data(let p, let n): crc = PersistentMemory.crc32c(p, count: n, seed: crc)
            case .hole(let n):
                let z = [UInt8](repeating: 0, count: n)
                crc = z.withUnsafeBytes { PersistentMemory.crc32c($0, seed: crc) }
            }
        }
        return crc
    }

    private func write(_ volume: Volume, offset: UInt64, length: Int, fua: Bool, id: Int) throws {
        phase = fua ? "write-fua" : "write"
        var data = [UInt8](repeating: 0, count: length)
        var x = UInt64(id + 1) &* 0x9E37_79B9_7F4A_7C15 ^ offset
        for j in 0..<length {
            x = x &* 6_364_136_223_846_793_005 &+ 1_442_695_040_888_963_407
            data[j] = UInt8(truncatingIfNeeded: x >> 33)
        }
        // The model first: a crash during the operation may show the new versions.
        var pos = offset
        var k = 0
        while pos < offset + UInt64(length) {
            let b = Int(pos >> 12)
            let n = min(Int(4096 - pos & 4095), length - k)
            for j in 0..<n { latest[b][Int(pos & 4095) + j] = data[k + j] }
            versions[b].append(latest[b].withUnsafeBytes { PersistentMemory.crc32c($0) })
            pos += UInt64(n)
            k += n
        }
        try data.withUnsafeBytes { (bytes) throws in
            var source = BufferByteSource(bytes)
            try volume.write(offset: offset, length: length, fua: fua, from: &source)
        }
        if fua { markDurable(offset: offset, length: UInt64(length)) }
    }

    /// Models trim / write-zeroes over [offset, offset+length): whole blocks read as zero;
    /// partial blocks are zeroed only for write-zeroes.
    private func model(offset: UInt64, length: UInt64, zeroPartial: Bool) {
        var pos = offset
        let end = offset + length
        while pos < end {
            let b = Int(pos >> 12)
            let blockEnd = (UInt64(b) + 1) << 12
            let n = Int(min(end, blockEnd) - pos)
            if n == 4096 || zeroPartial {
                for j in 0..<n { latest[b][Int(pos & 4095) + j] = 0 }
                versions[b].append(latest[b].withUnsafeBytes { PersistentMemory.crc32c($0) })
            }
            pos += UInt64(n)
        }
    }

    private func markDurable(offset: UInt64, length: UInt64) {
        guard length > 0 else { return }
        for b in Int(offset >> 12)...Int((offset + length - 1) >> 12) { durableIndex[b] = versions[b].count - 1 }
    }

    // MARK: crash states

    private(set) var phases: [String: Int] = [:]

    private func crashPoint(_ tracer: PersistenceTracer) {
        points += 1
        phases[phase, default: 0] += 1
        let uncertain = tracer.uncertainWords()
        var tries: [[(offset: Int, value: UInt64)]] = [[], uncertain.map { ($0.offset, $0.values[0]) }]
        if !uncertain.isEmpty {
            for _ in 0..<config.subsetsPerPoint {
                // Mix sparse, dense and clustered subsets.
                let p = [0.05, 0.5, 0.95][Int(rng.next() % 3)]
                var chosen: [(offset: Int, value: UInt64)] = []
                for u in uncertain where Double(rng.next() % 10_000) / 10_000 < p {
                    chosen.append((u.offset, u.values[Int(rng.next() % UInt64(u.values.count))]))
                }
                tries.append(chosen)
            }
        }
        for chosen in tries {
            let h = tracer.crashImage(choosing: chosen, into: scratch)
            guard distinct.insert(h).inserted else { continue }
            if distinct.count % config.recoveryCrashEvery == 0 {
                crashDuringRecovery(of: scratch)
            } else {
                verify(scratch, "\(phase) point \(points)", inPlace: true)
            }
        }
    }

    /// Crash states inside recovery itself: recovery runs on a traced copy of the image and
    /// each of its fences is a crash point.
    private func crashDuringRecovery(of image: UnsafeMutableRawPointer) {
        let t = PersistenceTracer(image: UnsafeRawBufferPointer(start: image, count: Int(config.poolSize)))
        let inner = UnsafeMutableRawPointer.allocate(byteCount: Int(config.poolSize), alignment: 4096)
        defer { inner.deallocate() }
        t.crashPoint = { [unowned self] t, _ in
            for chosen in [[], t.uncertainWords().map { ($0.offset, $0.values[0]) }] {
                let h = t.crashImage(choosing: chosen, into: inner)
                if distinct.insert(h).inserted { verify(inner, "\(phase) point \(points), crash in recovery") }
            }
        }
        do {
            let e = try PoolEngine(media: PoolMedia(tracer: t, domain: config.domain, pageWrites: config.pageWrites), commitMode: .inline)
            try e.close()
        } catch {
            violations.append("recovery (traced) failed at \(phase) point \(points): \(error)")
        }
        t.crashPoint = nil
        verify(t.volatile, "\(phase) point \(points), after traced recovery")
    }

    /// Recovers a crash image and checks all three guarantees.
    private func verify(_ image: UnsafeMutableRawPointer, _ label: String, inPlace: Bool = false) {
        let size = Int(config.poolSize)
        let copy = inPlace ? image : verifyCopy
        if !inPlace { copy.copyMemory(from: image, byteCount: size) }
        let media = PoolMedia(base: copy, length: size,
                              persistence: Persistence(domain: config.domain, synchronousMapping: false, base: copy, length: size, fd: nil,
                                                       pageWrites: config.pageWrites))
        let layoutForDebug = try? PoolLayout.compute(poolSize: config.poolSize, journalSize: config.journalSize)
        let scanBefore = layoutForDebug.map { Journal.scan(base: copy, layout: $0) }
        defer {
            if ProcessInfo.processInfo.environment["PMEM_NBD_CRASH_DEBUG"] != nil, !violations.isEmpty, let s = scanBefore {
                print("DEBUG \(label): tail \(String(describing: s.tail)) batches \(s.batches.map { "\($0.sequence)@\($0.offset) w\($0.records.count) c\($0.checks.count)" }) end \(s.end) dropped \(s.droppedUnverified) damaged \(s.damagedCopies)")
            }
        }
        do {
            let engine = try PoolEngine(media: media, commitMode: .inline)
            let report = try PoolCheck.run(media: media, repair: false)
            if !report.clean {
                violations.append("\(label): check after recovery: \(report.problems.map(\.description).joined(separator: "; "))")
                return
            }
            let pool = Pool(engine: engine)
            // Closing drops the pool's volumes, which refer back to it (else every state leaks one).
            defer { try? pool.close() }
            guard let volume = pool.volume(named: "vol") else { violations.append("\(label): volume missing"); return }
            var newOnly = 0, oldOnly = 0
            for b in 0..<blocks {
                let crc = try blockCRC(volume, b)
                let allowed = versions[b][durableIndex[b]...]
                if let target = rollbackTarget {
                    // During a rollback: the whole old contents, or the whole snapshot.
                    let old = allowed.contains(crc), new = target[b] == crc
                    if !old && !new { violations.append("\(label): block \(b) is neither before nor after the rollback"); return }
                    if old && !new { oldOnly += 1 }
                    if new && !old { newOnly += 1 }
                    continue
                }
                if !allowed.contains(crc) {
                    let older = versions[b][..<durableIndex[b]].contains(crc)
                    violations.append("\(label): block \(b) holds \(older ? "an older version than one acknowledged durable" : "content that was never written (torn)")")
                    return
                }
            }
            if newOnly > 0 && oldOnly > 0 { violations.append("\(label): torn rollback (\(oldOnly) blocks old, \(newOnly) new)"); return }
            for (kind, table) in [("snapshot", snapshots), ("clone", clones)] {
                for (name, entry) in table {
                    let export = kind == "snapshot" ? "vol@\(name)" : name
                    let v = pool.volume(named: export)
                    switch (entry.status, v) {
                    case (.live, nil):
                        violations.append("\(label): \(kind) \(export) is missing"); return
                    case (.gone, .some):
                        violations.append("\(label): deleted \(kind) \(export) is back"); return
                    case (_, .some(let v)) where entry.status != .gone:
                        for b in 0..<blocks where try blockCRC(v, b) != entry.crcs[b] {
                            violations.append("\(label): \(kind) \(export) block \(b) differs from the contents it was taken with"); return
                        }
                    default:
                        break
                    }
                }
            }
            // Finishing an interrupted deletion leaves the pool clean too.
            try pool.runDeletions()
            let after = try PoolCheck.run(media: media, repair: false)
            if !after.clean { violations.append("\(label): check after finishing deletions: \(after.problems.map(\.description).joined(separator: "; "))") }
        } catch {
            violations.append("\(label): recovery or read failed: \(error)")
        }
    }
}
