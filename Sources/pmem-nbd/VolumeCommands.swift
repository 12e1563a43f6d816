import ArgumentParser
import Foundation
import Glibc
import PmemNBD
import PmemSystem

/// Options every volume and snapshot command shares.
struct PoolAccess: ParsableArguments {
    @Option(name: .long, help: "The pool (default: pmem-nbd.pool).") var pool: String = "pmem-nbd.pool"
    @Option(name: .long, help: "A running server's control socket (default: found from the pool when it is served).") var control: String?
    @Flag(name: .long, help: "Print JSON.") var json = false

    /// Runs a request (online or offline; with `online`, only through a running server),
    /// prints the outcome — a warning in the response goes to standard error — and fails on an
    /// error reply. `output` receives what would go to standard output.
    func perform(_ request: [String: Any], online: Bool = false, progress: (UInt64, UInt64) -> Void = { _, _ in },
                 finish: () -> Void = {}, output: (String) -> Void = { print($0) },
                 text: ([String: Any]) throws -> String) throws {
        try reportingErrors {
            let response = try VolumeCommand.run(request, pool: pool, control: control, requireServer: online, progress: progress)
            finish()
            if let warning = response["warning"] as? String { Log.warning(warning) }
            if json {
                output(VolumeRequests.encode(try jsonFilter(response)))
            } else if response["ok"] as? Bool == true {
                let t = try text(response)
                if !t.isEmpty { output(t) }
            }
            if response["ok"] as? Bool != true {
                if !json { Log.error(response["error"] as? String ?? "the request failed") }
                return 1
            }
            return 0
        }
    }

    /// What --json prints of a response (commands that show part of a listing narrow it).
    var jsonFilter: ([String: Any]) throws -> [String: Any] = { $0 }

    enum CodingKeys: String, CodingKey { case pool, control, json }
}

/// The rows of a `list` response: every volume and snapshot, or with `volume` that volume and
/// its snapshots, or with `snapshotsOnly` only snapshots. Naming a volume the pool does not
/// have is an error.
func rows(_ response: [String: Any], only volume: String? = nil, snapshotsOnly: Bool = false) throws -> [[String: Any]] {
    let all = response["volumes"] as? [[String: Any]] ?? []
    if let volume, response["ok"] as? Bool == true,
       !all.contains(where: { $0["name"] as? String == volume && $0["kind"] as? String == "volume" }) {
        throw ServeError("no volume named '\(volume)' (pmem-nbd volume list shows them)")
    }
    return all.filter { row in
        let name = row["name"] as? String ?? ""
        if snapshotsOnly && row["kind"] as? String != "snapshot" { return false }
        if let volume { return name == volume || name.hasPrefix(volume + "@") }
        return true
    }
}

func table(_ response: [String: Any], only volume: String? = nil, snapshotsOnly: Bool = false) throws -> String {
    func n(_ v: Any?) -> UInt64 { (v as? NSNumber)?.uint64Value ?? 0 }
    var lines = ["NAME".padding(28) + "KIND".padding(10) + "SIZE".padding(11) + "REFER".padding(11) + "USED".padding(11) + "ORIGIN"]
    for r in try rows(response, only: volume, snapshotsOnly: snapshotsOnly) {
        lines.append((r["name"] as? String ?? "").padding(28) + (r["kind"] as? String ?? "").padding(10)
                     + formatBytes(n(r["size"])).padding(11) + formatBytes(n(r["referenced"])).padding(11)
                     + formatBytes(n(r["exclusive"])).padding(11) + (r["origin"] as? String ?? "-"))
    }
    return lines.joined(separator: "\n")
}

/// Runs a program with standard input and error inherited (qemu-img), returning its exit
/// status and, with `capture`, its standard output.
func runProgram(_ argv: [String], capture: Bool = false) throws -> (status: Int32, output: String) {
    let p = Process()
    let path = argv[0].hasPrefix("/") ? argv[0]
        : ((ProcessInfo.processInfo.environment["PATH"] ?? "/usr/bin:/bin").split(separator: ":").map { "\($0)/\(argv[0])" }
            .first { FileManager.default.isExecutableFile(atPath: $0) })
    guard let path else { throw ServeError("\(argv[0]) is not installed (Debian: apt-get install qemu-utils)") }
    p.executableURL = URL(fileURLWithPath: path)
    p.arguments = Array(argv.dropFirst())
    let out = Pipe()
    if capture { p.standardOutput = out }
    try p.run()
    let data = capture ? out.fileHandleForReading.readDataToEndOfFile() : Data()
    p.waitUntilExit()
    return (p.terminationStatus, String(decoding: data, as: UTF8.self))
}

extension String {
    func padding(_ w: Int) -> String { count >= w ? self + " " : self + String(repeating: " ", count: w - count) }
}

struct VolumeCommandGroup: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "volume", abstract: "Create, list, delete, resize, import and export volumes.",
        discussion: "Each works on the pool file, or through the control socket of the server that serves it.",
        subcommands: [Create.self, List.self, Delete.self, Resize.self, Export.self])

    struct Create: ParsableCommand {
        static let configuration = CommandConfiguration(
        commandName: "create",
            abstract: "Create an empty (thin) volume, or one holding a disk image (--from).",
            discussion: """
            With --from rbd:POOL/IMAGE[@SNAP] the volume is made from a Ceph RBD image with its \
            snapshots (up to SNAP), through `rbd export --export-format 2` and import-diff. \
            With --from IMAGE the volume gets the image's virtual size (unless --size is larger) \
            and its contents, copied by qemu-img convert (raw, qcow2, vmdk, vdi, vhdx… anything \
            qemu-img reads) over NBD: to the pool's server, or to a private one when the pool is \
            not served. Zero regions are skipped, so the volume stays thin. qemu-img draws its \
            progress bar on a terminal. If the copy fails the volume is deleted again.
            """)
        @Argument(help: "Volume name.") var name: String
        @Option(name: .long, help: "Size, e.g. 10G (with --from: at least the image's size; default the image's).") var size: String?
        @Option(name: .customLong("from"), help: ArgumentHelp("Fill the volume from this disk image, or rbd:POOL/IMAGE[@SNAP].", valueName: "image")) var image: String?
        @Option(name: .long, help: ArgumentHelp("The image's format (default: qemu-img detects it).", valueName: "format")) var format: String?
        @OptionGroup var access: PoolAccess

        @Option(name: [.customShort("c"), .customLong("ceph-conf")], help: ArgumentHelp("With --from rbd:…, the Ceph configuration file for rbd (default: $CEPH_CONF).", valueName: "path"))
        var cephConf: String?

        func validate() throws {
            if size == nil && image == nil { throw ValidationError("give --size SIZE, or --from IMAGE") }
            if image?.hasPrefix("rbd:") == true && (size != nil || format != nil) {
                throw ValidationError("--from rbd:POOL/IMAGE takes the image's size and has no --format")
            }
            if format != nil && image == nil { throw ValidationError("--format describes the --from image") }
        }

        func run() throws {
            if let image, image.hasPrefix("rbd:") {
                try createFromRBD(name: name, image: image, cephConf: cephConf, access: access)
                return
            }
            var bytes: UInt64?
            var imageSize: UInt64?
            var imageFormat = format
            try reportingErrors {
                if let size { bytes = try SizeArgument.blocks(size, "--size") }
                if let image {
                    guard FileManager.default.fileExists(atPath: image) else { throw ServeError("\(image) does not exist") }
                    var info = ["qemu-img", "info", "--output=json"]
                    if let format { info += ["-f", format] }
                    let r = try runProgram(info + [image], capture: true)
                    guard r.status == 0, let json = VolumeRequests.decode(r.output),
                          let virtual = (json["virtual-size"] as? NSNumber)?.uint64Value else {
                        throw ServeError("qemu-img cannot read \(image) (see above)")
                    }
                    imageSize = virtual
                    imageFormat = imageFormat ?? json["format"] as? String
                    let needed = roundUpToBlock(virtual)
                    if let b = bytes, b < virtual {
                        throw ServeError("--size \(size!) is smaller than \(image) (\(virtual) bytes)")
                    }
                    if bytes == nil {
                        if needed != virtual {
                            Log.notice("the volume is \(needed) bytes: \(image) is \(virtual) bytes, rounded up to whole 4 KiB blocks")
                        }
                        bytes = needed
                    }
                }
                return 0
            }
            guard let bytes else { return }
            try access.perform(["op": "volume-create", "name": name, "size": bytes]) { _ in
                image == nil ? "created volume \(name) (\(formatBytes(bytes)))" : ""
            }
            guard let image, let imageSize else { return }
            try reportingErrors {
                let target = try VolumeAccess.open(pool: access.pool, control: access.control, export: name, readOnly: false)
                var argv = ["qemu-img", "convert", "-n", "--target-is-zero"]
                if isatty(STDOUT_FILENO) == 1 { argv.append("-p") }
                if let imageFormat { argv += ["-f", imageFormat] }
                argv += [image, "-O", "raw", target.uri]
                let r = try runProgram(argv)
                try target.close()
                if r.status != 0 {
                    _ = try? VolumeCommand.run(["op": "volume-delete", "name": name, "force": true], pool: access.pool, control: access.control)
                    throw ServeError("qemu-img convert failed (status \(r.status)); volume \(name) was deleted again")
                }
                print("created volume \(name) (\(formatBytes(bytes))) from \(image) (\(imageFormat ?? "?"), \(formatBytes(imageSize)))")
                return 0
            }
        }
    }

    struct List: ParsableCommand {
        static let configuration = CommandConfiguration(commandName: "list", abstract: "List volumes and snapshots with their space (REFER: data reached; USED: only theirs).")
        @OptionGroup var access: PoolAccess
        func run() throws { try access.perform(["op": "list"]) { try table($0) + replicationLines($0) } }
    }

    struct Delete: ParsableCommand {
        static let configuration = CommandConfiguration(
        commandName: "delete",
            abstract: "Delete a volume; its space is released in the background.",
            discussion: "A volume with NBD clients connected is not deleted unless --force is given (they are then disconnected).")
        @Argument(help: "Volume name.") var name: String
        @Flag(name: .long, help: "Also delete its snapshots.") var recursive = false
        @Flag(name: .long, help: "Delete it even while clients are connected (they are disconnected).") var force = false
        @OptionGroup var access: PoolAccess
        func run() throws {
            let meter = ProgressMeter("delete")
            try access.perform(["op": "volume-delete", "name": name, "recursive": recursive, "force": force],
                               progress: meter.update, finish: meter.finish) { _ in
                "deleted volume \(name)"
            }
        }
    }

    struct Resize: ParsableCommand {
        static let configuration = CommandConfiguration(
        commandName: "resize",
            abstract: "Grow or shrink a volume (its clients are disconnected).",
            discussion: """
            Shrinking discards the data past the new size, so it needs --shrink (as qemu-img resize \
            does). A volume may be larger than the pool's free space (thin provisioning); a warning \
            then says how much is free.
            """)
        @Argument(help: "Volume name.") var name: String
        @Option(name: .long, help: "New size, e.g. 20G.") var size: String
        @Flag(name: .long, help: "Allow shrinking (the data past the new size is lost).") var shrink = false
        @OptionGroup var access: PoolAccess
        func run() throws {
            var bytes: UInt64 = 0
            try reportingErrors {
                bytes = try SizeArgument.blocks(size, "--size")
                return 0
            }
            try access.perform(["op": "volume-resize", "name": name, "size": bytes, "shrink": shrink]) { _ in
                "resized \(name) to \(formatBytes(bytes))"
            }
        }
    }

    struct Export: ParsableCommand {
        static let configuration = CommandConfiguration(
        commandName: "export",
            abstract: "Copy a volume (or VOL@SNAP) into a disk image file.",
            discussion: """
            qemu-img convert reads the volume over NBD (from the pool's server, or a private one \
            when the pool is not served) and writes FILE in --format (raw by default; qcow2, vmdk… \
            anything qemu-img writes). Holes stay holes. An existing FILE is not replaced without \
            --force. Prefer a snapshot: a live volume may change while it is read.
            """)
        @Argument(help: "Volume or snapshot (VOL@SNAP).") var name: String
        @Argument(help: "Image file to write.") var file: String
        @Option(name: .long, help: ArgumentHelp("Image format of FILE.", valueName: "format")) var format: String = "raw"
        @Flag(name: .long, help: "Replace FILE if it exists.") var force = false
        @OptionGroup var access: PoolAccess
        func run() throws {
            try reportingErrors {
                if FileManager.default.fileExists(atPath: file) && !force { throw ServeError("\(file) exists; add --force to replace it") }
                let source = try VolumeAccess.open(pool: access.pool, control: access.control, export: name, readOnly: true)
                var argv = ["qemu-img", "convert"]
                if isatty(STDOUT_FILENO) == 1 { argv.append("-p") }
                argv += ["-f", "raw", source.uri, "-O", format, file]
                let r = try runProgram(argv)
                try source.close()
                if r.status != 0 { throw ServeError("qemu-img convert failed (status \(r.status))") }
                print("exported \(name) to \(file) (\(format))")
                return 0
            }
        }
    }
}

struct SnapshotCommandGroup: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "snapshot", abstract: "Create, list, delete and roll back to snapshots (VOL@SNAP).",
        discussion: """
        A snapshot is read-only, costs O(1) to create, shares every block with its volume until the
        volume overwrites it, and is exported as VOL@SNAP. Rolling back replaces the volume's contents
        with the snapshot's at once: its NBD clients stay connected and their next requests see the
        snapshot's contents (unmount a file system on it first: its cache still holds the old ones).
        If the volume was resized since the snapshot, its clients are disconnected instead.
        Snapshot names are VOL@SNAP; SNAP is 1 to 63 bytes, without '@', '/', spaces or control
        characters.
        """,
        subcommands: [Create.self, List.self, Delete.self, Rollback.self])

    struct Create: ParsableCommand {
        static let configuration = CommandConfiguration(commandName: "create", abstract: "Snapshot a volume (durable on return).")
        @Argument(help: "VOL@SNAP") var name: String
        @OptionGroup var access: PoolAccess
        func run() throws { try access.perform(["op": "snapshot-create", "name": name]) { _ in "created snapshot \(name)" } }
    }

    struct List: ParsableCommand {
        static let configuration = CommandConfiguration(commandName: "list", abstract: "List snapshots (of one volume, if named).")
        @Argument(help: "Volume name.") var volume: String?
        @OptionGroup var access: PoolAccess
        func run() throws {
            var a = access
            let volume = self.volume
            a.jsonFilter = { r in
                var out = r
                if r["ok"] as? Bool == true { out["volumes"] = try rows(r, only: volume, snapshotsOnly: true) }
                return out
            }
            try a.perform(["op": "list"]) { try table($0, only: volume, snapshotsOnly: true) }
        }
    }

    struct Delete: ParsableCommand {
        static let configuration = CommandConfiguration(commandName: "delete", abstract: "Delete a snapshot; the space it alone held comes back in the background.")
        @Argument(help: "VOL@SNAP") var name: String
        @OptionGroup var access: PoolAccess
        func run() throws {
            let meter = ProgressMeter("delete")
            try access.perform(["op": "snapshot-delete", "name": name], progress: meter.update, finish: meter.finish) { _ in "deleted snapshot \(name)" }
        }
    }

    struct Rollback: ParsableCommand {
        static let configuration = CommandConfiguration(commandName: "rollback", abstract: "Replace a volume's contents with a snapshot's, atomically.")
        @Argument(help: "VOL@SNAP") var name: String
        @OptionGroup var access: PoolAccess
        func run() throws {
            try access.perform(["op": "snapshot-rollback", "name": name]) { r in
                "rolled back to \(name)" + (r["clients_kept"] as? Bool == false ? " (the volume was resized since: its clients were disconnected)" : "")
            }
        }
    }
}

struct Clone: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "clone", abstract: "Create a writable volume from a snapshot (O(1); blocks shared until written).")
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
        live volume may change while it is read. FILE '-' is standard output (the summary then goes
        to standard error); an existing FILE is not replaced without --force.

        Examples:
          pmem-nbd export-diff --pool pool.pmem pmem0@monday pmem0-monday.diff
          pmem-nbd export-diff --pool pool.pmem pmem0@monday pmem0@tuesday monday-tuesday.diff
          pmem-nbd export-diff --pool pool.pmem pmem0@monday pmem0@tuesday - | ssh backup rbd import-diff - rbd/pmem0
        """)

    @Argument(help: ArgumentHelp("[FROM] TO FILE: the older snapshot (optional), the newer point, the output file ('-': standard output).", valueName: "points"))
    var points: [String]
    @Flag(name: .long, help: "Replace FILE if it exists.") var force = false
    @OptionGroup var access: PoolAccess

    func validate() throws {
        guard points.count == 2 || points.count == 3 else {
            throw ValidationError("give TO FILE, or FROM TO FILE (e.g. pmem0@a pmem0@b out.diff)")
        }
    }

    func run() throws {
        let file = points[points.count - 1]
        let toStdout = file == "-"
        let path = file.hasPrefix("/") ? file : FileManager.default.currentDirectoryPath + "/" + file
        var request: [String: Any] = ["op": "export-diff", "to": points[points.count - 2], "path": path, "force": force]
        if points.count == 3 { request["from"] = points[0] }
        if !toStdout && !force && FileManager.default.fileExists(atPath: path) {
            try reportingErrors { throw ServeError("\(file) exists; add --force to replace it") }
        }
        // Standard output: the writer (the server, or this process) writes into a FIFO that a
        // thread here copies to standard output. This process holds a write end of its own
        // until the request is answered, so the copy sees the end only then — however early
        // the request fails, and whether or not the writer ever opened the FIFO.
        var pipe: (directory: TemporaryDirectory, done: DispatchSemaphore, holder: FileDescriptor)?
        if toStdout {
            try reportingErrors {
                let directory = try TemporaryDirectory(prefix: "pmem-nbd-diff")
                let fifo = try directory.makeFIFO("diff")
                let reader = try FileDescriptor.open(fifo, O_RDONLY | O_NONBLOCK)
                let holder = try FileDescriptor.open(fifo, O_WRONLY)
                try reader.setNonBlocking(false)
                let done = DispatchSemaphore(value: 0)
                OSThread.spawn(name: "pmem-diff-out") {
                    defer { reader.close(); done.signal() }
                    var chunk = [UInt8](repeating: 0, count: 1 << 20)
                    while let n = try? chunk.withUnsafeMutableBytes({ try reader.read(into: $0) }), n > 0 {
                        guard (try? FileDescriptor.standardOutput.writeAll(bytes: Array(chunk[0..<n]))) != nil else { return }
                    }
                }
                pipe = (directory, done, holder)
                request["path"] = fifo
                request["force"] = true
                return 0
            }
        }
        defer {
            if let pipe {
                pipe.holder.close()
                pipe.done.wait()
                pipe.directory.remove()
            }
        }
        let meter = ProgressMeter("export-diff")
        try access.perform(request, progress: meter.update, finish: meter.finish, output: { line in
            if toStdout { Log.notice(line) } else { print(line) }
        }) { r in
            func n(_ k: String) -> UInt64 { (r[k] as? NSNumber)?.uint64Value ?? 0 }
            return "wrote \(toStdout ? "standard output" : file): \(formatBytes(n("data_bytes"))) of data, \(formatBytes(n("zero_bytes"))) zeroed, "
                + "\((r["records"] as? NSNumber)?.intValue ?? 0) records, \(formatBytes(n("file_bytes"))) in all"
        }
    }
}
