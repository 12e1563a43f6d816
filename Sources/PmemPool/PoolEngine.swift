import Glibc
import PmemSystem
import Synchronization

/// The crash-consistent pool engine (format version 4): out-of-place 4 KiB block writes, a
/// per-volume copy-on-write radix map with reference-counted blocks, and a redo journal (a ring
/// of batches with lazy checkpoints) that commits metadata changes in atomic batches. See
/// Docs/FORMAT.md.
public final class PoolEngine: @unchecked Sendable {
    deinit { for p in scratchBuffers { p.deallocate() } }

    public let media: PoolMedia
    public let superblock: Superblock
    public let layout: PoolLayout
    public let readOnly: Bool
    /// Internal to PmemPool: the volume layer changes metadata through the map and table
    /// operations (MapUpdates.swift, VolumeTable.swift).
    let journal: Journal
    package let epochs = ReaderEpochs()
    let allocator: Allocator
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
        /// Page domain: the data a batch wrote is written back but the device's cache is not
        /// flushed before the journal is written (the flush that orders them is missing).
        public static let skipFlushBeforeJournal = Faults(rawValue: 8)
        /// Page domain: small batches write their data alongside the journal without check
        /// records (nothing tells recovery that the data never arrived).
        public static let skipDataChecks = Faults(rawValue: 16)
        /// Checkpoints move the ring's tail without making the applied words durable first.
        public static let tailBeforeSync = Faults(rawValue: 32)
        /// Map nodes freed in a batch are reused once it commits, before a checkpoint (replaying
        /// an older batch then writes into their new contents).
        public static let reuseNodesBeforeCheckpoint = Faults(rawValue: 64)
        /// Page domain: the checks of a batch also cover blocks it wrote and freed again (which
        /// are reused, and change, once it commits).
        public static let checkBlocksFreedInBatch = Faults(rawValue: 128)
        /// FLUSH and FUA return without committing (the acknowledged words stay in the running
        /// batch, in DRAM): what `ProcessCrashTests` must catch with SIGKILL.
        public static let syncWithoutCommit = Faults(rawValue: 256)

        /// Faults a test sets in a server it starts: `PMEM_NBD_TEST_FAULTS` (the raw value).
        /// Nothing else reads it; unset, no fault.
        public static var fromEnvironment: Faults {
            guard let v = getenv("PMEM_NBD_TEST_FAULTS"), let n = Int(String(cString: v)), n > 0 else { return [] }
            Log.warning("PMEM_NBD_TEST_FAULTS=\(n): deliberate ordering bugs for a test; acknowledged data may be lost")
            return Faults(rawValue: n)
        }
    }

    public let faults: Faults
    /// How this engine commits.
    public let committerMode: CommitMode

    // MARK: creating

    /// Formats a pool image in memory (tests) or a mapped file: superblock and backup, pool
    /// state, an empty journal and, optionally, a first volume. Everything after the
    /// superblocks must already read as zero (sparse file, zeroed device or fresh buffer).
    public static func format(base: UnsafeMutableRawPointer, poolSize: UInt64, volumeName: String?,
                              volumeSize: UInt64? = nil, journalSize: UInt64? = nil) throws(PoolError) -> Superblock {
        let layout = try PoolLayout.compute(poolSize: poolSize, journalSize: journalSize)
        let sb = Superblock.new(layout: layout)
        let bytes = sb.encode()
        bytes.withUnsafeBytes { b in
            (base + PoolLayout.superblockOffset).copyMemory(from: b.baseAddress!, byteCount: b.count)
            (base + PoolLayout.backupSuperblockOffset).copyMemory(from: b.baseAddress!, byteCount: b.count)
        }
        func put(_ off: UInt64, _ v: UInt64) { (base + Int(off)).storeBytes(of: v, as: UInt64.self) }
        Journal.format(base: base, area: layout.journalOffset)
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
                do { try fd.allocate(at: Int(done), count: Int(n)) } catch {
                    throw PoolError.system(error, "cannot allocate \(poolSize) bytes for \(path)")
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
        return try PoolEngine(media: media, readOnly: readOnly, commitMode: commitMode, faults: .fromEnvironment)
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
            journal.overlayWithoutReplay(layout: layout)
            recoveredWords = 0
        } else {
            recoveredWords = try journal.recover(layout: layout, valid: { PoolEngine.isMetadataWord($0, layout) })
        }
        let highWater = journal.load(PoolState.highWaterOffset)
        let allocated = journal.load(PoolState.allocatedOffset)
        guard highWater >= 1, highWater <= layout.blockCount, allocated < layout.blockCount else {
            throw PoolError(.badPool, "\(media.file.map { "\($0.path): " } ?? "")pool counters are out of range (high water \(highWater), allocated \(allocated)); run 'pmem-nbd check --repair \(media.file?.path ?? "POOL")'")
        }
        allocator = Allocator(layout: layout, journal: journal, epochs: epochs, highWater: highWater, allocated: Int64(allocated),
                              holdNodesUntilCheckpoint: !faults.contains(.reuseNodesBeforeCheckpoint))
        rmwLocks = PosixMutexes(count: PoolEngine.stripeCount)
        let epochs = self.epochs
        rmwGuards = (0..<PoolEngine.stripeCount).map { _ in ReadGuard(epochs: epochs) }
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
                    do { try MappedRegion.populateWritable(base + off, count: min(step, length - off)) } catch {
                        Log.warning("prefault: madvise(MADV_POPULATE_WRITE): \(error)")
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
            // Every batch is applied; once that is durable the ring is not needed.
            try checkpoint()
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
        guard !readOnly, !faults.contains(.syncWithoutCommit) else { return }
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
                    journal.release(words)
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
            // Freed map nodes come back only at a checkpoint.
            if allocator.heldUntilCheckpoint > 0 { try checkpoint() }
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

    /// Pins a block: once freed it is not reused until unpinned as often (the feed's hold on
    /// moved blocks, Docs/FEED.md).
    package func pin(_ block: UInt64) { allocator.pin(block) }
    package func unpin(_ block: UInt64) { allocator.unpin(block) }
    package func unpin(_ blocks: some Sequence<UInt64>) { allocator.unpin(blocks) }

    // MARK: space figures

    /// Snapshots' referenced space, walked once each (`usage(of:)`; a snapshot's map never changes).
    package let snapshotReferenced = Locked<[SnapshotKey: UInt64]>([:])
    package struct SnapshotKey: Hashable, Sendable { let id: UInt64, root: UInt64, depth: Int }

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

    /// Engine-owned read epochs for read-modify-write copies, one per stripe lock (see
    /// MapUpdates.swift).
    let rmwGuards: [ReadGuard]
    let rmwLocks: PosixMutexes

    // MARK: buffers for pwrite

    /// Blocks a scratch buffer holds (writes assemble blocks there before `pwrite`).
    package static let scratchBlocks = 64
    private let scratchLock = PosixMutex()
    private var scratchBuffers: [UnsafeMutableRawPointer] = []

    /// A buffer of `scratchBlocks` blocks for the caller's exclusive use (return it).
    package func takeScratch() -> UnsafeMutableRawPointer {
        scratchLock.withLock { scratchBuffers.popLast() }
            ?? UnsafeMutableRawPointer.allocate(byteCount: PoolEngine.scratchBlocks << 12, alignment: 4096)
    }

    package func returnScratch(_ p: UnsafeMutableRawPointer) {
        scratchLock.withLock { scratchBuffers.append(p) }
    }

    // MARK: committing

    /// Blocks the running batch wrote directly (data blocks and new map nodes), page domain:
    /// its commit makes them durable first. Appended inside the gate, taken at the freeze.
    private let writtenLock = PosixMutex()
    private var writtenRuns: [(block: UInt64, count: UInt64)] = []
    private var writtenNodes = false

    /// Records that the current metadata group wrote `count` blocks from `block` directly
    /// (page domain; the gate is held). In the cache-line domain the writer flushes and fences
    /// its own stores instead.
    package func noteWritten(_ block: UInt64, count: Int, node: Bool = false) {
        guard persistence.domain == .page else { return }
        writtenLock.withLock {
            if let last = writtenRuns.last, last.block + last.count == block {
                writtenRuns[writtenRuns.count - 1].count += UInt64(count)
            } else {
                writtenRuns.append((block, UInt64(count)))
            }
            if node { writtenNodes = true }
        }
    }

    /// Batches with more runs of data than this make it durable with one `fdatasync`.
    static let rangeSyncRuns = 1024
    /// Batches of at most this many data blocks (and no new map nodes) write them alongside
    /// the journal, with check records, and need one device flush instead of two.
    static let checkedBlocks: UInt64 = 1024

    /// One commit: freeze, make data durable, append the batch to the ring, apply. Called by
    /// the committer (under its commit lock).
    package func commitOnce() throws(PoolError) -> UInt64 {
        journal.gate.writeLock()
        let counters: [(UInt64, UInt64)] = [
            (PoolState.allocatedOffset, UInt64(max(0, allocator.allocated.load(ordering: .relaxed)))),
            (PoolState.highWaterOffset, allocator.highWaterNow),
        ]
        let frozen = journal.freeze(extra: counters)
        let (runs, nodes) = writtenLock.withLock { () -> ([(block: UInt64, count: UInt64)], Bool) in
            // The commit takes the array; the next batch starts a new one, allocated here (by
            // the committer, not a writer) and not larger than 64 KiB (kept, the array held the
            // capacity of the largest batch, and was copied as the commit still shared it).
            defer {
                let n = min(writtenRuns.count, 4096)
                writtenRuns = []
                writtenRuns.reserveCapacity(n)
                writtenNodes = false
            }
            return (writtenRuns, writtenNodes)
        }
        journal.gate.unlock()
        if !frozen.records.isEmpty {
            persistence.tracer?.phase = "commit"
            let t0 = Log.enabled(.debug) ? MonotonicClock.seconds() : 0
            defer {
                if Log.enabled(.debug) {
                    Log.debug("commit \(frozen.batch): \(frozen.records.count) words, \(runs.count) data runs in \(Int((MonotonicClock.seconds() - t0) * 1e6)) µs")
                }
            }
            try commit(frozen, runs: runs, nodes: nodes)
        }
        allocator.committed(through: frozen.batch)
        return frozen.batch
    }

    /// Makes a frozen batch durable: its data first (or alongside, checked), then the ring.
    private func commit(_ frozen: Journal.Frozen, runs: [(block: UInt64, count: UInt64)], nodes: Bool) throws(PoolError) {
        var checks: [Journal.Check] = []
        var pendingData: [(offset: Int, count: Int)] = []
        if persistence.domain == .page && !runs.isEmpty && !faults.contains(.skipDataSync) {
            // Runs sorted and merged: write-back in ascending order, one call per run.
            var merged: [(offset: Int, count: Int)] = []
            var blocks: UInt64 = 0
            for r in runs.sorted(by: { $0.block < $1.block }) {
                blocks += r.count
                let off = Int(layout.blockOffset(r.block)), n = Int(r.count << 12)
                if let last = merged.last, last.offset + last.count == off {
                    merged[merged.count - 1].count += n
                } else {
                    merged.append((off, n))
                }
            }
            if merged.count > PoolEngine.rangeSyncRuns || persistence.rangeSync == .wholeFile {
                try persistence.syncAll()
            } else {
                for r in merged { try persistence.writeBack(r.offset, r.count, wait: false) }
                let checked = !nodes && blocks <= PoolEngine.checkedBlocks
                    && frozen.records.count + merged.count <= journal.capacity
                if checked {
                    // The data goes to the device alongside the journal; the checks let recovery
                    // tell whether it arrived. Blocks the batch wrote and freed again are left
                    // out: nothing in it refers to them, and they are reused after its commit.
                    if !faults.contains(.skipDataChecks) {
                        let dropped = faults.contains(.checkBlocksFreedInBatch) ? [] : Set(allocator.freed(inBatch: frozen.batch))
                        for r in merged {
                            var off = r.offset
                            let end = r.offset + r.count
                            while off < end {
                                var block = (UInt64(off) - layout.blockAreaOffset) >> 12
                                while off < end && dropped.contains(block) { off += 4096; block += 1 }
                                var n = 0
                                while off + n < end && n < Int(Journal.Check.maxCount) << 12 && !dropped.contains(block + UInt64(n >> 12)) { n += 4096 }
                                if n > 0 {
                                    checks.append(Journal.Check(block: block, count: UInt64(n >> 12),
                                                                crc: PersistentMemory.crc32c(media.base + off, count: n)))
                                }
                                off += n
                            }
                        }
                    }
                    pendingData = merged
                } else {
                    for r in merged { try persistence.writeBack(r.offset, r.count, wait: true) }
                    if !faults.contains(.skipFlushBeforeJournal) { try persistence.flushDevice() }
                }
            }
        }
        if !journal.fits(records: frozen.records.count + checks.count) { try checkpointLocked() }
        if faults.contains(.applyBeforeJournal) {
            for (off, v) in frozen.records { media.base.storeBytes(of: v, toByteOffset: Int(off), as: UInt64.self) }
        }
        let range = try journal.append(frozen.records, checks: checks)
        if !pendingData.isEmpty {
            try persistence.writeBack(range.offset, range.count, wait: false)
            for r in pendingData { try persistence.writeBack(r.offset, r.count, wait: true) }
        }
        try journal.makeDurable(range)
        try journal.apply(frozen)
    }

    private let checkpointCount = Atomic<Int>(0)
    /// Checkpoints since open (the ring's wrap-arounds are paid for by these).
    public var checkpoints: Int { checkpointCount.load(ordering: .relaxed) }

    /// Makes everything applied durable and empties the ring (a checkpoint). Nodes freed in
    /// committed batches can be reused afterwards: no replay reaches them any more.
    public func checkpoint() throws(PoolError) {
        guard !readOnly else { return }
        try committer.withCommitLock { () throws(PoolError) in try checkpointLocked() }
    }

    /// The same, the caller holding the committer's commit lock (or being the only user).
    package func checkpointLocked() throws(PoolError) {
        persistence.tracer?.phase = "checkpoint"
        checkpointCount.add(1, ordering: .relaxed)
        if !faults.contains(.tailBeforeSync) { try persistence.syncAll() }
        try journal.advanceTail()
        allocator.checkpointed()
    }
}
