import Foundation
import PmemPool
import PmemVolumes

/// The volume and snapshot operations as request → response dictionaries: the control
/// socket's protocol (Docs/CONTROL.md), served by a running server and performed directly by
/// the CLI when the pool is not being served.
public enum VolumeRequests {
    public static let version = 1

    /// Performs one request on a pool; the response says how long it took (`elapsed_us`).
    /// `progress(done, total)` hears from long operations (export-diff) as they go.
    public static func perform(_ request: [String: Any], on pool: Pool,
                               progress: (UInt64, UInt64) -> Void = { _, _ in }) -> [String: Any] {
        let start = DispatchTime.now().uptimeNanoseconds
        var response = performUntimed(request, on: pool, progress: progress)
        response["elapsed_us"] = (DispatchTime.now().uptimeNanoseconds - start) / 1000
        return response
    }

    static func performUntimed(_ request: [String: Any], on pool: Pool, progress: (UInt64, UInt64) -> Void) -> [String: Any] {
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
            switch op {
            case "hello":
                return ["ok": true, "version": version, "uuid": pool.engine.superblock.uuidString]
            case "list":
                return ["ok": true, "volumes": try list(pool), "space": space(pool)]
            case "volume-create":
                let r = try pool.createVolume(name: try string("name"), size: try size("size"))
                return ["ok": true, "volume": try describe(r, pool, usage: false)]
            case "volume-delete":
                try pool.delete(try string("name"), recursive: request["recursive"] as? Bool ?? false)
                return ["ok": true]
            case "volume-resize":
                try pool.resize(try string("name"), size: try size("size"))
                return ["ok": true]
            case "snapshot-create":
                let name = try string("name")
                guard let at = name.firstIndex(of: "@") else { throw PoolError(.invalid, "snapshot names are VOL@SNAP") }
                let r = try pool.createSnapshot(volume: String(name[..<at]), snapshot: String(name[name.index(after: at)...]))
                return ["ok": true, "snapshot": try describe(r, pool, usage: false)]
            case "snapshot-delete":
                let name = try string("name")
                guard name.contains("@") else { throw PoolError(.invalid, "snapshot names are VOL@SNAP") }
                try pool.delete(name)
                return ["ok": true]
            case "snapshot-rollback":
                try pool.rollback(try string("name"))
                return ["ok": true]
            case "clone":
                let r = try pool.clone(try string("source"), as: try string("name"))
                return ["ok": true, "volume": try describe(r, pool, usage: false)]
            case "export-diff":
                let path = try string("path")
                guard path.hasPrefix("/") else { throw PoolError(.invalid, "'export-diff' needs an absolute 'path'") }
                let export = try RBDDiffExport(pool: pool, from: request["from"] as? String, to: try string("to"))
                let s = try export.write(to: path, progress: progress)
                return ["ok": true, "path": path, "size": s.size, "data_bytes": s.dataBytes, "zero_bytes": s.zeroBytes,
                        "records": s.records, "file_bytes": s.fileBytes]
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
