import Glibc
import PmemSystem
import Synchronization

/// Metadata changes, made atomic in batches, through a ring of batches (format 4).
///
/// Every change to pool metadata (map entries, refcounts, the volume table, the pool state)
/// is an 8-byte word store. Stores first go to a pending overlay in DRAM — readers see them at
/// once — and a commit makes a whole batch durable at once by appending it to the journal ring:
///
/// 1. freeze: under the gate (held shared by every operation for the duration of its stores,
///    so an operation's stores are never split between batches), the running batch becomes
///    the committing batch and a new running batch starts;
/// 2. data: the engine makes the blocks the batch wrote directly (data, new map nodes) durable
///    first — or, for a small batch of data blocks only, writes them alongside the journal and
///    records their CRC-32C in the batch (see `Check`);
/// 3. journal: the batch's (offset, value) records and a header with their CRC-32C are
///    appended to the ring and made durable — the commit point: a torn batch fails its CRC
///    and, with everything after it, is ignored;
/// 4. apply: each word is stored in place (and flushed in the cache-line domain). Applied
///    words need not be durable: the ring keeps every batch since the last checkpoint, and
///    recovery replays them in order (records hold absolute values).
///
/// A checkpoint, when the ring runs short of space (and at close), makes everything applied
/// durable and then moves the ring's tail, recorded twice in the journal header, up to its
/// head. Recovery replays the ring from the tail: work in proportion to what was committed
/// since the last checkpoint, never to the pool's size.
final class Journal: @unchecked Sendable {
    struct Shard {
        var running = WordTable()
        var committing = WordTable()
        var isEmpty: Bool { running.count == 0 && committing.count == 0 }
    }

    static let shardCount = 64

    let base: UnsafeMutableRawPointer
    let persistence: Persistence
    let area: UInt64
    let areaSize: UInt64
    /// Bytes of the ring (the journal area after its header page).
    let ringSize: UInt64
    /// Records one batch may hold (half the ring: a batch always fits after a checkpoint).
    let capacity: Int
    private let shards: UnsafeMutablePointer<Shard>
    /// Shard `i`'s lock is `shardLocks.lock(i)`.
    private let shardLocks = PosixMutexes(count: Journal.shardCount)
    /// Shards holding pending words, running or committing (zero: read the pool directly).
    private let pending = Atomic<Int>(0)
    /// Words reserved by operations storing into the running batch now (their worst case,
    /// released when they end).
    private let reserved = Atomic<Int>(0)
    /// Words in the running batch.
    private let runningCount = Atomic<Int>(0)
    /// Shared by operations while they store; exclusive for the freeze.
    let gate = ReadWriteLock()
    /// Id of the running batch.
    let runningBatch = Atomic<UInt64>(1)

    // Ring state, owned by the committing thread (and by recovery and close).
    /// Where the next batch goes (offset in the ring) and its sequence number.
    private var head: UInt64 = 0
    private var nextSequence: UInt64 = 1
    /// The durable tail: the first batch recovery would replay.
    private(set) var tail = RingPosition(sequence: 1, offset: 0)
    /// Ring bytes from the tail to the head.
    private(set) var used: UInt64 = 0

    init(base: UnsafeMutableRawPointer, persistence: Persistence, area: UInt64, areaSize: UInt64) {
        self.base = base
        self.persistence = persistence
        self.area = area
        self.areaSize = areaSize
        ringSize = areaSize - Journal.ringOffset
        capacity = Int((ringSize / 2 - UInt64(Journal.batchHeaderSize)) / 16)
        shards = .allocate(capacity: Journal.shardCount)
        for i in 0..<Journal.shardCount {
            (shards + i).initialize(to: Shard())
        }
    }

    deinit {
        for i in 0..<Journal.shardCount {
            shards[i].running.release()
            shards[i].committing.release()
        }
        shards.deinitialize(count: Journal.shardCount)
        shards.deallocate()
    }

    @inline(__always) static func hash(_ offset: UInt64) -> UInt64 { (offset >> 3) &* 0x9E37_79B9_7F4A_7C15 }

    /// Words are sharded by 4 KiB page, so that the words of one map node or refcount page are
    /// changed under one lock.
    @inline(__always) private func shardIndex(of offset: UInt64) -> Int {
        Int(((offset >> 12) &* 0xD6E8_FEB8_6659_FD93) >> 58)
    }

    @inline(__always) func poolWord(_ offset: UInt64) -> UnsafeMutablePointer<UInt64> {
        (base + Int(offset)).assumingMemoryBound(to: UInt64.self)
    }

    // MARK: word access

    /// The current value of a metadata word (pending if any, else the pool's).
    @inline(__always)
    func load(_ offset: UInt64) -> UInt64 {
        if pending.load(ordering: .acquiring) != 0 {
            let h = Journal.hash(offset)
            let si = shardIndex(of: offset), s = shards + si
            shardLocks.lock(si)
            if let v = s.pointee.running.value(offset, h) ?? s.pointee.committing.value(offset, h) {
                shardLocks.unlock(si)
                return v
            }
            shardLocks.unlock(si)
        }
        return SharedWord.load(poolWord(offset))
    }

    /// Inserts into a shard's running table (its lock held); counts a shard that had nothing.
    @inline(__always)
    fileprivate func put(_ s: UnsafeMutablePointer<Shard>, _ offset: UInt64, _ h: UInt64, _ value: UInt64) -> UInt64? {
        let wasEmpty = s.pointee.isEmpty
        let old = s.pointee.running.insert(offset, h, value)
        if old == nil { runningCount.add(1, ordering: .relaxed) }
        if wasEmpty { pending.add(1, ordering: .releasing) }
        return old
    }

    /// Stores a word in the running batch. The gate must be held (shared).
    @inline(__always)
    func store(_ offset: UInt64, _ value: UInt64) {
        let h = Journal.hash(offset)
        let si = shardIndex(of: offset), s = shards + si
        shardLocks.lock(si)
        _ = put(s, offset, h, value)
        shardLocks.unlock(si)
    }

    /// Stores a word in the running batch and returns its previous value, under one
    /// acquisition of the shard. The gate must be held (shared).
    @inline(__always)
    func exchange(_ offset: UInt64, _ value: UInt64) -> UInt64 {
        let h = Journal.hash(offset)
        let si = shardIndex(of: offset), s = shards + si
        shardLocks.lock(si)
        let old = put(s, offset, h, value)
        let previous = old ?? s.pointee.committing.value(offset, h) ?? SharedWord.load(poolWord(offset))
        shardLocks.unlock(si)
        return previous
    }

    /// Atomically transforms a word; returns (old, new). The gate must be held (shared).
    @inline(__always)
    func update(_ offset: UInt64, _ transform: (UInt64) -> UInt64) -> (old: UInt64, new: UInt64) {
        let h = Journal.hash(offset)
        let si = shardIndex(of: offset), s = shards + si
        shardLocks.lock(si)
        let old = s.pointee.running.value(offset, h) ?? s.pointee.committing.value(offset, h) ?? SharedWord.load(poolWord(offset))
        let new = transform(old)
        _ = put(s, offset, h, new)
        shardLocks.unlock(si)
        return (old, new)
    }

    /// Copies the 512 words of the 4 KiB page at `page` (pending values included) into `out`,
    /// under one acquisition of its shard: walks that read many words of a page (space usage)
    /// pay one lock per page instead of one per word while writers run.
    func copyPage(_ page: UInt64, into out: UnsafeMutablePointer<UInt64>) {
        precondition(page & 4095 == 0)
        let si = shardIndex(of: page), s = shards + si
        shardLocks.lock(si)
        defer { shardLocks.unlock(si) }
        let empty = s.pointee.isEmpty
        for i in 0..<512 {
            let off = page + UInt64(i << 3)
            if !empty {
                let h = Journal.hash(off)
                if let v = s.pointee.running.value(off, h) ?? s.pointee.committing.value(off, h) {
                    out[i] = v
                    continue
                }
            }
            out[i] = SharedWord.load(poolWord(off))
        }
    }

    /// The running batch's words of one 4 KiB page, under its shard's lock (`withPage`).
    struct PageWords {
        unowned(unsafe) let journal: Journal
        let shard: UnsafeMutablePointer<Shard>

        /// A word's current value (pending if any, else the pool's).
        @inline(__always) func get(_ offset: UInt64) -> UInt64 {
            let h = Journal.hash(offset)
            return shard.pointee.running.value(offset, h) ?? shard.pointee.committing.value(offset, h)
                ?? SharedWord.load(journal.poolWord(offset))
        }

        /// Stores a word in the running batch.
        @inline(__always) func set(_ offset: UInt64, _ value: UInt64) {
            _ = journal.put(shard, offset, Journal.hash(offset), value)
        }

        /// Stores a word in the running batch; returns its previous value.
        @inline(__always) func exchange(_ offset: UInt64, _ value: UInt64) -> UInt64 {
            let h = Journal.hash(offset)
            return journal.put(shard, offset, h, value) ?? shard.pointee.committing.value(offset, h)
                ?? SharedWord.load(journal.poolWord(offset))
        }
    }

    /// Runs `body` with the words of the page holding `offset`, under one lock: batches of
    /// changes to one map node or refcount page. The gate must be held (shared).
    @inline(__always)
    func withPage<T>(_ offset: UInt64, _ body: (PageWords) -> T) -> T {
        let si = shardIndex(of: offset), s = shards + si
        shardLocks.lock(si)
        defer { shardLocks.unlock(si) }
        return body(PageWords(journal: self, shard: s))
    }

    /// Reserves room for `words` more records in the running batch (an operation's worst
    /// case); false when the batch could outgrow its limit (commit first). Held until
    /// `release`; the words the operation stores count from then on. The gate must be held
    /// (shared).
    func tryReserve(_ words: Int) -> Bool {
        let limit = capacity - 64
        while true {
            let r = reserved.load(ordering: .relaxed)
            let n = runningCount.load(ordering: .relaxed)
            if n + r + words > limit { return n == 0 && r == 0 && words <= limit }
            if reserved.compareExchange(expected: r, desired: r + words, ordering: .relaxed).exchanged { return true }
        }
    }

    /// Ends a reservation (the operation's stores are counted as they are).
    func release(_ words: Int) { reserved.subtract(words, ordering: .relaxed) }

    /// Words in the running batch.
    var runningWordCount: Int { runningCount.load(ordering: .relaxed) }

    /// Words in the running batch and reserved for operations storing into it.
    var runningReservation: Int { runningCount.load(ordering: .relaxed) + reserved.load(ordering: .relaxed) }
    var hasPendingWords: Bool { pending.load(ordering: .relaxed) != 0 }

    /// Slots of the overlay's tables (running and committing, every shard) and of the largest
    /// one: what the pending overlay holds in memory (tests check it stays bounded).
    var overlaySlots: (total: Int, largest: Int) {
        var total = 0, largest = 0
        for i in 0..<Journal.shardCount {
            let si = i, s = shards + si
            shardLocks.lock(si)
            total += s.pointee.running.capacity + s.pointee.committing.capacity
            largest = max(largest, s.pointee.running.capacity, s.pointee.committing.capacity)
            shardLocks.unlock(si)
        }
        return (total, largest)
    }

    /// Slots a table keeps once its batch is committed (a larger one is released).
    static var retainedTableSlots: Int { WordTable.retainedCapacity }


    // MARK: commit

    /// A frozen batch: its id and records.
    struct Frozen {
        var batch: UInt64
        var records: [(UInt64, UInt64)]
    }

    /// Freezes the running batch (caller holds the gate exclusively) plus `extra` words.
    func freeze(extra: [(UInt64, UInt64)]) -> Frozen {
        // The pool counters join the batch as ordinary words.
        for (k, v) in extra where load(k) != v { store(k, v) }
        let batch = runningBatch.add(1, ordering: .acquiringAndReleasing).oldValue
        let words = runningCount.exchange(0, ordering: .relaxed)
        var records: [(UInt64, UInt64)] = []
        records.reserveCapacity(words)
        for i in 0..<Journal.shardCount {
            let si = i, s = shards + si
            shardLocks.lock(si)
            precondition(s.pointee.committing.count == 0)
            swap(&s.pointee.running, &s.pointee.committing)
            s.pointee.committing.forEach { records.append(($0, $1)) }
            shardLocks.unlock(si)
        }
        return Frozen(batch: batch, records: records)
    }

    /// Stores the frozen words in place and retires the overlay entries. The words need not
    /// be durable (the ring holds them until a checkpoint): in the cache-line domain they are
    /// flushed and fenced anyway, as that costs little.
    func apply(_ f: Frozen) throws(PoolError) {
        try storeInPlace(f.records)
        var emptied = 0
        for i in 0..<Journal.shardCount {
            let si = i, s = shards + si
            shardLocks.lock(si)
            if s.pointee.committing.count != 0 {
                s.pointee.committing.removeAll()
                if s.pointee.isEmpty { emptied += 1 }
            }
            shardLocks.unlock(si)
        }
        if emptied > 0 { pending.subtract(emptied, ordering: .releasing) }
    }

    /// Stores words in place: through the mapping, or with one `pwrite` per 4 KiB page they
    /// fall in (the page's current contents with the words patched in).
    func storeInPlace(_ records: [(UInt64, UInt64)]) throws(PoolError) {
        guard !records.isEmpty else { return }
        if !persistence.usesPwrite {
            for (off, v) in records {
                SharedWord.store(poolWord(off), v)
                persistence.flush(poolWord(off), 8)
            }
            persistence.drain()
            return
        }
        let sorted = records.sorted { $0.0 < $1.0 }
        let page = UnsafeMutableRawPointer.allocate(byteCount: 4096, alignment: 4096)
        defer { page.deallocate() }
        var i = 0
        while i < sorted.count {
            let start = sorted[i].0 & ~4095
            page.copyMemory(from: base + Int(start), byteCount: 4096)
            while i < sorted.count && sorted[i].0 & ~4095 == start {
                page.storeBytes(of: sorted[i].1, toByteOffset: Int(sorted[i].0 - start), as: UInt64.self)
                i += 1
            }
            try persistence.pwrite(at: Int(start), page, 4096)
        }
    }

    // MARK: the ring (format 4)

    /// Journal area: header copy A at +0, copy B at +2048, the ring of batches from +4096.
    static let ringOffset: UInt64 = 4096
    static let headerCopies: [UInt64] = [0, 2048]
    static let headerMagic: UInt64 = 0x3148_474e_4952_4e50 // "PNRINGH1"
    static let batchMagic: UInt64 = 0x3148_4354_4142_4e50 // "PNBATCH1"
    static let batchHeaderSize = 64
    /// Batch flags: a wrap marker (no records; the next batch is at the ring's start), and
    /// check records present.
    static let wrapFlag: UInt64 = 1, checksFlag: UInt64 = 2
    /// The offset field of a check record has this bit set (word offsets never do).
    static let checkBit: UInt64 = 1 << 63

    /// A position in the ring: a batch's sequence number and its offset in the ring.
    public struct RingPosition: Equatable, Sendable {
        public var sequence: UInt64
        public var offset: UInt64
    }

    /// A run of data blocks written by a batch, with the CRC-32C of their contents: the batch
    /// counts as committed only if they hold that (checked for the newest batch only: a batch
    /// is appended after the previous one's commit completed, device flush included).
    public struct Check: Equatable, Sendable {
        public var block: UInt64
        public var count: UInt64
        public var crc: UInt32
        public init(block: UInt64, count: UInt64, crc: UInt32) {
            self.block = block
            self.count = count
            self.crc = crc
        }

        static let maxCount: UInt64 = (1 << 15) - 1
        /// Bits 0–47 of a check record's offset: its first data block (not a map word).
        static let blockBits: UInt64 = (1 << 48) - 1
        var encoded: (UInt64, UInt64) { (Journal.checkBit | count << 48 | block, UInt64(crc)) }
        static func decode(_ off: UInt64, _ value: UInt64) -> Check {
            Check(block: off & blockBits, count: (off >> 48) & maxCount, crc: UInt32(truncatingIfNeeded: value))
        }
    }

    @inline(__always) static func batchBytes(records: Int) -> UInt64 {
        (UInt64(batchHeaderSize + 16 * records) + 63) & ~63
    }

    /// Ring bytes a batch of `records` records takes at the head now (with the end of the ring
    /// skipped when it does not fit there).
    func bytesNeeded(records: Int) -> UInt64 {
        let size = Journal.batchBytes(records: records)
        return head + size > ringSize ? ringSize - head + size : size
    }

    /// Whether a batch of `records` records fits in the ring without a checkpoint.
    func fits(records: Int) -> Bool { used + bytesNeeded(records: records) <= ringSize }

    /// Whether the ring is more than half used (time for a checkpoint).
    var wantsCheckpoint: Bool { used > ringSize / 2 }

    @inline(__always) private func ringAddress(_ offset: UInt64) -> Int { Int(area + Journal.ringOffset + offset) }

    /// Writes `bytes` into the pool at `at` (pwrite, or stores through the mapping, flushed in
    /// the cache-line domain). Not yet durable.
    private func put(_ bytes: UnsafeRawPointer, _ count: Int, at: Int) throws(PoolError) {
        if persistence.usesPwrite {
            try persistence.pwrite(at: at, bytes, count)
        } else {
            (base + at).copyMemory(from: bytes, byteCount: count)
            persistence.flush(base + at, count)
        }
    }

    /// Encodes a batch header (CRC over its first 32 bytes and then the records).
    private static func encodeHeader(_ h: UnsafeMutableRawPointer, sequence: UInt64, count: UInt64, flags: UInt64) {
        memset(h, 0, batchHeaderSize)
        h.storeBytes(of: batchMagic.littleEndian, toByteOffset: 0, as: UInt64.self)
        h.storeBytes(of: sequence.littleEndian, toByteOffset: 8, as: UInt64.self)
        h.storeBytes(of: count.littleEndian, toByteOffset: 16, as: UInt64.self)
        h.storeBytes(of: flags.littleEndian, toByteOffset: 24, as: UInt64.self)
        let crc = PersistentMemory.crc32c(h + batchHeaderSize, count: Int(count) * 16, seed: PersistentMemory.crc32c(h, count: 32))
        h.storeBytes(of: UInt64(crc).littleEndian, toByteOffset: 32, as: UInt64.self)
    }

    /// Appends a batch at the head of the ring, not yet durable: returns the pool byte range
    /// to make durable (`makeDurable`). The caller checked that it `fits`. A wrap marker that
    /// has to go first is made durable at once (it is needed to find the batch).
    func append(_ records: [(UInt64, UInt64)], checks: [Check]) throws(PoolError) -> (offset: Int, count: Int) {
        let count = records.count + checks.count
        let size = Journal.batchBytes(records: count)
        precondition(count <= capacity, "journal batch over capacity")
        precondition(used + bytesNeeded(records: count) <= ringSize, "journal batch does not fit: checkpoint first")
        if head + size > ringSize {
            let marker = UnsafeMutableRawPointer.allocate(byteCount: Journal.batchHeaderSize, alignment: 64)
            defer { marker.deallocate() }
            Journal.encodeHeader(marker, sequence: nextSequence, count: 0, flags: Journal.wrapFlag)
            try put(marker, Journal.batchHeaderSize, at: ringAddress(head))
            try persistence.syncRange(ringAddress(head), Journal.batchHeaderSize)
            used += ringSize - head
            head = 0
            nextSequence += 1
        }
        // Zeroed; a large batch's buffer is a mapping of its own, given back when it ends (from
        // the heap, the buffers of large batches left their pages resident).
        let block = AnonymousMemory.allocate(byteCount: Int(size))
        defer { AnonymousMemory.release(block) }
        let buffer = block.base
        var r = buffer + Journal.batchHeaderSize
        for (o, v) in records {
            r.storeBytes(of: o.littleEndian, toByteOffset: 0, as: UInt64.self)
            r.storeBytes(of: v.littleEndian, toByteOffset: 8, as: UInt64.self)
            r += 16
        }
        for c in checks {
            let (o, v) = c.encoded
            r.storeBytes(of: o.littleEndian, toByteOffset: 0, as: UInt64.self)
            r.storeBytes(of: v.littleEndian, toByteOffset: 8, as: UInt64.self)
            r += 16
        }
        Journal.encodeHeader(buffer, sequence: nextSequence, count: UInt64(count), flags: checks.isEmpty ? 0 : Journal.checksFlag)
        let at = ringAddress(head)
        try put(buffer, Int(size), at: at)
        head += size
        if head == ringSize { head = 0 }
        used += size
        nextSequence += 1
        return (at, Int(size))
    }

    /// Makes an appended batch durable: the commit point.
    func makeDurable(_ range: (offset: Int, count: Int)) throws(PoolError) {
        try persistence.syncRange(range.offset, range.count)
    }

    /// Records the tail in both header copies, one after the other, each made durable before
    /// the next is written: a crash leaves at least one copy intact, and copy A (written first)
    /// is never older than copy B.
    private func writeTail(_ t: RingPosition) throws(PoolError) {
        let h = UnsafeMutableRawPointer.allocate(byteCount: 64, alignment: 64)
        defer { h.deallocate() }
        memset(h, 0, 64)
        h.storeBytes(of: Journal.headerMagic.littleEndian, toByteOffset: 0, as: UInt64.self)
        h.storeBytes(of: t.sequence.littleEndian, toByteOffset: 8, as: UInt64.self)
        h.storeBytes(of: t.offset.littleEndian, toByteOffset: 16, as: UInt64.self)
        h.storeBytes(of: UInt64(PersistentMemory.crc32c(h, count: 24)).littleEndian, toByteOffset: 24, as: UInt64.self)
        for copy in Journal.headerCopies {
            try put(h, 64, at: Int(area + copy))
            try persistence.syncRange(Int(area + copy), 64)
        }
        tail = t
    }

    /// Moves the tail up to the head. Everything applied must be durable (the caller made it
    /// so: `syncAll` in the page domain; in the cache-line domain applying fenced it).
    func advanceTail() throws(PoolError) {
        try writeTail(RingPosition(sequence: nextSequence, offset: head))
        used = 0
    }

    /// The empty journal of a new pool (format writes it with plain stores).
    static func format(base: UnsafeMutableRawPointer, area: UInt64) {
        writeHeader(base: base, area: area, tail: RingPosition(sequence: 1, offset: 0))
    }

    /// Writes both header copies with plain stores (format, and `check --repair`, which makes
    /// them durable itself).
    static func writeHeader(base: UnsafeMutableRawPointer, area: UInt64, tail: RingPosition) {
        let h = UnsafeMutableRawPointer.allocate(byteCount: 64, alignment: 64)
        defer { h.deallocate() }
        memset(h, 0, 64)
        h.storeBytes(of: headerMagic.littleEndian, toByteOffset: 0, as: UInt64.self)
        h.storeBytes(of: tail.sequence.littleEndian, toByteOffset: 8, as: UInt64.self)
        h.storeBytes(of: tail.offset.littleEndian, toByteOffset: 16, as: UInt64.self)
        h.storeBytes(of: UInt64(PersistentMemory.crc32c(h, count: 24)).littleEndian, toByteOffset: 24, as: UInt64.self)
        for copy in headerCopies { (base + Int(area + copy)).copyMemory(from: h, byteCount: 64) }
    }

    /// A tail past every batch the ring holds, valid or not (the highest sequence number found
    /// anywhere in it, plus one): replaying from there replays nothing. For a journal whose
    /// header is lost.
    static func freshTail(base: UnsafeRawPointer, layout: PoolLayout) -> RingPosition {
        let ring = base + Int(layout.journalOffset + ringOffset)
        var highest: UInt64 = 0
        var pos = 0
        while pos + batchHeaderSize <= Int(layout.journalSize - ringOffset) {
            if UInt64(littleEndian: ring.load(fromByteOffset: pos, as: UInt64.self)) == batchMagic {
                highest = max(highest, UInt64(littleEndian: ring.load(fromByteOffset: pos + 8, as: UInt64.self)))
            }
            pos += 64
        }
        return RingPosition(sequence: highest &+ 1, offset: 0)
    }

    // MARK: reading the ring (recovery, check, read-only opens)

    /// A batch found in the ring.
    public struct Batch {
        public var sequence: UInt64
        public var offset: UInt64
        public var records: [(UInt64, UInt64)]
        public var checks: [Check]
    }

    /// What the journal area holds.
    public struct Scan {
        /// The tail in the header, or nil when neither copy is intact.
        public var tail: RingPosition?
        /// Header copies that failed their checksum (a crash while one was written, or damage).
        public var damagedCopies: [String] = []
        /// The committed batches from the tail, in order.
        public var batches: [Batch] = []
        /// Where the next batch goes after them.
        public var end = RingPosition(sequence: 1, offset: 0)
        /// The newest batch was dropped: its data blocks do not hold what its checks say (its
        /// commit did not complete).
        public var droppedUnverified = false

        public var words: Int { batches.reduce(0) { $0 + $1.records.count } }

        /// One line for `check`.
        public var summary: String {
            var s = batches.isEmpty ? "empty" : "\(batches.count) batch\(batches.count == 1 ? "" : "es") with \(words) words since the last checkpoint (replayed on open)"
            if !damagedCopies.isEmpty { s += "; header copy \(damagedCopies.joined(separator: " and ")) torn (ignored)" }
            if droppedUnverified { s += "; the newest batch's data never reached the media: its commit did not complete (ignored)" }
            return s
        }
    }

    private static func header(_ p: UnsafeRawPointer) -> RingPosition? {
        guard UInt64(littleEndian: p.load(fromByteOffset: 0, as: UInt64.self)) == headerMagic,
              UInt64(littleEndian: p.load(fromByteOffset: 24, as: UInt64.self)) == UInt64(PersistentMemory.crc32c(p, count: 24)) else { return nil }
        return RingPosition(sequence: UInt64(littleEndian: p.load(fromByteOffset: 8, as: UInt64.self)),
                            offset: UInt64(littleEndian: p.load(fromByteOffset: 16, as: UInt64.self)))
    }

    /// Reads the ring from its tail: the committed batches in order, up to the first position
    /// that does not hold the next one (a torn or stale batch, or nothing). The newest batch's
    /// checks, if it has any, are verified against the data blocks.
    public static func scan(base: UnsafeRawPointer, layout: PoolLayout) -> Scan {
        var scan = Scan()
        let area = layout.journalOffset
        let ringSize = layout.journalSize - ringOffset
        let ring = base + Int(area + ringOffset)
        var tail: RingPosition?
        for (name, copy) in zip(["A", "B"], headerCopies) {
            if let t = header(base + Int(area + copy)), t.offset < ringSize, t.offset & 63 == 0 {
                if tail == nil { tail = t }
            } else {
                scan.damagedCopies.append(name)
            }
        }
        guard let tail else { return scan }
        scan.tail = tail
        var pos = tail.offset, seq = tail.sequence
        var travelled: UInt64 = 0
        while travelled < ringSize {
            let h = ring + Int(pos)
            guard ringSize - pos >= UInt64(batchHeaderSize),
                  UInt64(littleEndian: h.load(fromByteOffset: 0, as: UInt64.self)) == batchMagic,
                  UInt64(littleEndian: h.load(fromByteOffset: 8, as: UInt64.self)) == seq else { break }
            let count = UInt64(littleEndian: h.load(fromByteOffset: 16, as: UInt64.self))
            let flags = UInt64(littleEndian: h.load(fromByteOffset: 24, as: UInt64.self))
            guard flags & ~(wrapFlag | checksFlag) == 0, count <= (ringSize - pos - UInt64(batchHeaderSize)) / 16,
                  flags & wrapFlag == 0 || count == 0 else { break }
            let crc = PersistentMemory.crc32c(h + batchHeaderSize, count: Int(count) * 16, seed: PersistentMemory.crc32c(h, count: 32))
            guard UInt64(littleEndian: h.load(fromByteOffset: 32, as: UInt64.self)) == UInt64(crc) else { break }
            if flags & wrapFlag != 0 {
                travelled += ringSize - pos
                pos = 0
                seq += 1
                continue
            }
            var batch = Batch(sequence: seq, offset: pos, records: [], checks: [])
            batch.records.reserveCapacity(Int(count))
            for i in 0..<Int(count) {
                let o = UInt64(littleEndian: h.load(fromByteOffset: batchHeaderSize + 16 * i, as: UInt64.self))
                let v = UInt64(littleEndian: h.load(fromByteOffset: batchHeaderSize + 16 * i + 8, as: UInt64.self))
                if o & checkBit != 0 { batch.checks.append(Check.decode(o, v)) } else { batch.records.append((o, v)) }
            }
            if flags & checksFlag == 0 && !batch.checks.isEmpty { break }
            let size = batchBytes(records: Int(count))
            travelled += size
            pos += size
            if pos == ringSize { pos = 0 }
            seq += 1
            scan.batches.append(batch)
        }
        // Only the newest batch can have data that did not reach the media.
        if let last = scan.batches.last, !last.checks.isEmpty {
            let ok = last.checks.allSatisfy { c in
                c.count > 0 && c.block > 0 && c.block + c.count <= layout.blockCount
                    && PersistentMemory.crc32c(base + Int(layout.blockOffset(c.block)), count: Int(c.count) << 12) == c.crc
            }
            if !ok {
                scan.batches.removeLast()
                scan.droppedUnverified = true
                pos = last.offset
                seq = last.sequence
            }
        }
        scan.end = RingPosition(sequence: seq, offset: pos)
        return scan
    }

    /// Replays the ring into the pool, makes it durable and moves the tail past it. `valid`
    /// checks each record's offset. Returns the number of words replayed.
    func recover(layout: PoolLayout, valid: (UInt64) -> Bool) throws(PoolError) -> Int {
        let scan = Journal.scan(base: base, layout: layout)
        guard scan.tail != nil else {
            throw PoolError(.badPool, "the journal's header is damaged (both copies); run 'pmem-nbd check --repair'")
        }
        var words: [UInt64: UInt64] = [:]
        for b in scan.batches {
            for (off, v) in b.records {
                guard valid(off) else {
                    throw PoolError(.badPool, "journal record for offset \(off) lies outside the metadata areas (corrupt journal); run 'pmem-nbd check'")
                }
                words[off] = v
            }
        }
        head = scan.end.offset
        nextSequence = scan.end.sequence
        tail = scan.tail!
        if scan.batches.isEmpty && scan.damagedCopies.isEmpty && !scan.droppedUnverified && scan.end == scan.tail {
            used = 0
            return 0
        }
        try storeInPlace(words.map { ($0.key, $0.value) })
        try persistence.syncAll()
        try advanceTail()
        return scan.words
    }

    /// Loads the ring's batches as pending words without writing the pool (read-only opens).
    func overlayWithoutReplay(layout: PoolLayout) {
        for b in Journal.scan(base: base, layout: layout).batches {
            for (off, v) in b.records {
                let h = Journal.hash(off)
                let s = shards + shardIndex(of: off)
                if s.pointee.isEmpty { pending.add(1, ordering: .relaxed) }
                _ = s.pointee.committing.insert(off, h, v)
            }
        }
    }
}

/// An open-addressing table of 8-byte words (pool offset → value) for the pending overlay:
/// linear probing, no deletion except all at once, slots remembered in insertion order for
/// iterating and clearing. Offsets are never 0 (the superblock is not journaled). Owned by a
/// shard, used under its lock.
///
/// A table grows with the batch it holds; emptied after that batch's commit, one grown past
/// `retainedCapacity` is released and starts small again. The overlay's memory follows the
/// batches in flight, not the largest batch each of the 128 tables ever held: kept, those made
/// a server's memory creep up for as long as it ran (Docs/RELIABILITY.md, "Load and soak").
/// Tables are mappings of their own: a writer's thread grows one and the committer's releases
/// it, which in the heap left the writers' arenas fragmented and growing.
struct WordTable {
    /// Slots an emptied table keeps (18 KiB); a larger one is released.
    static let retainedCapacity = 1024
    /// Slots of a new table (one page).
    static let initialCapacity = 128
    /// Keys, values and slot indexes, in one block.
    private var block: AnonymousMemory.Block
    private var keys: UnsafeMutablePointer<UInt64>
    private var values: UnsafeMutablePointer<UInt64>
    private var slots: UnsafeMutablePointer<Int32>
    private var mask: Int
    private(set) var count = 0
    /// The capacity the first growth goes to (the previous large batch's), if larger than double.
    private var growTo = 0
    /// Slots (a power of two).
    var capacity: Int { mask + 1 }

    init(capacity: Int = WordTable.initialCapacity) {
        let indexes = capacity / 2 + 1
        block = AnonymousMemory.allocate(byteCount: capacity * 16 + indexes * 4, mapped: true)
        keys = block.base.bindMemory(to: UInt64.self, capacity: capacity)
        values = (block.base + capacity * 8).bindMemory(to: UInt64.self, capacity: capacity)
        slots = (block.base + capacity * 16).bindMemory(to: Int32.self, capacity: indexes)
        mask = capacity - 1
    }

    func release() { AnonymousMemory.release(block) }

    /// `h` is `Journal.hash(key)`.
    @inline(__always) private func slot(_ key: UInt64, _ h: UInt64) -> Int {
        var i = Int(truncatingIfNeeded: h >> 20) & mask
        while true {
            let k = keys[i]
            if k == key || k == 0 { return i }
            i = (i + 1) & mask
        }
    }

    @inline(__always) func value(_ key: UInt64, _ h: UInt64) -> UInt64? {
        if count == 0 { return nil }
        let i = slot(key, h)
        return keys[i] == key ? values[i] : nil
    }

    /// Sets a word; returns its previous value here, if any.
    @inline(__always) mutating func insert(_ key: UInt64, _ h: UInt64, _ value: UInt64) -> UInt64? {
        if count >= (mask + 1) / 2 { grow() }
        let i = slot(key, h)
        if keys[i] == key {
            let old = values[i]
            values[i] = value
            return old
        }
        keys[i] = key
        values[i] = value
        slots[count] = Int32(i)
        count += 1
        return nil
    }

    func forEach(_ body: (UInt64, UInt64) -> Void) {
        for n in 0..<count {
            let i = Int(slots[n])
            body(keys[i], values[i])
        }
    }

    /// Empties the table; one grown past `retainedCapacity` is released and starts again at
    /// `initialCapacity`, remembering the size the batch it held needed: when the next batch
    /// outgrows the small table, it grows to that size at once instead of doubling step by
    /// step (each step copies every word and faults in a fresh mapping).
    mutating func removeAll() {
        if capacity > WordTable.retainedCapacity {
            let next = WordTable.capacity(holding: count)
            release()
            self = WordTable()
            growTo = next
            return
        }
        for n in 0..<count { keys[Int(slots[n])] = 0 }
        count = 0
        growTo = 0
    }

    /// The smallest capacity (a power of two, at least `initialCapacity`) that holds `words`
    /// without growing.
    static func capacity(holding words: Int) -> Int {
        var c = WordTable.initialCapacity
        while c / 2 <= words { c *= 2 }
        return c
    }

    private mutating func grow() {
        let old = self
        self = WordTable(capacity: max((mask + 1) * 2, old.growTo))
        old.forEach { k, v in _ = insert(k, Journal.hash(k), v) }
        old.release()
    }
}
