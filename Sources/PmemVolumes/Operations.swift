import Glibc
import PmemPool
import PmemSystem

/// Volume and snapshot operations. Each is one atomic group of metadata words (so a crash
/// leaves it done or not done) and is durable when it returns. Creating a snapshot or a clone
/// is O(1): the new map shares the volume's root node (one more reference); the first write to
/// a shared node copies it. Deleting marks the map as being deleted and returns; its blocks are
/// released in the background by work proportional to what is freed.
extension Pool {
    /// Words a table change writes at most (a record, a refcount, counters).
    static let tableWords = 64

    func findRecord(_ name: String) throws(PoolError) -> VolumeRecord {
        let all = records()
        guard let r = all.first(where: { Pool.exportName($0, in: all) == name }) else {
            throw PoolError(.notFound, "no volume or snapshot named '\(name)'")
        }
        return r
    }

    func freeSlot() throws(PoolError) -> Int {
        for slot in 0..<PoolLayout.volumeEntries
        where engine.recordKind(slot: slot) == VolumeRecord.Kind.free.rawValue {
            return slot
        }
        throw PoolError(.noSpace, "the volume table is full (\(PoolLayout.volumeEntries) volumes and snapshots)")
    }

    func checkWritable() throws(PoolError) {
        if engine.readOnly { throw PoolError(.readOnly, "the pool is open read-only") }
    }

    /// Stores a record's words and takes a new id and generation (gate held).
    func storeNew(_ r: inout VolumeRecord) { engine.storeNew(&r) }

    // MARK: volumes

    /// Creates an empty (thin) volume.
    @discardableResult
    public func createVolume(name: String, size: UInt64) throws(PoolError) -> VolumeRecord {
        try checkWritable()
        let observer = self.observer
        guard VolumeRecord.validName(name) else { throw PoolError(.invalid, "invalid volume name '\(name)' (1 to 63 bytes, no '@', '/', spaces or control characters)") }
        let size = size & ~UInt64(4095)
        guard size > 0, size <= 1 << 50 else { throw PoolError(.invalid, "volume size must be between 4 KiB and 1 PiB") }
        let rec: VolumeRecord = try engine.tableLock.withLock { () throws(PoolError) in
            if records().contains(where: { $0.kind == .volume && $0.name == name }) { throw PoolError(.exists, "a volume named '\(name)' exists") }
            var r = VolumeRecord(slot: try freeSlot(), kind: .volume, id: 0, parent: 0, root: 0, size: size,
                                 depth: VolumeRecord.depth(forSize: size), created: 0, generation: 0, name: name)
            try engine.withMetadata(words: Pool.tableWords) { storeNew(&r) }
            return r
        }
        try engine.sync()
        observer?.volumeChanged(.volumeCreated, volume: rec.id, aux: 0)
        return rec
    }

    /// Takes a snapshot of a volume: every write completed before the call is in it, none
    /// issued after it returns; it is durable on return.
    @discardableResult
    public func createSnapshot(volume name: String, snapshot: String) throws(PoolError) -> VolumeRecord {
        try checkWritable()
        guard VolumeRecord.validName(snapshot) else {
            throw PoolError(.invalid, "invalid snapshot name '\(snapshot)' (1 to 63 bytes, no '@', '/', spaces or control characters)")
        }
        let vr = try findRecord(name)
        guard vr.kind == .volume, let vol = volume(slot: vr.slot) else { throw PoolError(.invalid, "'\(name)' is not a volume") }
        // Write leases on the volume are recalled first: their holders must stop storing into
        // blocks the snapshot is about to share.
        let observer = self.observer
        observer?.beginMove(volume: vr.id, first: 0, count: vol.size >> 12)
        defer { observer?.endMove(volume: vr.id, first: 0, count: vol.size >> 12) }
        let rec: VolumeRecord = try engine.tableLock.withLock { () throws(PoolError) in
            if snapshots(of: vr.id).contains(where: { $0.name == snapshot }) { throw PoolError(.exists, "\(name)@\(snapshot) exists") }
            let slot = try freeSlot()
            return try engine.withMetadata(words: Pool.tableWords) { () throws(PoolError) -> VolumeRecord in
                // The map lock orders the snapshot against writes' metadata groups.
                vol.mapLock.lock()
                defer { vol.mapLock.unlock() }
                let root = try engine.root(at: vol.rootOffset, depth: vol.depth)
                var r = VolumeRecord(slot: slot, kind: .snapshot, id: 0, parent: vr.id, root: root, size: vol.size,
                                     depth: vol.depth, created: 0, generation: 0, name: snapshot)
                storeNew(&r)
                engine.shareMap(root: root, depth: vol.depth)
                return r
            }
        }
        try engine.sync()
        observer?.volumeChanged(.snapshotCreated, volume: vr.id, aux: rec.id)
        return rec
    }

    /// A new writable volume sharing a snapshot's blocks.
    @discardableResult
    public func clone(_ source: String, as name: String) throws(PoolError) -> VolumeRecord {
        try checkWritable()
        guard VolumeRecord.validName(name) else {
            throw PoolError(.invalid, "invalid volume name '\(name)' (1 to 63 bytes, no '@', '/', spaces or control characters)")
        }
        let sr = try findRecord(source)
        guard sr.kind == .snapshot else { throw PoolError(.invalid, "'\(source)' is not a snapshot (clone takes VOL@SNAP)") }
        let rec: VolumeRecord = try engine.tableLock.withLock { () throws(PoolError) in
            if records().contains(where: { $0.kind == .volume && $0.name == name }) { throw PoolError(.exists, "a volume named '\(name)' exists") }
            let slot = try freeSlot()
            return try engine.withMetadata(words: Pool.tableWords) { () throws(PoolError) -> VolumeRecord in
                let root = try engine.root(at: VolumeRecord.offset(slot: sr.slot) + VolumeRecord.rootField, depth: sr.depth)
                var r = VolumeRecord(slot: slot, kind: .volume, id: 0, parent: sr.id, root: root, size: sr.size,
                                     depth: sr.depth, created: 0, generation: 0, name: name)
                storeNew(&r)
                engine.shareMap(root: root, depth: sr.depth)
                return r
            }
        }
        try engine.sync()
        observer?.volumeChanged(.volumeCreated, volume: rec.id, aux: sr.id)
        return rec
    }

    /// Replaces a volume's contents with a snapshot's, atomically. The volume's old map is
    /// released in the background. Clients of the volume stay connected and their next
    /// requests see the new contents — unless the volume was resized since the snapshot (its
    /// size or map depth differs), when they are disconnected as by a resize, since NBD cannot
    /// announce a new size. Returns whether they were kept.
    ///
    /// The swap happens with every read-modify-write stripe lock held, so no partial-block
    /// write is between reading its old block and publishing the new one: each 4 KiB block a
    /// concurrent write touches is based entirely on the old contents (and is then dropped
    /// with them) or entirely on the new.
    @discardableResult
    public func rollback(_ snapshotName: String) throws(PoolError) -> Bool {
        try checkWritable()
        let sr = try findRecord(snapshotName)
        guard sr.kind == .snapshot, let vr = records().first(where: { $0.kind == .volume && $0.id == sr.parent }),
              let vol = volume(slot: vr.slot) else { throw PoolError(.invalid, "'\(snapshotName)' is not a snapshot") }
        let observer = self.observer
        observer?.beginMove(volume: vr.id, first: 0, count: max(vol.size, sr.size) >> 12)
        defer { observer?.endMove(volume: vr.id, first: 0, count: max(vol.size, sr.size) >> 12) }
        let keepsClients = sr.size == vr.size && sr.depth == vr.depth
        var held: [Int] = []
        defer { releaseToDeleter(held) }
        try engine.tableLock.withLock { () throws(PoolError) in
            let slot = try freeSlot()
            // The old map goes to the deleter only once the rollback event is out (below).
            holdFromDeleter(slot, in: &held)
            // Before the metadata gate, as writers take their stripes.
            try engine.withEveryStripeLocked { () throws(PoolError) in
            try engine.withMetadata(words: Pool.tableWords * 2) { () throws(PoolError) in
                vol.mapLock.lock()
                defer { vol.mapLock.unlock() }
                let o = VolumeRecord.offset(slot: vr.slot)
                let old = try engine.root(at: o + VolumeRecord.rootField, depth: vr.depth)
                let snapRoot = try engine.root(at: VolumeRecord.offset(slot: sr.slot) + VolumeRecord.rootField, depth: sr.depth)
                engine.shareMap(root: snapRoot, depth: sr.depth)
                engine.storeRoot(snapRoot, at: o + VolumeRecord.rootField, depth: sr.depth)
                engine.storeRecordField(slot: vr.slot, VolumeRecord.sizeField, sr.size)
                engine.storeRecordField(slot: vr.slot, VolumeRecord.depthField, UInt64(sr.depth))
                if old != 0 {
                    // The old map becomes a hidden record the deleter releases.
                    var dead = VolumeRecord(slot: slot, kind: .deleting, id: 0, parent: vr.id, root: old, size: vr.size,
                                            depth: vr.depth, created: 0, generation: 0, name: "rollback-of-\(vr.id)")
                    storeNew(&dead)
                }
            }
            }
        }
        try engine.sync()
        testHooks.withLock { $0.beforeVolumeEvent }?(.rollback, vr.id)
        observer?.volumeChanged(.rollback, volume: vr.id, aux: sr.id)
        // Same size and depth: the open Volume (and its clients) read the new root as it is.
        if !keepsClients { changed(vr.id) }
        return keepsClients
    }

    /// Deletes a volume (with `recursive`, its snapshots too) or a snapshot. Returns once the
    /// deletion is durable; the space comes back as the deleter releases it.
    public func delete(_ name: String, recursive: Bool = false) throws(PoolError) {
        try checkWritable()
        let r = try findRecord(name)
        var doomed = [r]
        if r.kind == .volume {
            let snaps = snapshots(of: r.id)
            if !snaps.isEmpty && !recursive {
                throw PoolError(.exists, "volume '\(name)' has \(snaps.count) snapshot(s); delete them first or use --recursive")
            }
            doomed += snaps
        }
        let observer = self.observer
        for d in doomed { observer?.beginMove(volume: d.id, first: 0, count: d.size >> 12) }
        defer { for d in doomed { observer?.endMove(volume: d.id, first: 0, count: d.size >> 12) } }
        // The maps go to the deleter only once their deletion events are out (below).
        var held: [Int] = []
        defer { releaseToDeleter(held) }
        for d in doomed { holdFromDeleter(d.slot, in: &held) }
        try engine.tableLock.withLock { () throws(PoolError) in
            try engine.withMetadata(words: 8 * doomed.count + 8) {
                for d in doomed {
                    engine.storeRecordField(slot: d.slot, VolumeRecord.kindField, VolumeRecord.Kind.deleting.rawValue)
                }
            }
        }
        try engine.sync()
        for d in doomed { testHooks.withLock { $0.beforeVolumeEvent }?(d.kind == .snapshot ? .snapshotDeleted : .volumeDeleted, d.id) }
        for d in doomed {
            observer?.volumeChanged(d.kind == .snapshot ? .snapshotDeleted : .volumeDeleted, volume: d.kind == .snapshot ? d.parent : d.id, aux: d.id)
            changed(d.id)
        }
    }

    /// Keeps the map in `slot` from the deleter (recorded in `held` for `releaseToDeleter`).
    /// A whole map is released only after the observer has published the event that ends its
    /// use and taken its holds: a deleter already at work on something else would otherwise
    /// free the map's blocks before any reader of it had been told (Docs/FEED.md, G4).
    func holdFromDeleter(_ slot: Int, in held: inout [Int]) {
        deleterHolds.withLock { _ = $0.insert(slot) }
        held.append(slot)
    }

    /// Hands held maps to the deleter and wakes it.
    func releaseToDeleter(_ held: [Int]) {
        guard !held.isEmpty else { return }
        deleterHolds.withLock { for s in held { $0.remove(s) } }
        deleter.wake()
    }

    /// Grows or shrinks a volume. Growing past what the map's depth covers adds levels on top
    /// (the old root becomes entry 0 of a new root); shrinking unmaps the tail first.
    /// Clients of the volume are disconnected (NBD cannot announce a new size).
    public func resize(_ name: String, size newSize: UInt64) throws(PoolError) {
        try checkWritable()
        let r = try findRecord(name)
        guard r.kind == .volume, let vol = volume(slot: r.slot) else { throw PoolError(.invalid, "'\(name)' is not a volume") }
        let size = newSize & ~UInt64(4095)
        guard size > 0, size <= 1 << 50 else { throw PoolError(.invalid, "volume size must be between 4 KiB and 1 PiB") }
        let observer = self.observer
        observer?.beginMove(volume: r.id, first: 0, count: max(r.size, size) >> 12)
        defer { observer?.endMove(volume: r.id, first: 0, count: max(r.size, size) >> 12) }
        if size < r.size { try vol.unmap(first: size >> 12, end: r.size >> 12) }
        let depth = max(r.depth, VolumeRecord.depth(forSize: size))
        var spares = try NodeSpares(engine, count: depth - r.depth + 1)
        try engine.tableLock.withLock { () throws(PoolError) in
            try engine.withMetadata(words: Pool.tableWords) { () throws(PoolError) in
                vol.mapLock.lock()
                defer { vol.mapLock.unlock() }
                let o = VolumeRecord.offset(slot: r.slot)
                try engine.deepenMap(rootOffset: o + VolumeRecord.rootField, depth: r.depth, to: depth, spares: &spares)
                engine.storeRecordField(slot: r.slot, VolumeRecord.depthField, UInt64(depth))
                engine.storeRecordField(slot: r.slot, VolumeRecord.sizeField, size)
            }
        }
        try engine.sync()
        observer?.volumeChanged(.resized, volume: r.id, aux: size)
        changed(r.id)
    }
}
