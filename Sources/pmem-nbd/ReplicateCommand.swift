import ArgumentParser
import Foundation
import Glibc
import PmemNBD
import PmemSystem

/// `pmem-nbd replicate VOL --to rbd:POOL/IMAGE`: ships the volume's changes to a Ceph RBD image.
struct Replicate: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "replicate",
        abstract: "Replicate a volume to a Ceph RBD image: a snapshot, then the difference since the last one (rbd import-diff).",
        discussion: """
        Each run takes a snapshot VOL@repl-N, sends what changed since the newest repl-N the image \
        also has (everything allocated on the first run; holes stay holes) through `rbd \
        import-diff -`, which writes it and creates the image's snapshot @repl-N, then keeps the \
        newest --keep repl-N snapshots on both sides. The image is created on the first run and \
        marked as this volume's replica (image metadata pmem-nbd.source). A transfer that was \
        interrupted is resumed from the last snapshot both sides have. An image that was written \
        behind our back (its head differs from its last repl-N), or that is not this volume's \
        replica, is refused with nothing changed on either side. With --every the command \
        repeats until stopped; a failed run is retried at the next tick, a refusal ends it. \
        The rbd tool (ceph-common) must reach the cluster: -c/--ceph-conf or $CEPH_CONF. \
        See Docs/SCALE-OUT.md.

        Examples:
          pmem-nbd replicate --pool pool.pmem pmem0 --to rbd:rbd/pmem0
          pmem-nbd replicate --pool pool.pmem pmem0 --to rbd:rbd/pmem0 --every 30s --keep 3
        """)

    @Argument(help: "Volume name.") var volume: String
    @Option(name: .long, help: ArgumentHelp("The RBD image: rbd:POOL/IMAGE.", valueName: "rbd:POOL/IMAGE")) var to: String
    @Option(name: .long, help: ArgumentHelp("Repeat every INTERVAL (e.g. 30s, 5m) until stopped.", valueName: "interval")) var every: String?
    @Option(name: .long, help: "Replicated snapshots to keep on each side (at least 1).") var keep: Int = 2
    @Option(name: [.customShort("c"), .customLong("ceph-conf")], help: ArgumentHelp("Ceph configuration file for rbd (default: $CEPH_CONF, /etc/ceph/ceph.conf).", valueName: "path"))
    var cephConf: String?
    @OptionGroup var access: PoolAccess

    func validate() throws {
        if keep < 1 { throw ValidationError("--keep needs at least 1 (the snapshot the next run starts from)") }
        if let every, Self.seconds(every) == nil { throw ValidationError("--every takes an interval such as 30s, 5m or 1h") }
        do { _ = try RBDTarget(parsing: to) } catch { throw ValidationError(error.description) }
    }

    static func seconds(_ s: String) -> Double? {
        let units: [Character: Double] = ["s": 1, "m": 60, "h": 3600]
        var body = Substring(s), scale = 1.0
        if let u = s.last, let f = units[u] { body = s.dropLast(); scale = f }
        guard let v = Double(body), v > 0 else { return nil }
        return v * scale
    }

    func run() throws {
        try reportingErrors {
            let target = try RBDTarget(parsing: to)
            let rbd = try RBDTool(conf: cephConf)
            let pool = access.pool, control = access.control
            let replicator = RBDReplicator(volume: volume, target: target, rbd: rbd, keep: keep) { request, progress in
                try VolumeCommand.run(request, pool: pool, control: control, progress: progress)
            }
            let interval = every.flatMap(Self.seconds)
            while true {
                let meter = ProgressMeter("replicate")
                do {
                    let o = try replicator.run(progress: meter.update)
                    meter.finish()
                    report(o, target: target)
                } catch let e as PoolErrorLike {
                    meter.finish()
                    guard interval != nil, !e.permanent else { throw ServeError(e.description) }
                    Log.error("\(e.description); retrying in \(every!)")
                }
                guard let interval else { return 0 }
                usleep(UInt32(min(interval, 4000) * 1_000_000))
            }
        }
    }

    func report(_ o: RBDReplicator.Outcome, target: RBDTarget) {
        if access.json {
            print(VolumeRequests.encode([
                "ok": true, "snapshot": o.snapshot, "base": o.base ?? NSNull(), "resumed": o.resumed, "bytes_sent": o.fileBytes,
                "data_bytes": o.dataBytes, "seconds": o.seconds, "pruned": o.pruned, "target": target.description,
            ]))
        } else {
            print("replicated \(volume)@\(o.snapshot) to \(target)@\(o.snapshot): "
                  + (o.base.map { "changes since @\($0)" } ?? "everything allocated") + (o.resumed ? " (resumed)" : "")
                  + ", \(formatBytes(o.fileBytes)) sent in \(String(format: "%.1f", o.seconds)) s"
                  + (o.pruned.isEmpty ? "" : "; pruned \(o.pruned.map { "@\($0)" }.joined(separator: ", "))"))
        }
        fflush(nil)
    }
}

/// Lines under `volume list` for volumes a replicate run reported to the server.
func replicationLines(_ response: [String: Any]) -> String {
    var out: [String] = []
    for row in response["volumes"] as? [[String: Any]] ?? [] {
        guard let r = row["replication"] as? [String: Any], let name = row["name"] as? String else { continue }
        func n(_ k: String) -> Double? { (r[k] as? NSNumber)?.doubleValue }
        var line = "\(name) -> \(r["target"] as? String ?? "?"): "
        if let s = n("last_success") {
            line += "last success \(Int(max(0, Date().timeIntervalSince1970 - s))) s ago (@\(r["snapshot"] as? String ?? "?")), "
                + "lag \(Int(n("lag_seconds") ?? 0)) s, \(formatBytes(UInt64(n("bytes_sent") ?? 0))) sent in \(Int(n("runs") ?? 0)) runs"
        } else {
            line += "no success yet"
        }
        if let e = r["last_error"] as? String { line += "; last run failed: \(e)" }
        out.append(line)
    }
    return out.isEmpty ? "" : "\nREPLICATION\n" + out.joined(separator: "\n")
}
