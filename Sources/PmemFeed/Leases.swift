import FeedWire

/// A lease on a range of a volume's virtual blocks.
final class Lease {
    let id: UInt64
    let mode: LeaseMode
    let volume: UInt64
    let first: UInt64
    let count: UInt64
    var expires: Double
    unowned let session: FeedSession
    /// Write leases: set when recalled, with the deadline.
    var recallDeadline: Double?
    var returned = false
    /// Physical blocks the holder was given (write leases).
    var blocks: [UInt64] = []

    init(id: UInt64, mode: LeaseMode, volume: UInt64, first: UInt64, count: UInt64, expires: Double, session: FeedSession) {
        self.id = id
        self.mode = mode
        self.volume = volume
        self.first = first
        self.count = count
        self.expires = expires
        self.session = session
    }

    @inline(__always) func overlaps(volume v: UInt64, first a: UInt64, count n: UInt64) -> Bool {
        v == volume && a < first + count && first < a + n
    }

    @inline(__always) func covers(volume v: UInt64, block b: UInt64) -> Bool {
        v == volume && b >= first && b < first + count
    }
}

/// A freed-or-moving physical block a read-lease holder may still be reading (or has lent out):
/// released only when the holder acknowledges the event that moved it — not when the lease
/// ends, since a copy or a borrow begun under the lease may still be using the block — or
/// when the holder disconnects or is fenced.
struct Pin {
    var sequence: UInt64
    var block: UInt64
    var lease: UInt64
    /// Monotonic time the pin was taken: a holder that leaves a pin unacknowledged for longer
    /// than the hub's acknowledgement deadline is fenced.
    var since: Double
}

/// Read leases by volume and map leaf (512 blocks): a remap finds the leases over its blocks
/// with one lookup per leaf instead of scanning every lease (lock held).
struct ReadLeaseIndex {
    private struct Key: Hashable {
        var volume: UInt64
        var leaf: UInt64
    }
    private var byLeaf: [Key: [Lease]] = [:]

    private static func leaves(_ l: Lease) -> ClosedRange<UInt64> { (l.first >> 9)...((l.first + l.count - 1) >> 9) }

    mutating func insert(_ l: Lease) {
        for leaf in Self.leaves(l) { byLeaf[Key(volume: l.volume, leaf: leaf), default: []].append(l) }
    }

    mutating func remove(_ l: Lease) {
        for leaf in Self.leaves(l) {
            let k = Key(volume: l.volume, leaf: leaf)
            byLeaf[k]?.removeAll { $0 === l }
            if byLeaf[k]?.isEmpty == true { byLeaf[k] = nil }
        }
    }

    var isEmpty: Bool { byLeaf.isEmpty }

    /// The read leases over any block of leaf `leaf` of `volume`.
    func leases(volume: UInt64, leaf: UInt64) -> [Lease]? { byLeaf[Key(volume: volume, leaf: leaf)] }
}

/// A session's pins in the order they were taken (which is sequence order: pins are taken
/// with the hub locked, as events are numbered): acknowledging releases a prefix.
struct PinQueue {
    private var items: [Pin] = []
    private var head = 0

    var oldest: Pin? { head < items.count ? items[head] : nil }
    var isEmpty: Bool { head == items.count }
    var count: Int { items.count - head }

    mutating func append(_ p: Pin) { items.append(p) }

    /// Removes the pins taken at or before `sequence`, handing their blocks to `release`.
    mutating func removeThrough(_ sequence: UInt64, _ release: (ArraySlice<Pin>) -> Void) {
        var end = head
        while end < items.count && items[end].sequence <= sequence { end += 1 }
        guard end > head else { return }
        release(items[head..<end])
        head = end
        if head == items.count {
            items.removeAll(keepingCapacity: true)
            head = 0
        } else if head >= 4096 && head * 2 >= items.count {
            items.removeSubrange(0..<head)
            head = 0
        }
    }
}
