import Foundation
import PmemPool
import PmemVolumes
import PmemSystem

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
        var operations = 120
        /// Random subsets of uncertain words tried per crash point.
        var subsetsPerPoint = 8
        /// One crash image in this many also gets crash points enumerated inside its recovery.
        var recoveryCrashEvery = 12
        var seed: UInt64
        /// Deliberate engine bugs (to prove the harness finds them).
        var faults: PoolEngine.Faults = []
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
        _ = try PoolEngine.format(base: image, poolSize: config.poolSize, volumeName: "vol", volumeSize: config.volumeSize)
        let tracer = PersistenceTracer(image: UnsafeRawBufferPointer(start: image, count: Int(config.poolSize)))
        tracer.crashPoint = { [unowned self] t, _ in
            if distinct.count < maxStates { crashPoint(t) }
        }
        let engine = try PoolEngine(media: PoolMedia(tracer: tracer, domain: config.domain), commitMode: .inline, faults: config.faults)
        guard let volume = Pool(engine: engine).volume(named: "vol") else { throw PoolError(.notFound, "no volume") }
        for i in 0..<config.operations {
            if distinct.count >= maxStates || (!config.faults.isEmpty && !violations.isEmpty) { break }
            try operation(i, volume)
        }
        try engine.sync()
        crashPoint(tracer)
        tracer.crashPoint = nil
    }

    // MARK: workload

    private func operation(_ i: Int, _ volume: Volume) throws {
        let r = rng.next() % 100
        let fua = rng.next() % 5 == 0
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

    private func crashPoint(_ tracer: PersistenceTracer) {
        points += 1
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
            let e = try PoolEngine(media: PoolMedia(tracer: t, domain: config.domain), commitMode: .inline)
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
                              persistence: Persistence(domain: config.domain, synchronousMapping: false, base: copy, length: size, fd: nil))
        do {
            let engine = try PoolEngine(media: media, commitMode: .inline)
            let report = try PoolCheck.run(media: media, repair: false)
            if !report.clean {
                violations.append("\(label): check after recovery: \(report.problems.map(\.description).joined(separator: "; "))")
                return
            }
            guard let volume = Pool(engine: engine).volume(named: "vol") else { violations.append("\(label): volume missing"); return }
            for b in 0..<blocks {
                var crc: UInt32 = 0
                var len = 0
                try volume.read(offset: UInt64(b) << 12, length: 4096) { seg in
                    switch seg {
                    case .data(let p, let n): crc = PersistentMemory.crc32c(p, count: n, seed: crc)
                    case .hole(let n):
                        let z = [UInt8](repeating: 0, count: n)
                        crc = z.withUnsafeBytes { PersistentMemory.crc32c($0, seed: crc) }
                    }
                    len += { if case .data(_, let n) = seg { return n } else if case .hole(let n) = seg { return n } else { return 0 } }()
                }
                let allowed = versions[b][durableIndex[b]...]
                if !allowed.contains(crc) {
                    let older = versions[b][..<durableIndex[b]].contains(crc)
                    violations.append("\(label): block \(b) holds \(older ? "an older version than one acknowledged durable" : "content that was never written (torn)")")
                    return
                }
            }
        } catch {
            violations.append("\(label): recovery or read failed: \(error)")
        }
    }
}

struct SplitMix64: RandomNumberGenerator {
    var state: UInt64
    init(seed: UInt64) { state = seed }
    mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
}
