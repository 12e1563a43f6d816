import Glibc

/// The volume table's records, read and changed through the journal for the volume layer
/// (PmemVolumes/Operations.swift, Deleter.swift), which never sees the journal itself.
/// Changes need a metadata group (`withMetadata`) and, for anything that allocates or frees
/// a slot, the table lock.
extension PoolEngine {
    /// The record in a table slot (nil for a free or unreadable one).
    package func record(slot: Int) -> VolumeRecord? { VolumeRecord.decode(slot: slot, load: journal.load) }

    /// The raw kind word of a slot (`VolumeRecord.Kind`'s raw value, or garbage).
    package func recordKind(slot: Int) -> UInt64 { journal.load(VolumeRecord.offset(slot: slot) + VolumeRecord.kindField) }

    /// The id word of a slot.
    package func recordID(slot: Int) -> UInt64 { journal.load(VolumeRecord.offset(slot: slot) + VolumeRecord.idField) }

    /// Whether the map of a slot's record is empty (a root failing its tag is not).
    package func mapIsEmpty(slot: Int, depth: Int) -> Bool {
        MapEntry.root(journal.load(VolumeRecord.offset(slot: slot) + VolumeRecord.rootField), slot: slot, depth: depth) == 0
    }

    /// Stores a new record's words, giving it the next id and generation and the creation
    /// time (gate held).
    package func storeNew(_ r: inout VolumeRecord) {
        let j = journal
        r.id = j.load(PoolState.nextVolumeIDOffset)
        r.generation = j.load(PoolState.generationOffset)
        r.created = UInt64(time(nil))
        j.store(PoolState.nextVolumeIDOffset, r.id + 1)
        j.store(PoolState.generationOffset, r.generation + 1)
        for (o, v) in r.words() { j.store(o, v) }
    }

    /// Stores one word of a slot's record (`field` is one of `VolumeRecord`'s field offsets;
    /// gate held). The root goes through `storeRoot` or the map operations.
    package func storeRecordField(slot: Int, _ field: UInt64, _ value: UInt64) {
        precondition(field != VolumeRecord.rootField)
        journal.store(VolumeRecord.offset(slot: slot) + field, value)
    }

    /// Clears every word of a slot's record: the slot is free (gate and table lock held).
    /// `afterKind` runs once the kind word is cleared (a test hook).
    package func clearRecord(slot: Int, afterKind: () -> Void = {}) {
        let words = VolumeRecord(slot: slot, kind: .free, id: 0, parent: 0, root: 0, size: 0, depth: 0,
                                 created: 0, generation: 0, name: "").words()
        for (i, (off, _)) in words.enumerated() {
            journal.store(off, 0)
            if i == 0 { afterKind() }
        }
    }

    /// A metadata word as readers see it (pending value first): for tests and diagnostics
    /// that look at raw map words.
    package func metadataWord(at offset: UInt64) -> UInt64 { journal.load(offset) }

    /// Whether the journal holds words not yet in place (tests).
    package var hasPendingWords: Bool { journal.hasPendingWords }

    /// Slots of the journal's overlay tables (tests check they stay bounded).
    package var overlaySlots: (total: Int, largest: Int) { journal.overlaySlots }
}
