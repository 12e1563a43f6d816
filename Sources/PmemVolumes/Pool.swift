import Glibc
import PmemPool
import PmemSystem
import Synchronization

/// A pool's volumes and snapshots over the engine: the catalog the server exports
/// (`vol` and `vol@snap`) and the operations that change it (see Operations.swift).
public final class Pool: @unchecked Sendable {
    public let engine: PoolEngine
    private let cache = Locked<[Int: Volume]>([:])
    let deleter: Deleter
    private let changeHandler = Locked<(@Sendable (UInt64) -> Void)?>(nil)
    private let observerBox = Locked<(any MappingObserver)?>(nil)
    /// Whether an observer is installed (checked on every write without locking).
    let observing = Atomic<Bool>(false)
    /// Test hooks (package access only): places where tests force an interleaving.
    package let testHooks = Locked(PoolTestHooks())
    /// One map lock per table slot. The pool drops a cached `Volume` when its record changes
    /// wholesale (rollback, resize), but a thread may still hold the old object (a feed lease
    /// being granted, a connection finishing a request): both must take the same lock, or two
    /// writers could copy the same map node at once and one's change be lost.
    private let mapLocks = Locked<[Int: PosixMutex]>([:])

    func mapLock(slot: Int) -> PosixMutex {
        mapLocks.withLock { locks in
            if let m = locks[slot] { return m }
            let m = PosixMutex()
            locks[slot] = m
            return m
        }
    }

    /// Table slots of maps being released that the deleter must leave alone for now: a
    /// deletion or rollback holds its map here until the observer has heard of it (see
    /// `releaseToDeleter`).
    let deleterHolds = Locked<Set<Int>>([])

    /// Opens a pool file or device (recovering it) and resumes unfinished deletions.
    public static func open(path: String, readOnly: Bool = false, persistence: PersistenceMode = .auto,
                            lock: Bool = true, commitMode: PoolEngine.CommitMode = .background) throws(PoolError) -> Pool {
        let engine = try PoolEngine.open(path: path, readOnly: readOnly, persistence: persistence, lock: lock, commitMode: commitMode)
        return Pool(engine: engine)
    }

    /// Wraps an open engine. Deletions run on a background thread when the engine commits in
    /// the background; otherwise `runDeletions()` performs them.
    public init(engine: PoolEngine) {
        self.engine = engine
        deleter = Deleter(background: !engine.readOnly && engine.committerMode == .background)
        deleter.pool = self
        deleter.start()
    }

    /// Stops background work and commits. Call last.
    public func close() throws(PoolError) {
        deleter.stop()
        cache.withLock { $0.removeAll() }
        try engine.close()
    }

    /// Called when a volume's contents or size changed wholesale (rollback, resize, delete),
    /// with its id, so the server can disconnect its clients.
    public func onVolumeChange(_ handler: @escaping @Sendable (UInt64) -> Void) { changeHandler.withLock { $0 = handler } }

    /// Installs the mapping-change observer (the feed).
    public func setObserver(_ o: (any MappingObserver)?) {
        observerBox.withLock { $0 = o }
        observing.store(o != nil, ordering: .releasing)
    }

    /// The observer, if one is installed.
    @inline(__always) var observer: (any MappingObserver)? {
        observing.load(ordering: .acquiring) ? observerBox.withLock { $0 } : nil
    }

    /// Wakes the background deleter (tests: as if another deletion were in progress).
    package func wakeDeleter() { deleter.wake() }

    func changed(_ id: UInt64) {
        cache.withLock { c in for (k, v) in c where v.id == id { c.removeValue(forKey: k) } }
        changeHandler.withLock { $0 }?(id)
    }

    // MARK: catalog

    public func records() -> [VolumeRecord] { engine.records() }

    /// The export name of a record: `vol` for a volume, `vol@snap` for a snapshot.
    public static func exportName(_ r: VolumeRecord, in all: [VolumeRecord]) -> String? {
        switch r.kind {
        case .volume: return r.name
        case .snapshot: return all.first { $0.kind == .volume && $0.id == r.parent }.map { "\($0.name)@\(r.name)" }
        default: return nil
        }
    }

    /// Pins a block: once freed it is not reused until unpinned as often (the feed holds the
    /// old block of every move until lease holders have acknowledged it, FEED.md).
    package func pin(_ block: UInt64) { engine.pin(block) }
    package func unpin(_ block: UInt64) { engine.unpin(block) }
    package func unpin(_ blocks: some Sequence<UInt64>) { engine.unpin(blocks) }

    /// The volume or snapshot in a table slot, opened once and shared until it changes.
    public func volume(slot: Int) -> Volume? {
        guard let rec = engine.record(slot: slot),
              rec.kind == .volume || rec.kind == .snapshot else { return nil }
        return cache.withLock { c in
            if let v = c[slot], v.id == rec.id, v.size == rec.size, v.depth == rec.depth { return v }
            let v = Volume(pool: self, record: rec)
            c[slot] = v
            return v
        }
    }

    /// A volume (`vol`) or snapshot (`vol@snap`) by export name.
    public func volume(named name: String) -> Volume? {
        let all = records()
        guard let r = all.first(where: { Pool.exportName($0, in: all) == name }) else { return nil }
        return volume(slot: r.slot)
    }

    /// Every volume and snapshot, volumes first, each followed by its snapshots.
    public func exportable() -> [(name: String, volume: Volume)] {
        let all = records()
        var out: [(String, Volume)] = []
        for v in all where v.kind == .volume {
            if let vol = volume(slot: v.slot) { out.append((v.name, vol)) }
            for s in all where s.kind == .snapshot && s.parent == v.id {
                if let snap = volume(slot: s.slot) { out.append(("\(v.name)@\(s.name)", snap)) }
            }
        }
        return out
    }

    /// Snapshots of the volume with id `id`, oldest first.
    public func snapshots(of id: UInt64) -> [VolumeRecord] {
        records().filter { $0.kind == .snapshot && $0.parent == id }.sorted { $0.generation < $1.generation }
    }
}

/// Callbacks tests install to force interleavings; nil in production.
package struct PoolTestHooks: Sendable {
    /// After a rollback's or deletion's change is durable, before the observer hears of it:
    /// (change, volume or snapshot id).
    package var beforeVolumeEvent: (@Sendable (VolumeChange, UInt64) -> Void)?
    /// In a relocation (copy-on-write for a write lease, or a fence), after it read a range
    /// and before it writes it back: (volume id, first block, reason).
    package var relocationCopied: (@Sendable (UInt64, UInt64, MappingChangeReason) -> Void)?
    /// The deleter, freeing the table slot of a record it has finished, has just cleared the
    /// slot's kind word (the slot).
    package var deleterFreeingSlot: (@Sendable (Int) -> Void)?
    package init() {}
}
