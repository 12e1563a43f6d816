import Glibc
import PmemSystem

/// `pmem-nbd check`: verifies a pool the way fsck verifies a file system — superblock and its
/// backup, journal, pool state, volume table, every map (walked in full), refcounts against
/// the references the walk counts, and the counters — and with `repair` fixes only what is
/// safe, saying what it did.
public struct CheckReport: Sendable {
    public struct Problem: Sendable, CustomStringConvertible {
        public var area: String
        public var message: String
        public var repaired: Bool
        public var description: String { "\(area): \(message)\(repaired ? " [repaired]" : "")" }
    }

    public var problems: [Problem] = []
    public var volumes = 0
    public var snapshots = 0
    public var mapNodes = 0
    public var dataBlocks = 0
    public var allocatedBlocks: UInt64 = 0
    public var blocks: UInt64 = 0
    public var journal = "empty"

    public var clean: Bool { problems.isEmpty }
    public var unrepaired: [Problem] { problems.filter { !$0.repaired } }

    /// fsck-style exit status: 0 clean, 1 problems all repaired, 4 problems left.
    public var exitStatus: Int32 { problems.isEmpty ? 0 : (unrepaired.isEmpty ? 1 : 4) }

    public func text() -> String {
        var lines = ["journal: \(journal)", "volumes: \(volumes), snapshots: \(snapshots)",
                     "map nodes: \(mapNodes), data blocks: \(dataBlocks), allocated: \(allocatedBlocks) of \(blocks) blocks"]
        if problems.isEmpty { lines.append("clean") }
        lines += problems.map { "problem: \($0)" }
        return lines.joined(separator: "\n")
    }

    public func json() -> String {
        func esc(_ s: String) -> String { s.replacingOccurrences(of: "\\", with: "\\\\").replacingOccurrences(of: "\"", with: "\\\"") }
        let ps = problems.map { "{\"area\":\"\(esc($0.area))\",\"message\":\"\(esc($0.message))\",\"repaired\":\($0.repaired)}" }
        return "{\"clean\":\(clean),\"journal\":\"\(esc(journal))\",\"volumes\":\(volumes),\"snapshots\":\(snapshots),"
            + "\"map_nodes\":\(mapNodes),\"data_blocks\":\(dataBlocks),\"allocated_blocks\":\(allocatedBlocks),\"blocks\":\(blocks),"
            + "\"problems\":[\(ps.joined(separator: ","))]}"
    }
}

extension String {
    func replacingOccurrences(of a: String, with b: String) -> String {
        guard !a.isEmpty else { return self }
        var out = ""
        var rest = Substring(self)
        while let r = rest.range(of: a) {
            out += rest[..<r.lowerBound] + b
            rest = rest[r.upperBound...]
        }
        return out + rest
    }
}

extension Substring {
    func range(of s: String) -> Range<Index>? {
        guard let first = s.first else { return nil }
        var i = startIndex
        while i < endIndex {
            if self[i] == first, self[i...].hasPrefix(s) { return i..<index(i, offsetBy: s.count) }
            i = index(after: i)
        }
        return nil
    }
}

public enum PoolCheck {
    /// Checks (and with `repair`, repairs) the pool at `path`. The pool must not be in use.
    /// `progress(done, total)` hears how far the check is, in half-blocks: the map walk is the
    /// first half, the refcount pass the second (so `total` × 2 KiB is the pool's size).
    public static func run(path: String, repair: Bool, progress: (UInt64, UInt64) -> Void = { _, _ in }) throws(PoolError) -> CheckReport {
        let fd: FileDescriptor
        do { fd = try FileDescriptor.open(path, repair ? O_RDWR : O_RDONLY) } catch {
            if error == .noSuchFile { throw PoolError(.notFound, "\(path) does not exist") }
            throw PoolError.system(error, "cannot open \(path)")
        }
        defer { fd.close() }
        do { try fd.lockExclusive() } catch { throw PoolError(.exists, "\(path) is in use; stop the server before checking it") }
        let backing = try PoolFile.backingKind(fd)
        let available = try PoolFile.byteSize(fd, backing)
        guard available >= 8192 else {
            throw PoolError(.badPool, "file is \(available) bytes, too small to hold a pmem-nbd pool (truncated?)")
        }
        // Map what is there (the superblock may be damaged, so map the whole file).
        let region: MappedRegion
        do { region = try MappedRegion.map(fd, length: Int(available), writable: repair, preferSynchronous: false) } catch {
            throw PoolError.system(error, "cannot map \(path)")
        }
        let persistence = Persistence(domain: .page, synchronousMapping: false, base: region.base, length: region.length, fd: fd)
        return try run(media: PoolMedia(base: region.base, length: region.length, persistence: persistence), repair: repair, progress: progress)
    }

    /// Checks pool memory: a mapped file, or a crash image in tests.
    public static func run(media: PoolMedia, repair: Bool, progress: (UInt64, UInt64) -> Void = { _, _ in }) throws(PoolError) -> CheckReport {
        var report = CheckReport()
        let base = media.base
        // Superblock, falling back to the backup copy.
        let available = UInt64(media.length)
        let primary = Result { () throws(PoolError) in
            try Superblock.decode(UnsafeRawBufferPointer(start: base, count: Superblock.encodedSize), available: available)
        }
        let sb: Superblock
        switch primary {
        case .success(let s):
            sb = s
            let backup = try? Superblock.decode(UnsafeRawBufferPointer(start: base + PoolLayout.backupSuperblockOffset, count: Superblock.encodedSize), available: available)
            if backup != sb {
                var p = CheckReport.Problem(area: "superblock", message: "backup copy at 4096 is damaged or differs", repaired: false)
                if repair {
                    (base + PoolLayout.backupSuperblockOffset).copyMemory(from: base, byteCount: Superblock.encodedSize)
                    p.repaired = true
                }
                report.problems.append(p)
            }
        case .failure(let e):
            guard let backup = try? Superblock.decode(UnsafeRawBufferPointer(start: base + PoolLayout.backupSuperblockOffset, count: Superblock.encodedSize), available: available) else {
                throw e
            }
            sb = backup
            var p = CheckReport.Problem(area: "superblock", message: "\(e.message); the backup copy is good", repaired: false)
            if repair {
                base.copyMemory(from: base + PoolLayout.backupSuperblockOffset, byteCount: Superblock.encodedSize)
                p.repaired = true
            }
            report.problems.append(p)
        }
        let layout = sb.layout
        report.blocks = layout.blockCount

        // Journal: the ring's committed batches are part of the pool's state (open replays them).
        var overlay: [UInt64: UInt64] = [:]
        let scan = Journal.scan(base: base, layout: layout)
        var ringEnd = scan.end
        if scan.tail == nil {
            report.journal = "header damaged"
            var p = CheckReport.Problem(area: "journal", message: "both copies of the journal header are damaged (changes committed since the last checkpoint, if any, are lost)", repaired: false)
            if repair {
                ringEnd = Journal.freshTail(base: base, layout: layout)
                Journal.writeHeader(base: base, area: layout.journalOffset, tail: ringEnd)
                try media.persistence.syncAll()
                p.repaired = true
            }
            report.problems.append(p)
        } else {
            report.journal = scan.summary
            let recs = scan.batches.flatMap(\.records)
            let bad = recs.filter { !PoolEngine.isMetadataWord($0.0, layout) }
            if bad.isEmpty {
                for (off, v) in recs { overlay[off] = v }
                if repair && (!recs.isEmpty || !scan.damagedCopies.isEmpty || scan.droppedUnverified) {
                    // What open would do: replay the batches, so repairs start from the same state.
                    for (off, v) in recs { base.storeBytes(of: v, toByteOffset: Int(off), as: UInt64.self) }
                    try media.persistence.syncAll()
                    Journal.writeHeader(base: base, area: layout.journalOffset, tail: scan.end)
                    try media.persistence.syncAll()
                    if !recs.isEmpty { report.journal += "; replayed" }
                }
            } else {
                report.problems.append(.init(area: "journal", message: "\(bad.count) records name offsets outside the metadata areas (first \(bad[0].0)); the journal is corrupt", repaired: false))
            }
        }
        func load(_ off: UInt64) -> UInt64 { overlay[off] ?? base.load(fromByteOffset: Int(off), as: UInt64.self) }
        func store(_ off: UInt64, _ v: UInt64) {
            overlay[off] = v
            base.storeBytes(of: v, toByteOffset: Int(off), as: UInt64.self)
        }

        // Pool state.
        if load(PoolState.magicOffset) != PoolState.magic {
            report.problems.append(.init(area: "state", message: "pool state block has a bad magic", repaired: false))
        }
        let highWater = load(PoolState.highWaterOffset)
        let storedAllocated = load(PoolState.allocatedOffset)

        // Volume table.
        var records: [VolumeRecord] = []
        var ids = Set<UInt64>()
        for slot in 0..<PoolLayout.volumeEntries {
            let o = VolumeRecord.offset(slot: slot)
            let kind = load(o + VolumeRecord.kindField)
            if kind == 0 { continue }
            guard let rec = VolumeRecord.decode(slot: slot, load: load) else {
                report.problems.append(.init(area: "volume table", message: "slot \(slot) has unknown kind \(kind)", repaired: false))
                continue
            }
            var bad: [String] = []
            if !VolumeRecord.validName(rec.name) { bad.append("invalid name") }
            // A volume that shrank keeps its deeper map.
            let storedDepth = load(o + VolumeRecord.depthField)
            if !VolumeRecord.depthFits(storedDepth, size: rec.size) {
                bad.append("depth \(storedDepth) does not fit size \(rec.size)")
            } else if rec.root == VolumeRecord.damagedRoot {
                bad.append("root fails its check tag")
            } else if rec.root >= layout.blockCount {
                bad.append("root \(rec.root) out of range")
            }
            if rec.size & 4095 != 0 { bad.append("size not a multiple of 4096") }
            if !ids.insert(rec.id).inserted { bad.append("duplicate id \(rec.id)") }
            if !bad.isEmpty {
                report.problems.append(.init(area: "volume table", message: "slot \(slot) ('\(rec.name)'): \(bad.joined(separator: ", "))", repaired: false))
                continue
            }
            records.append(rec)
            if rec.kind == .snapshot { report.snapshots += 1 } else { report.volumes += 1 }
        }

        // Walk every map, counting references.
        var refs = [UInt32](repeating: 0, count: Int(layout.blockCount))
        /// What each block was reached as: 0 unseen, level+1 for nodes, 255 for data.
        var role = [UInt8](repeating: 0, count: Int(layout.blockCount))
        var structural = false
        func reach(_ b: UInt64, as r: UInt8, from: String) -> Bool {
            refs[Int(b)] &+= 1
            if role[Int(b)] == 0 {
                role[Int(b)] = r
                return true
            }
            if role[Int(b)] != r {
                structural = true
                report.problems.append(.init(area: "map", message: "block \(b) is used both as \(role[Int(b)] == 255 ? "data" : "a map node") and as \(r == 255 ? "data" : "a map node") (\(from))", repaired: false))
            }
            return false
        }
        let rooted = records.filter { $0.root != 0 }
        for (index, rec) in rooted.enumerated() {
            progress(layout.blockCount * UInt64(index) / UInt64(rooted.count), 2 * layout.blockCount)
            var stack: [(UInt64, Int)] = []
            if reach(rec.root, as: UInt8(rec.depth), from: "root of \(rec.name)") { stack.append((rec.root, rec.depth - 1)) }
            while let (node, level) = stack.popLast() {
                report.mapNodes += 1
                for i in 0..<512 {
                    let off = layout.blockOffset(node) + UInt64(8 * i)
                    let raw = load(off)
                    if raw == 0 { continue }
                    let e = raw & MapEntry.blockMask
                    let tagged = MapEntry.block(raw, index: i, level: level) != nil
                    if e >= layout.blockCount || !tagged {
                        let why = e >= layout.blockCount ? "points outside the pool" : "fails its check tag"
                        var p = CheckReport.Problem(area: "map", message: "\(rec.name): entry \(i) of \(level == 0 ? "leaf" : "node") \(node) \(why) (\(String(raw, radix: 16)))", repaired: false)
                        if repair {
                            // The entry reaches nothing: make it a hole.
                            store(off, 0)
                            p.repaired = true
                        } else {
                            structural = true
                        }
                        report.problems.append(p)
                        continue
                    }
                    if level == 0 {
                        _ = reach(e, as: 255, from: "\(rec.name) leaf \(node)")
                    } else if reach(e, as: UInt8(level), from: "\(rec.name) node \(node)") {
                        stack.append((e, level - 1))
                    }
                }
            }
        }
        report.dataBlocks = role.lazy.filter { $0 == 255 }.count

        // Refcounts against references; counters.
        var allocated: UInt64 = 0
        var maxUsed: UInt64 = 0
        var mismatches = 0
        for b in 1..<layout.blockCount {
            if b & 0xFFFF == 0 { progress(layout.blockCount + b, 2 * layout.blockCount) }
            let w = load(layout.refcountWordOffset(b))
            let stored = RefcountSlot.decode(b, slot: RefcountSlot.slot(b, in: w))
            let counted = refs[Int(b)]
            if counted > 0 { maxUsed = b }
            if stored != counted {
                mismatches += 1
                if mismatches <= 20 {
                    let what = stored == RefcountSlot.damaged ? "has a refcount that fails its check tag (referenced \(counted) times)"
                        : stored < counted ? "under-counted (referenced \(counted) times but refcount \(stored): could be handed out while in use)"
                        : "leaked (refcount \(stored) but referenced \(counted) times)"
                    report.problems.append(.init(area: "refcounts", message: "block \(b) \(what)", repaired: false))
                }
            }
            if counted > 0 { allocated += 1 }
        }
        if mismatches > 20 { report.problems.append(.init(area: "refcounts", message: "\(mismatches - 20) more refcount mismatches", repaired: false)) }
        let canFixRefcounts = repair && !structural
        if canFixRefcounts && mismatches > 0 {
            for b in 1..<layout.blockCount {
                let off = layout.refcountWordOffset(b)
                let w = load(off)
                if RefcountSlot.decode(b, slot: RefcountSlot.slot(b, in: w)) != refs[Int(b)] {
                    store(off, RefcountSlot.word(w, b, slot: RefcountSlot.encode(b, count: refs[Int(b)])))
                }
            }
            for i in report.problems.indices where report.problems[i].area == "refcounts" { report.problems[i].repaired = true }
        }
        report.allocatedBlocks = allocated
        if storedAllocated != allocated {
            var p = CheckReport.Problem(area: "state", message: "allocated-block count is \(storedAllocated) but \(allocated) blocks are in use", repaired: false)
            if repair && !structural { store(PoolState.allocatedOffset, allocated); p.repaired = true }
            report.problems.append(p)
        }
        if highWater <= maxUsed || highWater > layout.blockCount || highWater == 0 {
            var p = CheckReport.Problem(area: "state", message: "high-water mark \(highWater) does not cover block \(maxUsed), the highest in use", repaired: false)
            if repair && !structural { store(PoolState.highWaterOffset, min(layout.blockCount, maxUsed + 1)); p.repaired = true }
            report.problems.append(p)
        }

        if repair && report.problems.contains(where: { $0.repaired }) {
            // Everything repaired is in place now, the journal's batches (if any) included:
            // nothing is left to replay.
            try media.persistence.syncAll()
            Journal.writeHeader(base: base, area: layout.journalOffset, tail: ringEnd)
            try media.persistence.syncAll()
        }
        progress(2 * layout.blockCount, 2 * layout.blockCount)
        return report
    }
}
