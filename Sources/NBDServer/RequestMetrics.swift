import NBDWire
import PmemSystem

/// What the server counts about requests, merged over every connection (live and ended):
/// requests and errors by command, bytes moved, and a latency histogram. Each connection keeps
/// its own counters (`ConnectionMetrics`), so the request path takes no lock, allocates nothing
/// and executes no locked instruction; `Server.requestMetrics()` adds them up when asked.
public struct RequestMetrics: Sendable, Equatable {
    /// Requests by command slot (`commandName(slot:)`), including rejected ones.
    public var requests: [UInt64]
    /// Requests answered with an error, by command slot.
    public var errors: [UInt64]
    public var bytesRead: UInt64 = 0
    public var bytesWritten: UInt64 = 0
    public var bytesTrimmed: UInt64 = 0
    public var bytesZeroed: UInt64 = 0
    /// Requests by latency bucket (not cumulative): bucket i counts latencies at most
    /// `latencyBoundsNanoseconds[i]` and above the previous bound; the last bucket is +Inf.
    public var latencyBuckets: [UInt64]
    public var latencySumNanoseconds: UInt64 = 0
    /// Requests whose latency was measured (all of them while timing is on).
    public var latencyCount: UInt64 = 0
    public var connectionsOpen = 0
    public var connectionsTotal: UInt64 = 0

    public init() {
        requests = Array(repeating: 0, count: Self.commandSlots)
        errors = Array(repeating: 0, count: Self.commandSlots)
        latencyBuckets = Array(repeating: 0, count: Self.latencyBoundsNanoseconds.count + 1)
    }

    /// NBD command type codes 0…14 have a slot each; slot 15 is every other code.
    public static let commandSlots = 16

    @inline(__always) static func slot(_ code: UInt16) -> Int { Int(min(code, UInt16(commandSlots - 1))) }

    /// The command a slot counts: `read`, `write`, `flush`… (`other` for unknown codes).
    public static func commandName(slot: Int) -> String {
        if slot == commandSlots - 1 { return "other" }
        guard let t = CommandType(rawValue: UInt16(slot)) else { return "type_\(slot)" }
        return t == .disconnect ? "disc" : t.name.lowercased()
    }

    /// Slots of commands NBD defines.
    public static var knownSlots: [Int] { (0...Int(CommandType.resize.rawValue)).map { $0 } }

    /// Upper bounds of the latency buckets: 2 µs to 1 s.
    public static let latencyBoundsNanoseconds: [UInt64] = [
        2_000, 5_000, 10_000, 20_000, 50_000, 100_000, 200_000, 500_000,
        1_000_000, 2_000_000, 5_000_000, 10_000_000, 20_000_000, 50_000_000, 100_000_000, 200_000_000, 500_000_000,
        1_000_000_000,
    ]

    /// The bucket a latency falls in.
    @inline(__always) static func bucket(_ nanoseconds: UInt64) -> Int {
        let bounds = latencyBoundsNanoseconds
        var i = 0
        while i < bounds.count && nanoseconds > bounds[i] { i += 1 }
        return i
    }
}

/// Positions of a connection's counters in its `CounterBlock`.
enum MetricSlot {
    static func requests(_ code: UInt16) -> Int { RequestMetrics.slot(code) }
    static func errors(_ code: UInt16) -> Int { RequestMetrics.commandSlots + RequestMetrics.slot(code) }
    static let bytesRead = 2 * RequestMetrics.commandSlots
    static let bytesWritten = bytesRead + 1
    static let bytesTrimmed = bytesRead + 2
    static let bytesZeroed = bytesRead + 3
    static let latencyBuckets = bytesRead + 4
    static let latencySum = latencyBuckets + RequestMetrics.latencyBoundsNanoseconds.count + 1
    static let latencyCount = latencySum + 1
    /// Requests whose reply was queued (started minus this: requests in flight).
    static let completed = latencyCount + 1
    static let count = completed + 1
}

/// One connection's counters. `own` is written only by the connection's thread; `offloaded`
/// by the workers that finish FLUSH (and slow FUA) for it, with atomic adds.
final class ConnectionMetrics: @unchecked Sendable {
    let own = CounterBlock(count: MetricSlot.count)
    let offloaded = CounterBlock(count: MetricSlot.count)
    /// Whether latency is measured (two reads of the monotonic clock per request).
    let timed: Bool

    init(timed: Bool) { self.timed = timed }

    /// Counts a request as it starts (before any reply can reach the client); returns the time
    /// it started, or 0 when not timing.
    @inline(__always) func start(_ code: UInt16) -> UInt64 {
        own.add(MetricSlot.requests(code))
        return timed ? MonotonicClock.nanoseconds() : 0
    }

    /// Records a request's latency, unless a worker will (`handedOff`).
    @inline(__always) func finished(started: UInt64, handedOff: Bool) {
        guard !handedOff else { return }
        own.add(MetricSlot.completed)
        if started != 0 { Self.record(latencySince: started, in: own, shared: false) }
    }

    /// Records the latency of a request a worker finished.
    func finishedOffloaded(started: UInt64, failedCode: UInt16?) {
        if let failedCode { offloaded.addShared(MetricSlot.errors(failedCode)) }
        offloaded.addShared(MetricSlot.completed)
        if started != 0 { Self.record(latencySince: started, in: offloaded, shared: true) }
    }

    @inline(__always) static func record(latencySince started: UInt64, in block: CounterBlock, shared: Bool) {
        let ns = MonotonicClock.nanoseconds() &- started
        let b = MetricSlot.latencyBuckets + RequestMetrics.bucket(ns)
        if shared {
            block.addShared(b)
            block.addShared(MetricSlot.latencySum, ns)
            block.addShared(MetricSlot.latencyCount)
        } else {
            block.add(b)
            block.add(MetricSlot.latencySum, ns)
            block.add(MetricSlot.latencyCount)
        }
    }
}

extension RequestMetrics {
    /// Adds the counters of a block.
    mutating func add(_ block: CounterBlock) {
        for s in 0..<Self.commandSlots {
            requests[s] += block.load(s)
            errors[s] += block.load(Self.commandSlots + s)
        }
        bytesRead += block.load(MetricSlot.bytesRead)
        bytesWritten += block.load(MetricSlot.bytesWritten)
        bytesTrimmed += block.load(MetricSlot.bytesTrimmed)
        bytesZeroed += block.load(MetricSlot.bytesZeroed)
        for i in 0..<latencyBuckets.count { latencyBuckets[i] += block.load(MetricSlot.latencyBuckets + i) }
        latencySumNanoseconds += block.load(MetricSlot.latencySum)
        latencyCount += block.load(MetricSlot.latencyCount)
    }
}

/// One connection as `pmem-nbd connections` shows it.
public struct ConnectionInfo: Sendable {
    public var id: UInt64
    public var peer: String
    /// The export it uses (nil while it negotiates).
    public var export: String?
    /// When it was accepted, in seconds since the Unix epoch.
    public var since: Double
    /// Payload bytes it wrote (in) and read (out).
    public var bytesIn: UInt64
    public var bytesOut: UInt64
    public var requests: UInt64
    /// Requests received whose reply is not queued yet.
    public var inFlight: UInt64
}

extension ConnectionMetrics {
    /// Requests started, and those whose reply was queued, over both blocks.
    var requestsAndCompleted: (UInt64, UInt64) {
        var started: UInt64 = 0
        for s in 0..<RequestMetrics.commandSlots { started += own.load(s) }
        return (started, own.load(MetricSlot.completed) + offloaded.load(MetricSlot.completed))
    }
}
