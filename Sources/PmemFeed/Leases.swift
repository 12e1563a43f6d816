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
