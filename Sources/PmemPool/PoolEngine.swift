import CPmemSupport
import Glibc
import PmemSystem
import Synchronization

/// The crash-consistent pool engine (format version 3): out-of-place 4 KiB block writes, a
/// per-volume copy-on-write radix map with reference-counted blocks, and a redo journal that
/// commits metadata changes in atomic batches. See Docs/FORMAT.md.
public final class PoolEngine: @unchecked Sendable {
    public let media: PoolMedia
    public let superblock: Superblock
    public let layout: PoolLayout
    public let readOnly: Bool
    public let journal: Journal
    package let epochs = ReaderEpochs()
    package let allocator: Allocator
    package let committer: Committer
    /// Serialises volume-table changes (create, delete, snapshot).
    package let tableLock = PosixMutex()
    /// Words replayed from the journal when this engine opened.
    public let recoveredWords: Int
    /// Copy-on-write work since open, for metrics (`CopyCounter` slots; atomic adds, on paths
    /// that already copy 4 KiB).
    public let copyCounters = CounterBlock(count: 2)

    public var persistence: Persistence { media.persistence }

    /// When commits run: on a background thread (servers), or on the caller's thread when a
    /// sync or a full batch needs one (deterministic, for crash tests and tools).
    public enum CommitMode: Sendable { case background, inline }

    /// Deliberate ordering bugs, for proving that the crash-state tests catch them. Never set
    /// outside tests.
    public struct Faults: OptionSet, Sendable {
        public let rawValue: Int
        public init(rawValue: Int) { self.rawValue = rawValue }
        /// Metadata groups end without fencing the writer's data and map nodes (cache-line domain).
        public static let skipWriterFence = Faults(rawValue: 1)
        /// Commits do not make data durable before the journal (page domain).
        public static let skipDataSync = Faults(rawValue: 2)
        /// Commits apply words in place before the journal is durable.
        public static let applyBeforeJournal = Faults(rawValue: 4)
    }

    public let faults: Faults
    /// How this engine commits.
    public let committerMode: CommitMode

    // MARK: creating

    /// Formats a pool image in memory (tests) or a mapped file: superblock and backup, pool
    /// state, an empty journal and, optionally, a first volume. Everything after the
    /// superblocks must already read as zero (sparse file, zeroed device or fresh buffer).
    public static func format(base: UnsafeMutableRawPointer, poolSize: UInt64, volumeName: String?,
                              volumeSize: UInt64? = nil) throws(PoolError) -> Superblock {
        let layout = try PoolLayout.compute(poolSize: poolSize)
        let sb = Superblock.new(layout: layout)
        let bytes = sb.encode()
        bytes.withUnsafeBytes { b in
            (base + PoolLayout.superblockOffset).copyMemory(from: b.baseAddress!, byteCount: b.count)
            (base + PoolLayout.backupSuperblockOffset).copyMemory(from: b.baseAddress!, byteCount: b.count)
        }
        func put(_ off: UInt64, _ v: UInt64) { (base + Int(off)).storeBytes(of: v, as: UInt64.self) }
        put(PoolState.magicOffset, PoolState.magic)
        put(PoolState.highWaterOffset, 1)
        put(PoolState.generationOffset, 1)
        put(PoolState.nextVolumeIDOffset, 1)
        if let volumeName {
            guard VolumeRecord.validName(volumeName) else { throw PoolError(.invalid, "invalid volume name '\(volumeName)' (1 to 63 bytes, no '@', '/' or spaces)") }
            let size = volumeSize ?? defaultVolumeSize(layout)
            let rec = VolumeRecord(slot: 0, kind: .volume, id: 1, parent: 0, root: 0, size: size,
                                   depth: VolumeRecord.depth(forSize: size), created: UInt64(time(nil)), generation: 1, name: volumeName)
            for (o, v) in rec.words() { put(o, v) }
            put(PoolState.nextVolumeIDOffset, 2)
            put(PoolState.generationOffset, 2)
        }
        return sb
    }

    /// The size a pool's first volume gets by default: the block area less a reserve for
    /// map nodes and for out-of-place overwrites (1/16, at least 16 MiB), in whole MiB.
    public static func defaultVolumeSize(_ layout: PoolLayout) -> UInt64 {
        let capacity = layout.blockCount << 12
        let reserve = max(16 << 20, capacity / 16)
        return capacity > reserve ? (capacity - reserve) & ~UInt64((1 << 20) - 1) : max(1 << 20, capacity / 2)
    }

    /// Creates a pool file (sparse) or formats a device, with one volume.
    /// With `prefault`, a file pool's blocks are allocated now (fallocate), so the file system
    /// cannot run out of space under it later (a write fault would then be SIGBUS) and first
    /// writes do not pay for allocation. It goes 1 GiB at a time; `progress(done, total)` hears
    /// of each piece (bytes).
    /// A file that did not exist before and whose creation fails is removed: a failed create
    /// leaves nothing behind.
    @discardableResult
    public static func create(path: String, size: UInt64?, volumeName: String = "pmem0", volumeSize: UInt64? = nil,
                              force: Bool = false, prefault: Bool = false,
                              progress: (UInt64, UInt64) -> Void = { _, _ in }) throws(PoolError) -> Superblock {
        var st = stat()
        let existed = stat(path, &st) == 0
        do {
            return try createUnchecked(path: path, size: size, volumeName: volumeName, volumeSize: volumeSize, force: force,
                                       prefault: prefault, progress: progress)
        } catch {
            if !existed { unlink(path) }
            throw PoolError(error.kind, error.message.hasPrefix(path) ? error.message : "cannot create \(path): \(error.message)")
        }
    }

    /// The smallest pool (a whole number of MiB) whose first volume can be `volumeSize` bytes
    /// with the reserve `defaultVolumeSize` keeps for map nodes and out-of-place overwrites:
    /// what `serve --create SIZE` makes, so that the export is SIZE bytes and can be filled.
    public static func poolSize(holding volumeSize: UInt64) throws(PoolError) -> UInt64 {
        let mib: UInt64 = 1 << 20
        var p = max(4 * mib, (volumeSize + volumeSize / 15 + 16 * mib + 2 * mib + mib - 1) & ~(mib - 1))
        while true {
            let layout = try PoolLayout.compute(poolSize: p)
            let capacity = layout.blockCount << 12
            let reserve = max(16 * mib, capacity / 16)
            if capacity >= volumeSize + reserve { return p }
            p += max(mib, (volumeSize + reserve - capacity + mib - 1) & ~(mib - 1))
        }
    }

    private static func createUnchecked(path: String, size: UInt64?, volumeName: String, volumeSize: UInt64?,
                                        force: Bool, prefault: Bool,
                                        progress: (UInt64, UInt64) -> Void) throws(PoolError) -> Superblock {
        let (fd, region, backing, poolSize) = try PoolFile.prepareNew(path: path, size: size, force: force)
        defer { fd.close() }
        if prefault && backing == .file {
            var done: UInt64 = 0
            while done < poolSize {
                let n = min(poolSize - done, 1 << 30)
                if pmem_fallocate(fd.rawValue, Int64(done), Int64(n)) != 0 {
                    throw PoolError.system(.current, "cannot allocate \(poolSize) bytes for \(path)")
                }
                done += n
                progress(done, poolSize)
            }
        }
        let layout = try PoolLayout.compute(poolSize: poolSize)
        if backing != .file {
            // A device holds old bytes: clear every metadata area the format relies on being zero.
            PersistentMemory.zeroNonTemporal(region.base, count: Int(layout.blockAreaOffset))
            PersistentMemory.drain()
        }
        let sb = try format(base: region.base, poolSize: poolSize, volumeName: volumeName, volumeSize: volumeSize)
        do {
            try region.sync()
            try fd.sync()
        } catch { throw PoolError.system(error, "cannot write \(path)") }
        if backing == .file { syncDirectory(of: path) }
        return sb
    }

    // MARK: opening

    /// Opens a pool file or device and recovers it.
    public static func open(path: String, readOnly: Bool = false, persistence: PersistenceMode = .auto,
                            lock: Bool = true, commitMode: CommitMode = .background) throws(PoolError) -> PoolEngine {
        let (_, media) = try PoolFile.open(path: path, readOnly: readOnly, persistence: persistence, lock: lock)
        return try PoolEngine(media: media, readOnly: readOnly, commitMode: commitMode)
    }

    /// Opens an engine on mapped media: validates the superblock, replays a committed journal
    /// (read-only opens see it as pending words instead), and loads the counters. No scan of
    /// the pool: the cost follows what was in flight, not the pool's size.
    public init(media: PoolMedia, readOnly: Bool = false, commitMode: CommitMode = .background,
                faults: Faults = []) throws(PoolError) {
        self.media = media
        self.readOnly = readOnly
        self.faults = faults
        self.committerMode = readOnly ? .inline : commitMode
        let sb = try Superblock.decode(UnsafeRawBufferPointer(start: media.base, count: Superblock.encodedSize),
                                       available: UInt64(media.length))
        superblock = sb
        layout = sb.layout
        journal = Journal(base: media.base, persistence: media.persistence, area: layout.journalOffset, areaSize: layout.journalSize)
        let stateMagic = media.base.load(fromByteOffset: Int(PoolState.magicOffset), as: UInt64.self)
        guard stateMagic == PoolState.magic else {
            let name = media.file?.path ?? "POOL"
            throw PoolError(.badPool, "\(media.file.map { "\($0.path): " } ?? "")pool state block is damaged (bad magic); run 'pmem-nbd check \(name)'")
        }
        let layout = self.layout
        if readOnly {
            journal.overlayWithoutReplay()
            recoveredWords = 0
        } else {
            recoveredWords = try journal.recover(valid: { PoolEngine.isMetadataWord($0, layout) })
        }
        let highWater = journal.load(PoolState.highWaterOffset)
        let allocated = journal.load(PoolState.allocatedOffset)
        guard highWater >= 1, highWater <= layout.blockCount, allocated < layout.blockCount else {
            throw PoolError(.badPool, "\(media.file.map { "\($0.path): " } ?? "")pool counters are out of range (high water \(highWater), allocated \(allocated)); run 'pmem-nbd check --repair \(media.file?.path ?? "POOL")'")
        }
        allocator = Allocator(layout: layout, journal: journal, epochs: epochs, highWater: highWater, allocated: Int64(allocated))
        rmwLocks = (0..<64).map { _ in PosixMutex() }
        let epochs = self.epochs
        rmwGuards = (0..<64).map { _ in ReadGuard(epochs: epochs) }
        committer = Committer(mode: readOnly ? .inline : commitMode)
        committer.engine = self
        if !readOnly && commitMode == .background { committer.start() }
    }

    /// Faults the whole block area in, writable, on a background thread, so that first writes to
    /// never-used blocks do not take page faults (`serve --prefault`).
    public func prefaultInBackground() {
        let start = Int(layout.blockAreaOffset), length = Int(layout.blockCount << 12)
        OSThread.spawn(name: "pmem-prefault") { [self] in
            withExtendedLifetime(self) {
                let base = media.base + start
                var off = 0
                let step = 64 << 20
                while off < length {
                    if pmem_populate_write(base + off, min(step, length - off)) != 0 {
                        Log.warning("prefault: madvise(MADV_POPULATE_WRITE): \(Errno.current)")
                        return
                    }
                    off += step
                }
                Log.info("prefault: \(length) bytes of blocks are mapped")
            }
        }
    }

    /// Words the journal may name: the state block, the volume table, refcounts and map nodes.
    static func isMetadataWord(_ off: UInt64, _ layout: PoolLayout) -> Bool {
        guard off & 7 == 0 else { return false }
        if off >= PoolState.magicOffset && off < PoolState.magicOffset + 4096 { return true }
        let table = UInt64(PoolLayout.volumeTableOffset)
        if off >= table && off < table + UInt64(PoolLayout.volumeEntries * PoolLayout.volumeEntrySize) { return true }
        if off >= layout.refcountOffset && off < layout.refcountOffset + layout.refcountSize { return true }
        return off >= layout.blockAreaOffset + 4096 && off < layout.blockAreaOffset + layout.blockCount << 12
    }

    /// Commits what is pending and stops the committer. The engine must not be used afterwards.
    public func close() throws(PoolError) {
        if !readOnly {
            try sync()
            committer.stop()
            if persistence.domain == .page {
                // The last batch is applied; once that is durable the journal is not needed.
                try persistence.syncAll()
                try journal.markEmpty()
            }
        }
        // Another process (or a later open) may have the pool now.
        media.file?.fd.unlock()
    }

    // MARK: volumes

    /// The records of every volume and snapshot.
    public func records() -> [VolumeRecord] {
        (0..<PoolLayout.volumeEntries).compactMap { VolumeRecord.decode(slot: $0, load: journal.load) }
    }

    /// A guard for reading pool memory (one per connection).
    public func makeReadGuard() -> ReadGuard { ReadGuard(epochs: epochs) }

    // MARK: space

    public struct Space: Sendable, Equatable {
        public var blocks: UInt64
        public var allocated: UInt64
        /// Freed blocks waiting for a commit or for readers.
        public var held: UInt64
        public var free: UInt64 { blocks - 1 - allocated }
    }

    public var space: Space {
        Space(blocks: layout.blockCount, allocated: UInt64(max(0, allocator.allocated.load(ordering: .relaxed))),
              held: UInt64(allocator.heldCount))
    }

    // MARK: durability

    /// Makes every completed operation durable (NBD FLUSH): commits the running batch and waits.
    public func sync() throws(PoolError) {
        guard !readOnly else { return }
        try committer.sync(through: journal.runningBatch.load(ordering: .acquiring))
    }

    /// Runs `body` as one atomic group of metadata stores of at most `words` words: inside the
    /// gate, with room reserved in the running batch (committing first when it is full).
    package func withMetadata<T>(words: Int, _ body: () throws(PoolError) -> T) throws(PoolError) -> T {
        if let e = committer.failure { throw e }
        precondition(words <= journal.capacity - 64, "metadata group larger than the journal")
        while true {
            journal.gate.readLock()
            if journal.tryReserve(words) {
                defer {
                    // The data blocks and map nodes this thread wrote for the group are durable
                    // before a commit (which needs the gate) can name them.
                    if !faults.contains(.skipWriterFence) { persistence.drain() }
                    journal.gate.unlock()
                }
                if journal.runningReservation > journal.capacity / 2 { committer.kick() }
                return try body()
            }
            journal.gate.unlock()
            try committer.sync(through: journal.runningBatch.load(ordering: .acquiring))
        }
    }

    /// Reserves a free block. When free space runs low a commit starts in the background, so
    /// blocks freed by overwrites come back before they are needed; when none is free, waits
    /// for commits and for readers (a few seconds at most) before answering ENOSPC.
    package func reserveBlock() throws(PoolError) -> UInt64 {
        if let b = allocator.reserve() {
            if allocator.readilyAvailable < lowWater { committer.kick() }
            return b
        }
        var waited = 0.0
        while allocator.heldCount > 0 && waited < 5 {
            try committer.sync(through: journal.runningBatch.load(ordering: .acquiring))
            allocator.reclaim()
            if let b = allocator.reserve() { return b }
            usleep(2000)
            waited += 0.002
        }
        throw PoolError(.noSpace, "the pool is full")
    }

    /// Reserves `out.count` blocks (see `reserveBlock`); returns how many (all, or throws).
    package func reserveBlocks(_ out: UnsafeMutableBufferPointer<UInt64>) throws(PoolError) -> Int {
        let (got, available) = allocator.reserve(into: out)
        var n = got
        if n < out.count || available < lowWater { committer.kick() }
        while n < out.count {
            do {
                out[n] = try reserveBlock()
            } catch {
                allocator.unreserve(UnsafeBufferPointer(rebasing: out[0..<n]))
                throw error
            }
            n += 1
        }
        return n
    }

    // MARK: damaged media

    private let badBlocks = Locked<Set<UInt64>>([])
    private let badCount = Atomic<Int>(0)

    /// Whether any block is known bad (checked on every read without locking).
    @inline(__always) package var hasBadBlocks: Bool { badCount.load(ordering: .relaxed) != 0 }
    package func isBad(_ b: UInt64) -> Bool { badBlocks.withLock { $0.contains(b) } }

    /// Records blocks as on damaged media (reads of them fail with EIO; they are never reused).
    /// Returns those not known before.
    @discardableResult
    public func markBad(_ blocks: [UInt64]) -> [UInt64] {
        let new = badBlocks.withLock { set -> [UInt64] in
            let n = blocks.filter { validBlock($0) && !set.contains($0) }
            set.formUnion(n)
            badCount.store(set.count, ordering: .relaxed)
            return n
        }
        if !new.isEmpty { allocator.markBad(new) }
        return new
    }

    public var badBlockList: [UInt64] { badBlocks.withLock { $0.sorted() } }

    /// Free blocks below which a background commit starts (1/8 of the pool, at most 64 MiB).
    package var lowWater: UInt64 { min(16384, layout.blockCount / 8) }

    /// Engine-owned read epochs for read-modify-write copies, one per stripe lock.
    package let rmwGuards: [ReadGuard]
    package let rmwLocks: [PosixMutex]

    /// One commit: freeze, make data durable, write the journal, apply. Called by the committer.
    package func commitOnce() throws(PoolError) -> UInt64 {
        journal.gate.writeLock()
        let counters: [(UInt64, UInt64)] = [
            (PoolState.allocatedOffset, UInt64(max(0, allocator.allocated.load(ordering: .relaxed)))),
            (PoolState.highWaterOffset, allocator.highWaterNow),
        ]
        let frozen = journal.freeze(extra: counters)
        journal.gate.unlock()
        if !frozen.records.isEmpty {
            persistence.tracer?.phase = "commit"
            let t0 = Log.enabled(.debug) ? monotonicSeconds() : 0
            defer {
                if Log.enabled(.debug) {
                    Log.debug("commit \(frozen.batch): \(frozen.records.count) words in \(Int((monotonicSeconds() - t0) * 1e6)) µs")
                }
            }
            if persistence.domain == .page && !faults.contains(.skipDataSync) { try persistence.syncAll() }
            if faults.contains(.applyBeforeJournal) {
                for (off, v) in frozen.records { media.base.storeBytes(of: v, toByteOffset: Int(off), as: UInt64.self) }
            }
            try journal.writeJournal(frozen)
            try journal.apply(frozen)
        }
        allocator.committed(through: frozen.batch)
        return frozen.batch
    }

    // MARK: refcounts

    @inline(__always) package func refcount(_ b: UInt64) -> UInt32 { allocator.refcount(b) }

    /// Adds `delta` to a block's refcount (gate held). At zero the block is freed; a freed map
    /// node releases its children. `level` is the node level (0 = leaf node), or -1 for data.
    package func adjustRefcount(_ b: UInt64, _ delta: Int32, level: Int) {
        var underflow = false, damaged = false
        let (old, new) = journal.update(layout.refcountWordOffset(b)) { w in
            let cur = RefcountSlot.decode(b, slot: RefcountSlot.slot(b, in: w))
            if cur == RefcountSlot.damaged { damaged = true; return w }
            var next = Int64(cur) + Int64(delta)
            if next < 0 { underflow = true; next = 0 }
            return RefcountSlot.word(w, b, slot: RefcountSlot.encode(b, count: UInt32(min(next, Int64(RefcountSlot.maxCount)))))
        }
        if damaged {
            Log.error("the refcount of block \(b) fails its check: the block stays in use; run 'pmem-nbd check --repair'")
            return
        }
        if underflow { Log.error("refcount underflow on block \(b): the pool is inconsistent; run 'pmem-nbd check'") }
        let before = RefcountSlot.decode(b, slot: RefcountSlot.slot(b, in: old)), after = RefcountSlot.decode(b, slot: RefcountSlot.slot(b, in: new))
        if before == 0 && after > 0 { allocator.allocated.add(1, ordering: .relaxed) }
        if before > 0 && after == 0 {
            allocator.allocated.subtract(1, ordering: .relaxed)
            if level >= 0 {
                for i in 0..<512 {
                    let child = entryOrHole(node: b, index: i, level: level)
                    if child != 0 { adjustRefcount(child, -1, level: level - 1) }
                }
            }
            allocator.freed(b, batch: journal.runningBatch.load(ordering: .relaxed))
        }
    }

    /// A new zeroed map node with refcount 1, from the caller's spares (gate held; never waits).
    package func newNode(_ spares: inout NodeSpares) throws(PoolError) -> UInt64 {
        let b = try spares.take()
        let p = media.base + Int(layout.blockOffset(b))
        PersistentMemory.zeroNonTemporal(p, count: 4096)
        persistence.didStoreNonTemporal(p, 4096)
        adjustRefcount(b, 1, level: 0)
        return b
    }

    /// A private copy of a shared node: entries copied (as currently visible), children gain a
    /// reference, the original loses one (gate held).
    package func copyNode(_ old: UInt64, level: Int, _ spares: inout NodeSpares) throws(PoolError) -> UInt64 {
        let b = try spares.take()
        copyCounters.addShared(CopyCounter.mapNodes)
        let src = layout.blockOffset(old)
        let dst = media.base + Int(layout.blockOffset(b))
        for i in 0..<512 {
            let e = journal.load(src + UInt64(8 * i))
            dst.storeBytes(of: e, toByteOffset: 8 * i, as: UInt64.self)
            let child = decodedOrHole(e, node: old, index: i, level: level)
            if child != 0 { adjustRefcount(child, 1, level: level - 1) }
        }
        persistence.flush(dst, 4096)
        adjustRefcount(b, 1, level: level)
        adjustRefcount(old, -1, level: level)
        return b
    }
}

func monotonicSeconds() -> Double {
    var ts = timespec()
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return Double(ts.tv_sec) + Double(ts.tv_nsec) / 1e9
}

/// Blocks an operation reserved, before entering the gate, for the map nodes it may create or
/// copy; what it does not use goes back to the allocator.
/// Slots of `PoolEngine.copyCounters`.
public enum CopyCounter {
    /// Map nodes shared with a snapshot or clone, copied before a change.
    public static let mapNodes = 0
    /// Old blocks copied into new ones under a write of part of a block.
    public static let partialBlocks = 1
}

package struct NodeSpares: ~Copyable {
    let allocator: Allocator
    private var blocks: [UInt64]

    /// Reserves `count` blocks (waiting for commits if needed; throws ENOSPC).
    package init(_ engine: PoolEngine, count: Int) throws(PoolError) {
        allocator = engine.allocator
        blocks = []
        blocks.reserveCapacity(count)
        // On failure the value is already whole, so its deinit gives back what was reserved:
        // giving it back here too would put the blocks on the free list twice, and they would
        // be handed out twice (two map entries, one block).
        for _ in 0..<count { blocks.append(try engine.reserveBlock()) }
    }

    mutating func take() throws(PoolError) -> UInt64 {
        guard let b = blocks.popLast() else { throw PoolError(.noSpace, "the pool is full (no block for a map node)") }
        return b
    }

    deinit { for b in blocks { allocator.unreserve(b) } }
}
