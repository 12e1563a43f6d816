import PmemPool

/// Why a mapping changes.
public enum MappingChangeReason: UInt8, Sendable {
    case write = 1, trim = 2, zero = 3, copyOnWrite = 4, mediaRelocation = 5, fence = 6
}

/// Changes to volumes as a whole.
public enum VolumeChange: UInt8, Sendable {
    case volumeCreated = 2, volumeDeleted = 3, snapshotCreated = 4, snapshotDeleted = 5, rollback = 6, resized = 7
}

/// Is told where blocks move, and asked before they may (the mapping-change feed implements
/// it; see PmemFeed). Volumes call it on every change of a map entry.
public protocol MappingObserver: AnyObject, Sendable {
    /// Before any block of [first, first+count) of a volume may move: an observer holding write
    /// leases there recalls them (waiting up to their deadline). Called outside all locks.
    /// The observer's own relocations (reasons `copyOnWrite` and `fence`) are not announced:
    /// the observer holds their range alone while they run.
    func beginMove(volume: UInt64, first: UInt64, count: UInt64)
    /// The move announced by `beginMove` is done.
    func endMove(volume: UInt64, first: UInt64, count: UInt64)
    /// Called with the volume's map lock held, inside the metadata group, before the map
    /// changes: virtual blocks `first...` go from `old[i]` to `new[i]` (0 = unmapped).
    func willRemap(volume: UInt64, first: UInt64, old: UnsafeBufferPointer<UInt64>, new: UnsafeBufferPointer<UInt64>,
                   reason: MappingChangeReason)
    /// A volume-level change (after it is durable). `aux`: the snapshot id, or the new size.
    func volumeChanged(_ change: VolumeChange, volume: UInt64, aux: UInt64)
}
