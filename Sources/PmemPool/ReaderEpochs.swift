import PmemSystem
import Synchronization

/// Which connections may still be reading pool memory: epoch-based reclamation. A reader
/// publishes the global epoch while it holds pointers into the pool (from looking up a map
/// until its reply is sent); a freed block is stamped with the epoch and reused only once
/// every active reader entered after that stamp.
package final class ReaderEpochs: @unchecked Sendable {
    static let slotCount = 4096
    private let slots: UnsafeMutablePointer<UInt64>
    private let inUse = Locked<[Bool]>([Bool](repeating: false, count: ReaderEpochs.slotCount))
    private let global = Atomic<UInt64>(1)

    /// Stands in for guards that protect nothing.
    static let inert = ReaderEpochs()

    init() {
        slots = .allocate(capacity: ReaderEpochs.slotCount)
        slots.initialize(repeating: 0, count: ReaderEpochs.slotCount)
    }

    deinit { slots.deallocate() }

    func register() -> Int? {
        inUse.withLock { used in
            guard let i = used.firstIndex(of: false) else { return nil }
            used[i] = true
            return i
        }
    }

    func unregister(_ slot: Int) {
        SharedWord.storeSequentiallyConsistent(slots + slot, 0)
        inUse.withLock { $0[slot] = false }
    }

    @inline(__always) func enter(_ slot: Int) {
        SharedWord.storeSequentiallyConsistent(slots + slot, global.load(ordering: .sequentiallyConsistent))
    }

    @inline(__always) func exit(_ slot: Int) { SharedWord.store(slots + slot, 0) }

    /// Stamps retired blocks: returns the current epoch and starts a new one.
    func advance() -> UInt64 { global.add(1, ordering: .sequentiallyConsistent).oldValue }

    /// The oldest epoch a reader is in, or UInt64.max when none is reading.
    func oldestActive() -> UInt64 {
        var m = UInt64.max
        for i in 0..<ReaderEpochs.slotCount {
            let v = SharedWord.load(slots + i)
            if v != 0 && v < m { m = v }
        }
        return m
    }
}

/// A connection's handle for reading pool memory safely: `enter` before looking blocks up,
/// `exit` once nothing it read from is referenced any more (its replies are sent).
public final class ReadGuard: @unchecked Sendable {
    private let epochs: ReaderEpochs
    private let slot: Int
    /// False for guards that protect nothing (volumes that never move blocks, or no slot left).
    private let active: Bool

    package init(epochs: ReaderEpochs?) {
        if let epochs, let slot = epochs.register() {
            self.epochs = epochs
            self.slot = slot
            active = true
        } else {
            self.epochs = ReaderEpochs.inert
            self.slot = 0
            active = false
        }
    }

    /// A guard that protects nothing (for volumes that never move blocks).
    public static func none() -> ReadGuard { ReadGuard(epochs: nil) }

    /// Whether the guard is entered (protects nothing when there are no epochs).
    public private(set) var isEntered = false

    @inline(__always) public func enter() {
        if active && !isEntered { epochs.enter(slot); isEntered = true }
    }

    @inline(__always) public func exit() {
        if active && isEntered { epochs.exit(slot); isEntered = false }
    }

    deinit { if active { epochs.unregister(slot) } }
}
