import ArgumentParser
import Foundation
import PmemNBD
import PmemSystem

/// Options every volume and snapshot command shares.
struct PoolAccess: ParsableArguments {
    @Option(name: .long, help: "The pool (default: pmem-nbd.pool).") var pool: String = "pmem-nbd.pool"
    @Option(name: .long, help: "A running server's control socket (default: found from the pool when it is served).") var control: String?
    @Flag(name: .long, help: "Print JSON.") var json = false

    /// Runs a request (online or offline), prints the outcome, and fails on an error reply.
    func perform(_ request: [String: Any], progress: (UInt64, UInt64) -> Void = { _, _ in }, finish: () -> Void = {},
                 text: ([String: Any]) -> String) throws {
        try reportingErrors {
            let response = try VolumeCommand.run(request, pool: pool, control: control, progress: progress)
            finish()
            if json {
                print(VolumeRequests.encode(response))
            } else if response["ok"] as? Bool == true {
                let t = text(response)
                if !t.isEmpty { print(t) }
            }
            if response["ok"] as? Bool != true {
                if !json { Log.error(response["error"] as? String ?? "the request failed") }
                return 1
            }
            return 0
        }
    }
}

func table(_ response: [String: Any], only volume: String? = nil, snapshotsOnly: Bool = false) -> String {
    let rows = (response["volumes"] as? [[String: Any]] ?? []).filter { row in
        let name = row["name"] as? String ?? ""
        if snapshotsOnly && row["kind"] as? String != "snapshot" { return false }
        if let volume { return name == volume || name.hasPrefix(volume + "@") }
        return true
    }
    func n(_ v: Any?) -> UInt64 { (v as? NSNumber)?.uint64Value ?? 0 }
    var lines = ["NAME".padding(28) + "KIND".padding(10) + "SIZE".padding(11) + "REFER".padding(11) + "USED".padding(11) + "ORIGIN"]
    for r in rows {
        lines.append((r["name"] as? String ?? "").padding(28) + (r["kind"] as? String ?? "").padding(10)
                     + formatBytes(n(r["size"])).padding(11) + formatBytes(n(r["referenced"])).padding(11)
                     + formatBytes(n(r["exclusive"])).padding(11) + (r["origin"] as? String ?? "-"))
    }
    return lines.joined(separator: "\n")
}

extension String {
    func padding(_ w: Int) -> String { count >= w ? self + " " : self + String(repeating: " ", count: w - count) }
}

struct VolumeCommandGroup: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "volume", abstract: "Create, list, delete and resize volumes.",
        discussion: "Each works on the pool file, or through the control socket of the server that serves it.",
        subcommands: [Create.self, List.self, Delete.self, Resize.self])

    struct Create: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Create an empty (thin) volume.")
        @Argument(help: "Volume name.") var name: String
        @Option(name: .long, help: "Size, e.g. 10G.") var size: String
        @OptionGroup var access: PoolAccess
        func run() throws {
            try access.perform(["op": "volume-create", "name": name, "size": size]) { _ in "created volume \(name)" }
        }
    }

    struct List: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "List volumes and snapshots with their space (REFER: data reached; USED: only theirs).")
        @OptionGroup var access: PoolAccess
        func run() throws { try access.perform(["op": "list"]) { table($0) } }
    }

    struct Delete: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Delete a volume; its space is released in the background.")
        @Argument(help: "Volume name.") var name: String
        @Flag(name: .long, help: "Also delete its snapshots.") var recursive = false
        @OptionGroup var access: PoolAccess
        func run() throws {
            let meter = ProgressMeter("delete")
            try access.perform(["op": "volume-delete", "name": name, "recursive": recursive], progress: meter.update, finish: meter.finish) { _ in
                "deleted volume \(name)"
            }
        }
    }

    struct Resize: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Grow or shrink a volume (its clients are disconnected).")
        @Argument(help: "Volume name.") var name: String
        @Option(name: .long, help: "New size, e.g. 20G.") var size: String
        @OptionGroup var access: PoolAccess
        func run() throws {
            try access.perform(["op": "volume-resize", "name": name, "size": size]) { _ in "resized \(name) to \(size)" }
        }
    }
}

struct SnapshotCommandGroup: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "snapshot", abstract: "Create, list, delete and roll back to snapshots (VOL@SNAP).",
        discussion: """
        A snapshot is read-only, costs O(1) to create, shares every block with its volume until the
        volume overwrites it, and is exported as VOL@SNAP. Rolling back replaces the volume's contents
        with the snapshot's at once (the volume's clients are disconnected and reconnect to it).
        """,
        subcommands: [Create.self, List.self, Delete.self, Rollback.self])

    struct Create: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Snapshot a volume (durable on return).")
        @Argument(help: "VOL@SNAP") var name: String
        @OptionGroup var access: PoolAccess
        func run() throws { try access.perform(["op": "snapshot-create", "name": name]) { _ in "created snapshot \(name)" } }
    }

    struct List: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "List snapshots (of one volume, if named).")
        @Argument(help: "Volume name.") var volume: String?
        @OptionGroup var access: PoolAccess
        func run() throws { try access.perform(["op": "list"]) { table($0, only: volume, snapshotsOnly: true) } }
    }

    struct Delete: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Delete a snapshot; the space it alone held comes back in the background.")
        @Argument(help: "VOL@SNAP") var name: String
        @OptionGroup var access: PoolAccess
        func run() throws {
            let meter = ProgressMeter("delete")
            try access.perform(["op": "snapshot-delete", "name": name], progress: meter.update, finish: meter.finish) { _ in "deleted snapshot \(name)" }
        }
    }

    struct Rollback: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Replace a volume's contents with a snapshot's, atomically.")
        @Argument(help: "VOL@SNAP") var name: String
        @OptionGroup var access: PoolAccess
        func run() throws { try access.perform(["op": "snapshot-rollback", "name": name]) { _ in "rolled back to \(name)" } }
    }
}

struct Clone: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Create a writable volume from a snapshot (O(1); blocks shared until written).")
    @Argument(help: "SRC@SNAP") var source: String
    @Argument(help: "New volume name.") var name: String
    @OptionGroup var access: PoolAccess
    func run() throws { try access.perform(["op": "clone", "source": source, "name": name]) { _ in "cloned \(source) as \(name)" } }
}

struct ExportDiff: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "export-diff",
        abstract: "Write what changed between two snapshots as an RBD diff (for rbd import-diff).",
        discussion: """
        With FROM (VOL@A), the file holds the blocks that differ from A to TO (VOL@B, or VOL for the
        live volume): data records for changed blocks, zero records for deallocated ones. Without
        FROM it holds every allocated block of TO, a full export. The format is RBD diff v1, which
        `rbd import-diff FILE POOL/IMAGE` applies; see Docs/SCALE-OUT.md. Prefer snapshots for TO: the
        live volume may change while it is read.

        Examples:
          pmem-nbd export-diff --pool pool.pmem pmem0@monday pmem0-monday.diff
          pmem-nbd export-diff --pool pool.pmem pmem0@monday pmem0@tuesday monday-tuesday.diff
        """)

    @Argument(help: ArgumentHelp("[FROM] TO FILE: the older snapshot (optional), the newer point, the output file.", valueName: "points"))
    var points: [String]
    @OptionGroup var access: PoolAccess

    func validate() throws {
        guard points.count == 2 || points.count == 3 else {
            throw ValidationError("give TO FILE, or FROM TO FILE (e.g. pmem0@a pmem0@b out.diff)")
        }
    }

    func run() throws {
        let file = points[points.count - 1]
        let path = file.hasPrefix("/") ? file : FileManager.default.currentDirectoryPath + "/" + file
        var request: [String: Any] = ["op": "export-diff", "to": points[points.count - 2], "path": path]
        if points.count == 3 { request["from"] = points[0] }
        let meter = ProgressMeter("export-diff")
        try access.perform(request, progress: meter.update, finish: meter.finish) { r in
            func n(_ k: String) -> UInt64 { (r[k] as? NSNumber)?.uint64Value ?? 0 }
            return "wrote \(file): \(formatBytes(n("data_bytes"))) of data, \(formatBytes(n("zero_bytes"))) zeroed, "
                + "\((r["records"] as? NSNumber)?.intValue ?? 0) records, \(formatBytes(n("file_bytes"))) in all"
        }
    }
}
