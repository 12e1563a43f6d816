import Dispatch
import Foundation
import Glibc
import PmemSystem

/// `rbd:POOL/IMAGE[@SNAP]`: an RBD image (or one of its snapshots) as a command names it.
public struct RBDTarget: Sendable, CustomStringConvertible {
    public var pool: String
    public var image: String
    public var snapshot: String?

    public init(parsing s: String, allowSnapshot: Bool = false) throws(PoolErrorLike) {
        guard s.hasPrefix("rbd:") else { throw PoolErrorLike("'\(s)' is not an RBD image: write rbd:POOL/IMAGE") }
        var rest = Substring(s.dropFirst(4))
        var snap: String?
        if let at = rest.firstIndex(of: "@") {
            guard allowSnapshot else { throw PoolErrorLike("'\(s)': name the image, rbd:POOL/IMAGE, without @SNAP") }
            snap = String(rest[rest.index(after: at)...])
            rest = rest[..<at]
        }
        let parts = rest.split(separator: "/", omittingEmptySubsequences: false)
        guard parts.count == 2, !parts[0].isEmpty, !parts[1].isEmpty, snap.map({ !$0.isEmpty }) ?? true else {
            throw PoolErrorLike("'\(s)' is not an RBD image: write rbd:POOL/IMAGE\(allowSnapshot ? "[@SNAP]" : "")")
        }
        for p in parts + (snap.map { [Substring($0)] } ?? []) where p.hasPrefix("-") || p.contains(where: { $0 == " " || $0.asciiValue.map { $0 < 32 } ?? false }) {
            throw PoolErrorLike("'\(s)': RBD names have no spaces or control characters and do not start with '-'")
        }
        pool = String(parts[0])
        image = String(parts[1])
        snapshot = snap
    }

    /// `POOL/IMAGE` as `rbd` takes it.
    public var spec: String { "\(pool)/\(image)" }
    public var description: String { "rbd:\(spec)" + (snapshot.map { "@\($0)" } ?? "") }
}

/// An error with a message for the user.
public struct PoolErrorLike: Error, CustomStringConvertible {
    public let description: String
    /// Retrying cannot help (the image belongs to something else, or diverged).
    public let permanent: Bool
    public init(_ message: String, permanent: Bool = false) {
        description = message
        self.permanent = permanent
    }
}

/// The `rbd` command-line tool, run with deadlines: every call has one, and the Ceph client's
/// own timeouts are set short so an unreachable cluster is an error in seconds, not a hang.
public struct RBDTool: Sendable {
    public let executable: String
    /// A Ceph configuration file (`-c`); nil: rbd's default (`$CEPH_CONF`, /etc/ceph/ceph.conf).
    public let conf: String?
    /// Seconds the client waits for the monitors before giving up.
    public let connectTimeout: Int

    public init(conf: String?, connectTimeout: Int = 20) throws(PoolErrorLike) {
        let dirs = (ProcessInfo.processInfo.environment["PATH"] ?? "/usr/bin:/bin").split(separator: ":").map(String.init)
        let path: String? = dirs.map { $0 + "/rbd" }.first { FileManager.default.isExecutableFile(atPath: $0) }
        guard let path else { throw PoolErrorLike("rbd is not installed (Debian: apt-get install ceph-common)") }
        executable = path
        self.conf = conf
        self.connectTimeout = connectTimeout
    }

    public var arguments: [String] { [executable] + (conf.map { ["-c", $0] } ?? []) }

    /// The client's deadlines, added to the caller's CEPH_ARGS.
    public var environment: [String: String] {
        let t = connectTimeout
        let mine = "--client_mount_timeout=\(t) --rados_mon_op_timeout=\(t) --rados_osd_op_timeout=\(max(t, 60))"
        let theirs = ProcessInfo.processInfo.environment["CEPH_ARGS"].map { $0 + " " } ?? ""
        return ["CEPH_ARGS": theirs + mine]
    }

    public struct Result {
        public var status: Int32
        public var output: String
        public var error: String
        /// The first line of standard error that says what went wrong (rbd prints log noise too).
        public var reason: String {
            let lines = error.split(separator: "\n").map(String.init)
            return lines.first { $0.hasPrefix("rbd:") } ?? lines.last { !$0.isEmpty } ?? "status \(status)"
        }
    }

    /// Runs `rbd ARGS` to completion within `timeout` seconds.
    public func run(_ args: [String], timeout: Int = 60) throws(PoolErrorLike) -> Result {
        let outcome: ChildProcess.Outcome
        do {
            outcome = try ChildProcess.run(executable: executable, arguments: arguments + args, environment: environment,
                                           timeout: .seconds(timeout))
        } catch {
            throw PoolErrorLike("cannot run rbd: \(error)")
        }
        let r = Result(status: outcome.termination?.shellStatus ?? -1,
                       output: String(decoding: outcome.standardOutput, as: UTF8.self),
                       error: String(decoding: outcome.standardError, as: UTF8.self))
        if outcome.timedOut {
            throw PoolErrorLike("rbd \(args.prefix(2).joined(separator: " ")) did not finish within \(timeout) s (is the cluster reachable? \(r.reason))")
        }
        return r
    }

    /// Runs `rbd ARGS` and fails with rbd's reason unless it succeeds.
    @discardableResult
    public func check(_ args: [String], timeout: Int = 60, what: String) throws(PoolErrorLike) -> String {
        let r = try run(args, timeout: timeout)
        guard r.status == 0 else { throw PoolErrorLike("\(what) failed: \(r.reason)") }
        return r.output
    }

    /// Whether the image exists; any answer other than "no such image" that is not a success
    /// (an unreachable cluster, a missing pool) is an error.
    public func info(_ t: RBDTarget) throws(PoolErrorLike) -> [String: Any]? {
        let r = try run(["info", "--format", "json", t.spec])
        if r.status == 0, let d = VolumeRequests.decode(r.output) { return d }
        if r.status == 2 && r.error.contains("error opening image") { return nil }
        if r.error.contains("couldn't connect") || r.error.contains("timed out") {
            throw PoolErrorLike("cannot reach the Ceph cluster\(conf.map { " of \($0)" } ?? ""): \(r.reason)")
        }
        throw PoolErrorLike("cannot look up \(t): \(r.reason)")
    }

    /// The image's snapshots, oldest first.
    public func snapshots(_ t: RBDTarget) throws(PoolErrorLike) -> [String] {
        let out = try check(["snap", "ls", "--format", "json", t.spec], what: "listing the snapshots of \(t)")
        guard let list = (try? JSONSerialization.jsonObject(with: Data(out.utf8))) as? [[String: Any]] else {
            throw PoolErrorLike("rbd snap ls \(t.spec) printed something unexpected")
        }
        return list.sorted { ($0["id"] as? NSNumber)?.int64Value ?? 0 < ($1["id"] as? NSNumber)?.int64Value ?? 0 }
            .compactMap { $0["name"] as? String }
    }

    /// An image metadata value (`rbd image-meta get`), nil when the key is not set.
    public func meta(_ t: RBDTarget, _ key: String) throws(PoolErrorLike) -> String? {
        let r = try run(["image-meta", "get", t.spec, key])
        if r.status == 0 { return r.output.hasSuffix("\n") ? String(r.output.dropLast()) : r.output }
        if r.status == 2 { return nil }
        throw PoolErrorLike("reading the metadata of \(t) failed: \(r.reason)")
    }

    public func setMeta(_ t: RBDTarget, _ key: String, _ value: String) throws(PoolErrorLike) {
        try check(["image-meta", "set", t.spec, key, value], what: "setting the metadata of \(t)")
    }

    public func removeMeta(_ t: RBDTarget, _ key: String) throws(PoolErrorLike) {
        let r = try run(["image-meta", "remove", t.spec, key])
        if r.status != 0 && r.status != 2 { throw PoolErrorLike("removing the metadata of \(t) failed: \(r.reason)") }
    }

    /// The extents of the image's head that differ from snapshot `from`.
    public func changedSince(_ t: RBDTarget, snapshot from: String?, timeout: Int = 600) throws(PoolErrorLike) -> [(offset: UInt64, length: UInt64)] {
        let out = try check(["diff", "--format", "json"] + (from.map { ["--from-snap", $0] } ?? []) + [t.spec], timeout: timeout,
                            what: "rbd diff of \(t)" + (from.map { " since @\($0)" } ?? ""))
        guard let list = (try? JSONSerialization.jsonObject(with: Data(out.utf8))) as? [[String: Any]] else {
            throw PoolErrorLike("rbd diff \(t.spec) printed something unexpected")
        }
        return list.map { (($0["offset"] as? NSNumber)?.uint64Value ?? 0, ($0["length"] as? NSNumber)?.uint64Value ?? 0) }
    }
}

/// Continuous replication of a volume to an RBD image (`pmem-nbd replicate`, Docs/SCALE-OUT.md).
///
/// The state lives in the two places that must agree anyway: the volume's snapshots named
/// `repl-N` (in the pool, durable) and the image's snapshots of the same names, plus two image
/// metadata keys on the RBD side — `pmem-nbd.source` (the pool's UUID and the volume's name: the
/// image belongs to this volume) and `pmem-nbd.inflight` (the snapshot being shipped; set
/// before a transfer, removed after). A run:
/// 1. finds the newest `repl-N` both sides have (the base) and the volume's newer `repl-N`s
///    (pending: a transfer that did not finish);
/// 2. checks the image: it must be ours, and its head must equal the base (`rbd diff
///    --from-snap BASE` empty) unless a transfer to a pending snapshot was interrupted
///    (`pmem-nbd.inflight` names it): then the head may differ only inside the ranges that
///    difference covers (`diff-extents`), whose partial writes the retransfer overwrites;
/// 3. ships the newest pending snapshot, or a new one, as an RBD diff v1 stream from the base
///    (everything allocated when there is none) into `rbd import-diff -`, which writes the
///    blocks and creates the image's snapshot of the same name;
/// 4. prunes `repl-N` snapshots on both sides to the newest `keep`.
/// Nothing is changed on either side before the checks of step 2 pass.
public final class RBDReplicator {
    public typealias Perform = (_ request: [String: Any], _ progress: (UInt64, UInt64) -> Void) throws -> [String: Any]

    public static let prefix = "repl-"
    public static let sourceKey = "pmem-nbd.source"
    public static let inflightKey = "pmem-nbd.inflight"

    let volume: String
    let target: RBDTarget
    let rbd: RBDTool
    let keep: Int
    let perform: Perform
    /// Seconds the transfer may take before rbd is stopped.
    let transferTimeout: Int

    public init(volume: String, target: RBDTarget, rbd: RBDTool, keep: Int = 2, transferTimeout: Int = 3600, perform: @escaping Perform) {
        self.volume = volume
        self.target = target
        self.rbd = rbd
        self.keep = max(1, keep)
        self.perform = perform
        self.transferTimeout = transferTimeout
    }

    public struct Outcome: Sendable {
        public var snapshot: String
        public var base: String?
        public var resumed: Bool
        public var fileBytes: UInt64
        public var dataBytes: UInt64
        public var seconds: Double
        public var pruned: [String]
        /// When the snapshot was taken (unix seconds).
        public var snapshotCreated: Double?
    }

    func request(_ r: [String: Any], progress: (UInt64, UInt64) -> Void = { _, _ in }) throws -> [String: Any] {
        let response = try perform(r, progress)
        guard response["ok"] as? Bool == true else {
            throw PoolErrorLike(response["error"] as? String ?? "the request \(r["op"] ?? "?") failed")
        }
        return response
    }

    static func number(_ snap: String) -> Int? {
        guard snap.hasPrefix(prefix) else { return nil }
        return Int(snap.dropFirst(prefix.count))
    }

    /// The volume's `repl-N` snapshots, by N; the pool's UUID; the volume's size.
    func localState() throws -> (snaps: [String], uuid: String, size: UInt64, created: [String: UInt64]) {
        let hello = try request(["op": "hello"])
        let list = try request(["op": "list"])
        let rows = list["volumes"] as? [[String: Any]] ?? []
        guard let row = rows.first(where: { $0["name"] as? String == volume && $0["kind"] as? String == "volume" }) else {
            throw PoolErrorLike("no volume named '\(volume)' (pmem-nbd volume list shows them)")
        }
        let snaps = rows.compactMap { r -> String? in
            guard let n = r["name"] as? String, n.hasPrefix(volume + "@") else { return nil }
            let s = String(n.dropFirst(volume.count + 1))
            return Self.number(s) == nil ? nil : s
        }.sorted { Self.number($0)! < Self.number($1)! }
        var created: [String: UInt64] = [:]
        for r in rows {
            if let n = r["name"] as? String, n.hasPrefix(volume + "@") { created[String(n.dropFirst(volume.count + 1))] = (r["created"] as? NSNumber)?.uint64Value }
        }
        return (snaps, hello["uuid"] as? String ?? "?", (row["size"] as? NSNumber)?.uint64Value ?? 0, created)
    }

    /// One replication (see the type's description), reported to the pool's server when it
    /// is served (`replication-report`: `volume list` and the metrics show it).
    public func run(progress: @escaping (UInt64, UInt64) -> Void = { _, _ in }) throws -> Outcome {
        var report: [String: Any] = ["op": "replication-report", "volume": volume, "target": target.description]
        do {
            let o = try runOnce(progress: progress)
            report["ok"] = true
            report["snapshot"] = o.snapshot
            report["bytes_sent"] = o.fileBytes
            report["seconds"] = o.seconds
            if let c = o.snapshotCreated { report["snapshot_created"] = c }
            _ = try? perform(report, { _, _ in })
            return o
        } catch {
            report["ok"] = false
            report["error"] = "\(error)"
            _ = try? perform(report, { _, _ in })
            throw error
        }
    }

    /// One replication: see the type's description.
    public func runOnce(progress: @escaping (UInt64, UInt64) -> Void = { _, _ in }) throws -> Outcome {
        let start = MonotonicClock.seconds()
        let local = try localState()
        let source = "\(local.uuid)/\(volume)"
        let info = try rbd.info(target)
        var remote: [String] = []
        var inflight: String?
        if info != nil {
            let owner = try rbd.meta(target, Self.sourceKey)
            guard owner == source else {
                throw PoolErrorLike("\(target) exists and is not a replica of volume '\(volume)' of this pool (its \(Self.sourceKey) is "
                                    + "\(owner.map { "'\($0)'" } ?? "not set"), expected '\(source)'): name another image, or remove it "
                                    + "(rbd rm \(target.spec)) to start over; nothing was changed", permanent: true)
            }
            remote = try rbd.snapshots(target)
            inflight = try rbd.meta(target, Self.inflightKey)
        }
        let base = local.snaps.last { remote.contains($0) }
        let pending = local.snaps.filter { s in base.map { Self.number(s)! > Self.number($0)! } ?? true }
        let resuming = inflight.flatMap { i in pending.contains(i) ? i : nil }
        if info != nil {
            if let base {
                // The head must still be the base: nothing written behind our back.
                if resuming == nil {
                    let changed = try rbd.changedSince(target, snapshot: base)
                    if let first = changed.first {
                        let bytes = changed.reduce(UInt64(0)) { $0 + $1.length }
                        throw PoolErrorLike("\(target) has diverged: it was written since its snapshot @\(base) (\(formatBytes(bytes)) in "
                                            + "\(changed.count) extents, the first at offset \(first.offset)), so the next difference "
                                            + "would not reproduce the volume there. Remove it "
                                            + "(rbd snap purge \(target.spec); rbd rm \(target.spec)) and replicate again to send everything; nothing was changed", permanent: true)
                    }
                }
            } else if resuming == nil || !remote.filter({ Self.number($0) != nil }).isEmpty {
                throw PoolErrorLike("\(target) has no snapshot in common with volume '\(volume)' (it has \(remote.isEmpty ? "none" : remote.map { "@\($0)" }.joined(separator: ", "))"
                                    + "; the volume has \(local.snaps.isEmpty ? "none" : local.snaps.map { "@\($0)" }.joined(separator: ", "))): "
                                    + "remove it (rbd rm \(target.spec)) to send everything again; nothing was changed", permanent: true)
            }
            if let resuming {
                // The interrupted transfer wrote only inside the difference it resends (the
                // first run: inside what it sends at all); a change anywhere else was made
                // behind our back and would survive the resend.
                let changed = try rbd.changedSince(target, snapshot: base)
                if !changed.isEmpty {
                    var r: [String: Any] = ["op": "diff-extents", "to": "\(volume)@\(resuming)"]
                    if let base { r["from"] = "\(volume)@\(base)" }
                    let covered = (try request(r)["extents"] as? [Any] ?? []).compactMap { e -> (UInt64, UInt64)? in
                        guard let pair = e as? [Any], pair.count == 2, let o = pair[0] as? NSNumber, let l = pair[1] as? NSNumber else { return nil }
                        return (o.uint64Value, l.uint64Value)
                    }
                    if let stray = Self.outside(changed, covered) {
                        throw PoolErrorLike("\(target) has diverged: it was written " + (base.map { "since its snapshot @\($0) " } ?? "")
                                            + "outside the interrupted transfer of @\(resuming) (at offset \(stray.offset), "
                                            + "\(formatBytes(stray.length))), so resending it would not reproduce the volume there. Remove it "
                                            + "(rbd snap purge \(target.spec); rbd rm \(target.spec)) and replicate again to send everything; nothing was changed", permanent: true)
                    }
                }
            }
        }

        // Changes start here.
        let snapshot: String
        if let resuming {
            // Its partial writes are exactly what the same difference overwrites.
            snapshot = resuming
        } else {
            let next = (local.snaps.compactMap(Self.number).max() ?? 0) + 1
            snapshot = Self.prefix + String(next)
            _ = try request(["op": "snapshot-create", "name": "\(volume)@\(snapshot)"])
        }
        if info == nil {
            try rbd.check(["create", "--size", "\(local.size)B", target.spec], what: "creating \(target)")
            try rbd.setMeta(target, Self.sourceKey, source)
        }
        try rbd.setMeta(target, Self.inflightKey, snapshot)
        let summary = try ship(from: base, to: snapshot, progress: progress)
        guard try rbd.snapshots(target).contains(snapshot) else {
            throw PoolErrorLike("rbd import-diff ended without creating \(target.spec)@\(snapshot)")
        }
        try rbd.removeMeta(target, Self.inflightKey)

        // Prune: keep the newest `keep` snapshots both sides have; drop older and stale pending ones.
        var pruned: [String] = []
        let after = try localState()
        let now = after.snaps
        let remoteNow = try rbd.snapshots(target)
        let common = now.filter { remoteNow.contains($0) }
        let keepSet = Set(common.suffix(keep))
        for s in now where !keepSet.contains(s) && Self.number(s)! < Self.number(snapshot)! {
            _ = try request(["op": "snapshot-delete", "name": "\(volume)@\(s)"])
            pruned.append(s)
        }
        for s in remoteNow where Self.number(s) != nil && !keepSet.contains(s) && Self.number(s)! < Self.number(snapshot)! {
            try rbd.check(["snap", "rm", "--no-progress", "\(target.spec)@\(s)"], what: "removing \(target.spec)@\(s)")
            if !pruned.contains(s) { pruned.append(s) }
        }
        let seconds = MonotonicClock.seconds() - start
        return Outcome(snapshot: snapshot, base: base, resumed: resuming != nil, fileBytes: summary.fileBytes,
                       dataBytes: summary.dataBytes, seconds: seconds, pruned: pruned,
                       snapshotCreated: after.created[snapshot].map(Double.init))
    }

    /// The first part of `changed` (byte ranges) that no range of `covered` (ascending, not
    /// overlapping) contains, or nil when all of it is covered.
    public static func outside(_ changed: [(offset: UInt64, length: UInt64)], _ covered: [(UInt64, UInt64)]) -> (offset: UInt64, length: UInt64)? {
        for c in changed where c.length > 0 {
            var at = c.offset
            let end = c.offset + c.length
            // The covered ranges are sorted: find the first that ends after `at`, then walk on.
            var lo = 0, hi = covered.count
            while lo < hi {
                let mid = (lo + hi) / 2
                if covered[mid].0 + covered[mid].1 <= at { lo = mid + 1 } else { hi = mid }
            }
            var i = lo
            while at < end {
                guard i < covered.count, covered[i].0 <= at else {
                    let next = i < covered.count ? min(end, covered[i].0) : end
                    return (at, next - at)
                }
                at = min(end, covered[i].0 + covered[i].1)
                i += 1
            }
        }
        return nil
    }

    /// Streams the difference `base` → `snapshot` (a full export without a base) into
    /// `rbd import-diff -` through a FIFO the pool's writer (the server, or this process) fills.
    func ship(from base: String?, to snapshot: String, progress: @escaping (UInt64, UInt64) -> Void) throws -> (fileBytes: UInt64, dataBytes: UInt64) {
        let directory: TemporaryDirectory
        let fifo: String
        let reader: FileDescriptor, holder: FileDescriptor
        do {
            directory = try TemporaryDirectory(prefix: "pmem-nbd-replicate")
            fifo = try directory.makeFIFO("diff")
            // A reader first (without blocking), then a writer of our own: rbd's open and the
            // pool writer's open never wait, and rbd sees the end only once we let go too.
            reader = try FileDescriptor.open(fifo, O_RDONLY | O_NONBLOCK)
            holder = try FileDescriptor.open(fifo, O_WRONLY)
        } catch {
            throw PoolErrorLike("cannot make a FIFO for the transfer: \(error)")
        }
        defer { directory.remove() }
        let child: ChildProcess
        do {
            child = try ChildProcess(executable: rbd.executable, arguments: rbd.arguments + ["import-diff", "--no-progress", "-", target.spec],
                                     environment: rbd.environment, standardInput: .file(fifo), standardOutput: .pipe, standardError: .pipe)
        } catch {
            reader.close(); holder.close()
            throw PoolErrorLike("cannot run rbd import-diff: \(error)")
        }
        reader.close()
        let box = OutcomeBox()
        let done = DispatchSemaphore(value: 0)
        let timeout = transferTimeout
        OSThread.spawn(name: "pmem-rbd-import") {
            box.outcome = child.collect(timeout: .seconds(timeout))
            done.signal()
        }
        var request: [String: Any] = ["op": "export-diff", "to": "\(volume)@\(snapshot)", "path": fifo, "force": true]
        if let base { request["from"] = "\(volume)@\(base)" }
        let response = Result { try perform(request, progress) }
        holder.close()
        done.wait()
        let outcome = box.outcome!
        let err = String(decoding: outcome.standardError, as: UTF8.self)
        let reason = err.split(separator: "\n").first { $0.hasPrefix("rbd:") }.map(String.init) ?? err.split(separator: "\n").last.map(String.init) ?? ""
        if outcome.timedOut { throw PoolErrorLike("rbd import-diff into \(target) did not finish within \(timeout) s; it was stopped") }
        let r = try response.get()
        guard r["ok"] as? Bool == true else {
            throw PoolErrorLike("exporting \(volume)@\(snapshot) failed: \(r["error"] as? String ?? "?")"
                                + (outcome.termination?.shellStatus == 0 ? "" : " (rbd import-diff: \(reason))"))
        }
        guard outcome.termination?.shellStatus == 0 else {
            throw PoolErrorLike("rbd import-diff into \(target) failed: \(reason.isEmpty ? "status \(outcome.termination?.shellStatus ?? -1)" : reason)")
        }
        return ((r["file_bytes"] as? NSNumber)?.uint64Value ?? 0, (r["data_bytes"] as? NSNumber)?.uint64Value ?? 0)
    }
}

private final class OutcomeBox: @unchecked Sendable {
    var outcome: ChildProcess.Outcome?
}
