import Foundation
import Glibc
import PmemSystem

/// What `pmem-nbd replicate` runs told the server (`replication-report` requests on the control
/// socket): per volume, the target, the last success, the replicated snapshot's age (the lag),
/// bytes sent. Shown by `volume list` and the metrics. Kept in the server's memory: after a
/// restart it is empty until the next run reports (the replication's own state, the `repl-N`
/// snapshots on both sides, is durable; see Docs/SCALE-OUT.md).
public final class ReplicationStatus: @unchecked Sendable {
    public static let shared = ReplicationStatus()

    public struct Entry: Sendable {
        public var target = ""
        public var runs: UInt64 = 0
        public var failures: UInt64 = 0
        public var bytesSent: UInt64 = 0
        public var lastBytes: UInt64 = 0
        public var lastSeconds: Double = 0
        /// Unix time of the last successful run's end.
        public var lastSuccess: Double?
        /// The snapshot it replicated and when that snapshot was taken (unix seconds).
        public var snapshot: String?
        public var snapshotCreated: Double?
        public var lastError: String?
    }

    private let lock = PosixMutex()
    private var entries: [String: Entry] = [:]

    static func now() -> Double {
        var ts = timespec()
        clock_gettime(CLOCK_REALTIME, &ts)
        return Double(ts.tv_sec) + Double(ts.tv_nsec) / 1e9
    }

    func report(_ r: [String: Any]) throws(PoolErrorLike) {
        guard let volume = r["volume"] as? String, let target = r["target"] as? String else {
            throw PoolErrorLike("'replication-report' needs 'volume' and 'target'")
        }
        func n(_ k: String) -> Double? { (r[k] as? NSNumber)?.doubleValue }
        lock.withLock {
            var e = entries[volume] ?? Entry()
            e.target = target
            e.runs += 1
            if r["ok"] as? Bool == true {
                let bytes = UInt64(n("bytes_sent") ?? 0)
                e.bytesSent += bytes
                e.lastBytes = bytes
                e.lastSeconds = n("seconds") ?? 0
                e.lastSuccess = Self.now()
                e.snapshot = r["snapshot"] as? String
                e.snapshotCreated = n("snapshot_created")
                e.lastError = nil
            } else {
                e.failures += 1
                e.lastError = r["error"] as? String ?? "failed"
            }
            entries[volume] = e
        }
    }

    /// Every volume's entry, by name.
    public func all() -> [(volume: String, entry: Entry)] {
        lock.withLock { entries.sorted { $0.key < $1.key }.map { ($0.key, $0.value) } }
    }

    /// The `replication` object of a volume's row in `list`.
    func describe(_ volume: String) -> [String: Any]? {
        guard let e = lock.withLock({ entries[volume] }) else { return nil }
        var d: [String: Any] = ["target": e.target, "runs": e.runs, "failures": e.failures, "bytes_sent": e.bytesSent,
                                "last_bytes": e.lastBytes, "last_seconds": e.lastSeconds]
        if let s = e.lastSuccess { d["last_success"] = s }
        if let s = e.snapshot { d["snapshot"] = s }
        if let c = e.snapshotCreated { d["lag_seconds"] = max(0, Self.now() - c) }
        if let err = e.lastError { d["last_error"] = err }
        return d
    }
}
