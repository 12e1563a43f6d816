import Foundation
import PmemPool
import PmemSystem
import PmemVolumes

/// The volume and snapshot operations as request → response dictionaries: the control
/// socket's protocol (Docs/CONTROL.md), served by a running server and performed directly by
/// the CLI when the pool is not being served.
public enum VolumeRequests {
    public static let version = 1

    /// What a running server adds to the requests its control socket performs: who is
    /// connected, and where it listens.
    public final class ServerContext: @unchecked Sendable {
        /// NBD connections using any of these volumes or snapshots (record ids).
        let clients: (Set<UInt64>) -> Int
        /// The open connections, as the `connections` request answers.
        let connections: () -> [[String: Any]]
        /// The NBD URIs of the server's listening sockets.
        let uris: [String]
        /// Its listening addresses: `{"unix": PATH}` or `{"host": H, "port": P}`.
        let listeners: [[String: Any]]
        /// Whether clients must use TLS.
        let tlsRequired: Bool

        public init(clients: @escaping (Set<UInt64>) -> Int, connections: @escaping () -> [[String: Any]], uris: [String],
                    listeners: [[String: Any]] = [], tlsRequired: Bool = false) {
            self.clients = clients
            self.connections = connections
            self.uris = uris
            self.listeners = listeners
            self.tlsRequired = tlsRequired
        }
    }

    static let nameRules = "1 to 63 bytes, no '@', '/', spaces or control characters"

    /// Performs one request on a pool; the response says how long it took (`elapsed_us`).
    /// `progress(done, total)` hears from long operations (export-diff) as they go. `server` is
    /// the running server's context (nil when the CLI works on the pool file itself).
    public static func perform(_ request: [String: Any], on pool: Pool, server: ServerContext? = nil,
                               progress: (UInt64, UInt64) -> Void = { _, _ in }) -> [String: Any] {
        let start = MonotonicClock.nanoseconds()
        var response = performUntimed(request, on: pool, server: server, progress: progress)
        response["elapsed_us"] = (MonotonicClock.nanoseconds() - start) / 1000
        return response
    }

    /// A warning when the volumes' sizes add up to more than the pool holds (thin
    /// provisioning: allowed, but writes fail with ENOSPC once the pool is full), as LVM warns
    /// for thin pools.
    static func overcommitWarning(_ pool: Pool) -> String? {
        let total = pool.records().filter { $0.kind == .volume }.reduce(UInt64(0)) { $0 &+ $1.size }
        let space = pool.engine.space
        let capacity = space.blocks << 12
        guard total > capacity else { return nil }
        return "the pool is overcommitted: its volumes add up to \(formatBytes(total)) but it holds \(formatBytes(capacity)), "
            + "of which \(formatBytes(space.free << 12)) are free; writes fail with ENOSPC once it is full"
    }

    static func performUntimed(_ request: [String: Any], on pool: Pool, server: ServerContext?,
                               progress: (UInt64, UInt64) -> Void) -> [String: Any] {
        do {
            guard let op = request["op"] as? String else { throw PoolError(.invalid, "request has no 'op'") }
            func string(_ key: String) throws(PoolError) -> String {
                guard let v = request[key] as? String, !v.isEmpty else { throw PoolError(.invalid, "'\(op)' needs '\(key)'") }
                return v
            }
            func size(_ key: String) throws(PoolError) -> UInt64 {
                if let n = request[key] as? NSNumber, n.int64Value > 0 { return n.uint64Value }
                if let s = request[key] as? String, let n = parseSize(s) { return n }
                throw PoolError(.invalid, "'\(op)' needs '\(key)' (bytes, or a size such as 4G)")
            }
            func record(_ name: String) throws(PoolError) -> VolumeRecord {
                let all = pool.records()
                guard let r = all.first(where: { Pool.exportName($0, in: all) == name }) else {
                    throw PoolError(.notFound, "no volume or snapshot named '\(name)'")
                }
                return r
            }
            func withWarning(_ response: [String: Any]) -> [String: Any] {
                var r = response
                if let w = overcommitWarning(pool) { r["warning"] = w }
                return r
            }
            switch op {
            case "hello":
                var r: [String: Any] = ["ok": true, "version": version, "uuid": pool.engine.superblock.uuidString,
                                        "read_only": pool.engine.readOnly]
                if let server {
                    r["uris"] = server.uris
                    r["listeners"] = server.listeners
                    r["tls_required"] = server.tlsRequired
                }
                return r
            case "list":
                var rows = try list(pool)
                if server != nil {
                    // What replicate runs reported to this server (ReplicationStatus).
                    for i in rows.indices where rows[i]["kind"] as? String == "volume" {
                        if let name = rows[i]["name"] as? String, let r = ReplicationStatus.shared.describe(name) { rows[i]["replication"] = r }
                    }
                }
                return ["ok": true, "volumes": rows, "space": space(pool)]
            case "replicate":
                // One replication run by the server itself (the CLI's `replicate` runs it in the
                // CLI process instead, with its progress bar).
                guard let server else {
                    throw PoolError(.invalid, "'replicate' as a request needs a running server; on a pool file, run pmem-nbd replicate")
                }
                let outcome: RBDReplicator.Outcome
                do {
                    let replicator = RBDReplicator(
                        volume: try string("name"), target: try RBDTarget(parsing: try string("to")),
                        rbd: try RBDTool(conf: request["ceph_conf"] as? String), keep: (request["keep"] as? NSNumber)?.intValue ?? 2
                    ) { r, p in VolumeRequests.perform(r, on: pool, server: server, progress: p) }
                    outcome = try withoutActuallyEscaping(progress) { p in try replicator.run(progress: p) }
                } catch let e as PoolErrorLike {
                    throw PoolError(.invalid, e.description)
                }
                return ["ok": true, "snapshot": outcome.snapshot, "base": outcome.base ?? NSNull(), "resumed": outcome.resumed,
                        "bytes_sent": outcome.fileBytes, "data_bytes": outcome.dataBytes, "seconds": outcome.seconds, "pruned": outcome.pruned]
            case "replication-report":
                // Only a server keeps them; the CLI on an unserved pool has nobody to tell.
                if server != nil { try ReplicationStatus.shared.report(request) }
                return ["ok": true]
            case "connections":
                guard let server else { throw PoolError(.invalid, "the pool is not being served: no connections") }
                return ["ok": true, "connections": server.connections()]
            case "volume-create":
                let r = try pool.createVolume(name: try string("name"), size: try size("size"))
                return withWarning(["ok": true, "volume": try describe(r, pool, usage: false)])
            case "volume-delete":
                let name = try string("name")
                let recursive = request["recursive"] as? Bool ?? false
                if let server, request["force"] as? Bool != true {
                    let r = try record(name)
                    var ids: Set<UInt64> = [r.id]
                    if recursive && r.kind == .volume { ids.formUnion(pool.snapshots(of: r.id).map(\.id)) }
                    let n = server.clients(ids)
                    if n > 0 {
                        throw PoolError(.exists, "volume '\(name)' is in use by \(n) NBD connection\(n == 1 ? "" : "s")"
                                        + " (pmem-nbd connections lists them); add --force to disconnect \(n == 1 ? "it" : "them") and delete it")
                    }
                }
                try pool.delete(name, recursive: recursive)
                return ["ok": true]
            case "volume-resize":
                let name = try string("name")
                let newSize = try size("size")
                let r = try record(name)
                if newSize & ~UInt64(4095) < r.size && request["shrink"] as? Bool != true {
                    throw PoolError(.invalid, "shrinking '\(name)' from \(formatBytes(r.size)) to \(formatBytes(newSize)) discards "
                                    + "its data past \(formatBytes(newSize)); add --shrink to do it (as with qemu-img resize --shrink)")
                }
                try pool.resize(name, size: newSize)
                return newSize > r.size ? withWarning(["ok": true]) : ["ok": true]
            case "snapshot-create":
                let name = try string("name")
                guard let at = name.firstIndex(of: "@") else {
                    throw PoolError(.invalid, "invalid snapshot name '\(name)': snapshots are named VOL@SNAP (e.g. pmem0@before-upgrade), SNAP \(nameRules)")
                }
                let r = try pool.createSnapshot(volume: String(name[..<at]), snapshot: String(name[name.index(after: at)...]))
                return ["ok": true, "snapshot": try describe(r, pool, usage: false)]
            case "snapshot-delete":
                let name = try string("name")
                guard name.contains("@") else { throw PoolError(.invalid, "'\(name)' is not a snapshot: snapshots are named VOL@SNAP") }
                try pool.delete(name)
                return ["ok": true]
            case "snapshot-rollback":
                let kept = try pool.rollback(try string("name"))
                return ["ok": true, "clients_kept": kept]
            case "clone":
                let r = try pool.clone(try string("source"), as: try string("name"))
                return withWarning(["ok": true, "volume": try describe(r, pool, usage: false)])
            case "export-diff":
                let path = try string("path")
                guard path.hasPrefix("/") else { throw PoolError(.invalid, "'export-diff' needs an absolute 'path'") }
                let export = try RBDDiffExport(pool: pool, from: request["from"] as? String, to: try string("to"))
                let s = try export.write(to: path, replacing: request["force"] as? Bool ?? false, progress: progress)
                return ["ok": true, "path": path, "size": s.size, "data_bytes": s.dataBytes, "zero_bytes": s.zeroBytes,
                        "records": s.records, "file_bytes": s.fileBytes]
            case "diff-extents":
                let export = try RBDDiffExport(pool: pool, from: request["from"] as? String, to: try string("to"))
                return ["ok": true, "extents": try export.extents().map { [$0.offset, $0.length] }]
            case "import-diff":
                let path = try string("path")
                guard path.hasPrefix("/") else { throw PoolError(.invalid, "'import-diff' needs an absolute 'path'") }
                let s = try RBDDiffImport(pool: pool, volume: try string("name"), until: request["until"] as? String).apply(from: path, progress: progress)
                return ["ok": true, "diffs": s.diffs, "data_bytes": s.dataBytes, "zero_bytes": s.zeroBytes, "snapshots": s.snapshots,
                        "created": s.createdVolume, "size": s.size, "stream_bytes": s.streamBytes]
            default:
                throw PoolError(.invalid, "unknown op '\(op)'")
            }
        } catch let e as PoolError {
            return ["ok": false, "error": e.message]
        } catch {
            return ["ok": false, "error": "\(error)"]
        }
    }

    /// A record as JSON; with `usage`, its referenced and exclusive bytes (a walk of its map).
    static func describe(_ r: VolumeRecord, _ pool: Pool, usage: Bool = true) throws(PoolError) -> [String: Any] {
        let all = pool.records()
        var d: [String: Any] = [
            "name": Pool.exportName(r, in: all) ?? r.name, "kind": r.kind == .snapshot ? "snapshot" : "volume",
            "size": r.size, "created": r.created, "id": r.id,
        ]
        if usage {
            let u = try pool.usage(of: r)
            d["referenced"] = u.referenced
            d["exclusive"] = u.exclusive
        }
        if r.kind == .volume, r.parent != 0, let origin = all.first(where: { $0.id == r.parent }) {
            d["origin"] = Pool.exportName(origin, in: all) ?? ""
        }
        return d
    }

    static func list(_ pool: Pool) throws(PoolError) -> [[String: Any]] {
        let all = pool.records()
        var out: [[String: Any]] = []
        for v in all where v.kind == .volume {
            out.append(try describe(v, pool))
            for s in all where s.kind == .snapshot && s.parent == v.id { out.append(try describe(s, pool)) }
        }
        return out
    }

    static func space(_ pool: Pool) -> [String: Any] {
        let s = pool.engine.space
        return ["blocks": s.blocks, "allocated_bytes": s.allocated << 12, "free_bytes": s.free << 12,
                "pending_bytes": s.held << 12, "deletions_pending": pool.deletionsPending]
    }

    /// One line of JSON.
    public static func encode(_ object: [String: Any]) -> String {
        guard let data = try? JSONSerialization.data(withJSONObject: object, options: [.sortedKeys]) else { return "{\"ok\":false}" }
        return String(decoding: data, as: UTF8.self)
    }

    public static func decode(_ line: String) -> [String: Any]? {
        (try? JSONSerialization.jsonObject(with: Data(line.utf8))) as? [String: Any]
    }
}
