import CPmemSupport
import Glibc
import PmemSystem
import Synchronization

/// Metadata changes, made atomic in batches.
///
/// Every change to pool metadata (map entries, refcounts, the volume table, the pool state)
/// is an 8-byte word store. Stores first go to a pending overlay in DRAM — readers see them at
/// once — and a commit makes a whole batch durable at once through the on-media journal:
///
/// 1. freeze: under the gate (held shared by every operation for the duration of its stores,
///    so an operation's stores are never split between batches), the running batch becomes
///    the committing batch and a new running batch starts;
/// 2. data: in page mode fdatasync makes the batch's data blocks durable (in cache-line mode
///    each writer already flushed and fenced its own data before its stores);
/// 3. journal: the batch's (offset, value) records and a header with their CRC-32C are written
///    to the journal area and made durable — this is the commit point: a torn journal fails
///    its CRC and is ignored, and nothing was applied yet;
/// 4. apply: each word is stored in place (and flushed); then, in cache-line mode, a fence and
///    the journal header is marked empty. In page mode the journal stays valid until the next
///    commit's fdatasync has made the applied words durable; replaying it again is harmless
///    because records hold absolute values.
///
/// Recovery replays a valid journal: work in proportion to what was in flight.
public final class Journal: @unchecked Sendable {
    struct Shard {
        var lock = pthread_mutex_t()
        var running: [UInt64: UInt64] = [:]
        var committing: [UInt64: UInt64] = [:]
    }

    static let shardCount = 64
    static let headerSize = 64
    static let magic: UInt64 = 0x3130_4c4e_524a_4e50 // "PNJRNL01"

    let base: UnsafeMutableRawPointer
    let persistence: Persistence
    let area: UInt64
    let areaSize: UInt64
    /// Records the journal area holds.
    public let capacity: Int
    private let shards: UnsafeMutablePointer<Shard>
    /// Words in running + committing (fast path: zero means read the pool directly).
    private let pending = Atomic<Int>(0)
    /// Words reserved by operations admitted to the running batch.
    private let reserved = Atomic<Int>(0)
    /// Shared by operations while they store; exclusive for the freeze.
    public let gate = ReadWriteLock()
    /// Id of the running batch.
    public let runningBatch = Atomic<UInt64>(1)
    private var sequence: UInt64 = 0

    init(base: UnsafeMutableRawPointer, persistence: Persistence, area: UInt64, areaSize: UInt64) {
        self.base = base
        self.persistence = persistence
        self.area = area
        self.areaSize = areaSize
        capacity = Int((areaSize - UInt64(Journal.headerSize)) / 16)
        shards = .allocate(capacity: Journal.shardCount)
        for i in 0..<Journal.shardCount {
            (shards + i).initialize(to: Shard())
            pthread_mutex_init(&shards[i].lock, nil)
        }
    }

    deinit {
        for i in 0..<Journal.shardCount { pthread_mutex_destroy(&shards[i].lock) }
        shards.deinitialize(count: Journal.shardCount)
        shards.deallocate()
    }

    @inline(__always) private func shard(_ offset: UInt64) -> UnsafeMutablePointer<Shard> {
        let h = (offset >> 3) &* 0x9E37_79B9_7F4A_7C15
        return shards + Int(h >> 58)
    }

    @inline(__always) func poolWord(_ offset: UInt64) -> UnsafeMutablePointer<UInt64> {
        (base + Int(offset)).assumingMemoryBound(to: UInt64.self)
    }

    // MARK: word access

    /// The current value of a metadata word (pending if any, else the pool's).
    @inline(__always)
    public func load(_ offset: UInt64) -> UInt64 {
        if pending.load(ordering: .acquiring) != 0 {
            let s = shard(offset)
            pthread_mutex_lock(&s.pointee.lock)
            if let v = s.pointee.running[offset] ?? s.pointee.committing[offset] {
                pthread_mutex_unlock(&s.pointee.lock)
                return v
            }
            pthread_mutex_unlock(&s.pointee.lock)
        }
        return pmem_atomic_load64(poolWord(offset))
    }

    /// Stores a word in the running batch. The gate must be held (shared).
    @inline(__always)
    public func store(_ offset: UInt64, _ value: UInt64) {
        let s = shard(offset)
        pthread_mutex_lock(&s.pointee.lock)
        if s.pointee.running.updateValue(value, forKey: offset) == nil { pending.add(1, ordering: .releasing) }
        pthread_mutex_unlock(&s.pointee.lock)
    }

    /// Stores a word in the running batch and returns its previous value, under one
    /// acquisition of the shard. The gate must be held (shared).
    @inline(__always)
    public func exchange(_ offset: UInt64, _ value: UInt64) -> UInt64 {
        let s = shard(offset)
        pthread_mutex_lock(&s.pointee.lock)
        let old = s.pointee.running.updateValue(value, forKey: offset)
        if old == nil { pending.add(1, ordering: .releasing) }
        let previous = old ?? s.pointee.committing[offset] ?? pmem_atomic_load64(poolWord(offset))
        pthread_mutex_unlock(&s.pointee.lock)
        return previous
    }

    /// Atomically transforms a word; returns (old, new). The gate must be held (shared).
    @inline(__always)
    public func update(_ offset: UInt64, _ transform: (UInt64) -> UInt64) -> (old: UInt64, new: UInt64) {
        let s = shard(offset)
        pthread_mutex_lock(&s.pointee.lock)
        let old = s.pointee.running[offset] ?? s.pointee.committing[offset] ?? pmem_atomic_load64(poolWord(offset))
        let new = transform(old)
        if s.pointee.running.updateValue(new, forKey: offset) == nil { pending.add(1, ordering: .releasing) }
        pthread_mutex_unlock(&s.pointee.lock)
        return (old, new)
    }

    /// Reserves room for `words` more records in the running batch; false when the batch would
    /// outgrow the journal (commit first). The gate must be held (shared).
    public func tryReserve(_ words: Int) -> Bool {
        let limit = capacity - 64
        while true {
            let r = reserved.load(ordering: .relaxed)
            if r + words > limit { return r == 0 && words <= limit }
            if reserved.compareExchange(expected: r, desired: r + words, ordering: .relaxed).exchanged { return true }
        }
    }

    /// Words reserved in the running batch, against `capacity`.
    public var runningReservation: Int { reserved.load(ordering: .relaxed) }
    public var hasPendingWords: Bool { pending.load(ordering: .relaxed) != 0 }

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
        reserved.store(0, ordering: .relaxed)
        var records: [(UInt64, UInt64)] = []
        for i in 0..<Journal.shardCount {
            let s = shards + i
            pthread_mutex_lock(&s.pointee.lock)
            precondition(s.pointee.committing.isEmpty)
            swap(&s.pointee.running, &s.pointee.committing)
            for (k, v) in s.pointee.committing { records.append((k, v)) }
            pthread_mutex_unlock(&s.pointee.lock)
        }
        return Frozen(batch: batch, records: records)
    }

    /// Writes the records to the journal area and makes them durable: the commit point.
    func writeJournal(_ f: Frozen) throws(PoolError) {
        precondition(f.records.count <= capacity, "journal batch over capacity")
        sequence += 1
        let recs = base + Int(area) + Journal.headerSize
        for (i, r) in f.records.enumerated() {
            recs.storeBytes(of: r.0.littleEndian, toByteOffset: 16 * i, as: UInt64.self)
            recs.storeBytes(of: r.1.littleEndian, toByteOffset: 16 * i + 8, as: UInt64.self)
        }
        writeHeader(count: UInt64(f.records.count))
        let bytes = Journal.headerSize + 16 * f.records.count
        if persistence.domain == .cacheline {
            persistence.flush(base + Int(area), bytes)
            persistence.drain()
        } else {
            try persistence.syncRange(Int(area), bytes)
        }
    }

    private func writeHeader(count: UInt64) {
        let h = base + Int(area)
        h.storeBytes(of: Journal.magic.littleEndian, toByteOffset: 0, as: UInt64.self)
        h.storeBytes(of: sequence.littleEndian, toByteOffset: 8, as: UInt64.self)
        h.storeBytes(of: count.littleEndian, toByteOffset: 16, as: UInt64.self)
        let crc = Journal.checksum(h, count: count)
        h.storeBytes(of: UInt64(crc).littleEndian, toByteOffset: 24, as: UInt64.self)
    }

    static func checksum(_ header: UnsafeRawPointer, count: UInt64) -> UInt32 {
        let c = PersistentMemory.crc32c(header, count: 24)
        return PersistentMemory.crc32c(header + headerSize, count: Int(count) * 16, seed: c)
    }

    /// Stores the frozen words in place, makes them durable where the domain orders stores,
    /// and retires the overlay entries.
    func apply(_ f: Frozen) throws(PoolError) {
        for (off, v) in f.records {
            pmem_atomic_store64(poolWord(off), v)
            persistence.flush(poolWord(off), 8)
        }
        if persistence.domain == .cacheline {
            persistence.drain()
            // The words are durable: the journal is no longer needed.
            writeHeader(count: 0)
            persistence.flush(base + Int(area), Journal.headerSize)
            persistence.drain()
        }
        var dropped = 0
        for i in 0..<Journal.shardCount {
            let s = shards + i
            pthread_mutex_lock(&s.pointee.lock)
            dropped += s.pointee.committing.count
            s.pointee.committing.removeAll(keepingCapacity: true)
            pthread_mutex_unlock(&s.pointee.lock)
        }
        pending.subtract(dropped, ordering: .releasing)
    }

    // MARK: recovery

    /// What a journal area holds.
    public enum State: Equatable, Sendable {
        case empty
        /// A committed batch of this many records (it may or may not have been applied).
        case committed(sequence: UInt64, records: Int)
        /// Bytes that do not form a committed batch (a torn write, or garbage): ignored.
        case invalid(String)
    }

    static func inspect(base: UnsafeRawPointer, area: UInt64, areaSize: UInt64) -> State {
        let h = base + Int(area)
        let magic = UInt64(littleEndian: h.load(fromByteOffset: 0, as: UInt64.self))
        if magic == 0 { return .empty }
        guard magic == Journal.magic else { return .invalid("bad journal magic") }
        let seq = UInt64(littleEndian: h.load(fromByteOffset: 8, as: UInt64.self))
        let count = UInt64(littleEndian: h.load(fromByteOffset: 16, as: UInt64.self))
        let crc = UInt64(littleEndian: h.load(fromByteOffset: 24, as: UInt64.self))
        guard count <= (areaSize - UInt64(headerSize)) / 16 else { return .invalid("journal record count out of range") }
        guard UInt64(checksum(h, count: count)) == crc else { return .invalid("journal checksum mismatch (torn or never committed)") }
        return count == 0 ? .empty : .committed(sequence: seq, records: Int(count))
    }

    /// The records of a committed journal.
    static func records(base: UnsafeRawPointer, area: UInt64, count: Int) -> [(UInt64, UInt64)] {
        let r = base + Int(area) + headerSize
        return (0..<count).map {
            (UInt64(littleEndian: r.load(fromByteOffset: 16 * $0, as: UInt64.self)),
             UInt64(littleEndian: r.load(fromByteOffset: 16 * $0 + 8, as: UInt64.self)))
        }
    }

    /// Replays a committed journal into the pool and marks it empty. `valid` checks each
    /// record's offset. Returns the number of words replayed.
    func recover(valid: (UInt64) -> Bool) throws(PoolError) -> Int {
        switch Journal.inspect(base: base, area: area, areaSize: areaSize) {
        case .empty:
            return 0
        case .invalid:
            // Nothing was applied from a batch whose journal never became valid.
            clearHeader()
            try persistence.syncRange(Int(area), Journal.headerSize)
            return 0
        case .committed(let seq, let count):
            let recs = Journal.records(base: base, area: area, count: count)
            for (off, _) in recs where !valid(off) {
                throw PoolError(.badPool, "journal record for offset \(off) lies outside the metadata areas (corrupt journal); run 'pmem-nbd check'")
            }
            for (off, v) in recs {
                pmem_atomic_store64(poolWord(off), v)
                persistence.flush(poolWord(off), 8)
            }
            if persistence.domain == .cacheline { persistence.drain() } else { try persistence.syncAll() }
            sequence = seq
            writeHeader(count: 0)
            try persistence.syncRange(Int(area), Journal.headerSize)
            return count
        }
    }

    /// After everything applied is durable (clean close): leave an empty journal behind.
    func markEmpty() throws(PoolError) {
        writeHeader(count: 0)
        try persistence.syncRange(Int(area), Journal.headerSize)
    }

    private func clearHeader() {
        let h = base + Int(area)
        for i in 0..<4 { h.storeBytes(of: UInt64(0), toByteOffset: 8 * i, as: UInt64.self) }
    }

    /// Loads a committed journal as pending words without writing the pool (read-only opens).
    func overlayWithoutReplay() {
        guard case .committed(_, let count) = Journal.inspect(base: base, area: area, areaSize: areaSize) else { return }
        for (off, v) in Journal.records(base: base, area: area, count: count) {
            let s = shard(off)
            if s.pointee.committing.updateValue(v, forKey: off) == nil { pending.add(1, ordering: .relaxed) }
        }
    }
}
