import ArgumentParser
import Dispatch
import Foundation
import Glibc
import PmemNBD
import PmemSystem

/// `pmem-nbd import-diff FILE|- VOL`: applies an RBD diff (v1, v2) or an `rbd export
/// --export-format 2` stream to a volume, creating the snapshots it names.
struct ImportDiff: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "import-diff",
        abstract: "Apply an RBD diff (v1 or v2) or an 'rbd export --export-format 2' stream to a volume, with its snapshots.",
        discussion: """
        What `rbd import-diff` does to an image, done to a volume: a diff's data records are \
        written, its zero records deallocated, its size becomes the volume's, and the snapshot it \
        ends at (VOL@SNAP) is taken; a diff from a snapshot needs VOL@thatsnapshot to exist. A \
        whole-image stream (`rbd export --export-format 2 POOL/IMAGE -`) brings every snapshot \
        of the image, oldest first, then its head. A volume that does not exist is created by a \
        stream that starts from nothing. FILE '-' is standard input. See Docs/SCALE-OUT.md.

        Examples:
          rbd export-diff rbd/db@s1 - | pmem-nbd import-diff --pool pool.pmem - db
          rbd export --export-format 2 rbd/db - | pmem-nbd import-diff --pool pool.pmem - db
        """)

    @Argument(help: ArgumentHelp("The stream ('-': standard input).", valueName: "file")) var file: String
    @Argument(help: "Volume name.") var volume: String
    @OptionGroup var access: PoolAccess

    func run() throws {
        if file == "-" {
            try importStream(volume: volume, access: access, what: "standard input") { fifo in
                try StreamFeeder.copying(from: FileDescriptor.standardInput, into: fifo)
            }
        } else {
            let path = file.hasPrefix("/") ? file : FileManager.default.currentDirectoryPath + "/" + file
            try reportingErrors {
                guard FileManager.default.fileExists(atPath: path) else { throw ServeError("\(file) does not exist") }
                return 0
            }
            try importStream(volume: volume, access: access, what: file, path: path, feeder: nil)
        }
    }
}

/// Something filling a FIFO the pool's reader (the server, or this process) drains.
final class StreamFeeder: @unchecked Sendable {
    private let finished: () -> String?
    private init(finished: @escaping () -> String?) { self.finished = finished }

    /// Waits for the producer; its complaint, if it failed.
    func finish() -> String? { finished() }

    /// A thread copying `source` into the FIFO until the source ends or nobody reads.
    static func copying(from source: FileDescriptor, into fifo: String) throws -> StreamFeeder {
        let writer = try FileDescriptor.open(fifo, O_WRONLY)
        let done = DispatchSemaphore(value: 0)
        Glibc.signal(SIGPIPE, SIG_IGN)
        OSThread.spawn(name: "pmem-diff-in") {
            defer { writer.close(); done.signal() }
            var chunk = [UInt8](repeating: 0, count: 1 << 20)
            while let n = try? chunk.withUnsafeMutableBytes({ try source.read(into: $0) }), n > 0 {
                guard (try? writer.writeAll(bytes: Array(chunk[0..<n]))) != nil else { return }
            }
        }
        return StreamFeeder { done.wait(); return nil }
    }

    /// `rbd ARGS` writing its standard output into the FIFO (within `timeout` seconds).
    static func rbd(_ tool: RBDTool, _ args: [String], into fifo: String, timeout: Int = 24 * 3600) throws -> StreamFeeder {
        let child = try ChildProcess(executable: tool.executable, arguments: tool.arguments + args, environment: tool.environment,
                                     standardInput: .null, standardOutput: .file(fifo), standardError: .pipe)
        final class Box: @unchecked Sendable { var error: [UInt8] = []; var timedOut = false }
        let box = Box()
        let done = DispatchSemaphore(value: 0)
        OSThread.spawn(name: "pmem-rbd-export") {
            // Standard error only; standard output is the FIFO.
            var buffer = [UInt8](repeating: 0, count: 4096)
            let deadline = ContinuousClock.now + .seconds(timeout)
            if let fd = child.standardError {
                while ContinuousClock.now < deadline {
                    guard let n = try? buffer.withUnsafeMutableBytes({ try fd.read(into: $0) }), n > 0 else { break }
                    box.error += buffer[0..<n]
                }
            }
            if child.wait(timeout: max(.zero, deadline - ContinuousClock.now)) == nil { box.timedOut = true; child.stop(signal: SIGKILL) }
            done.signal()
        }
        return StreamFeeder {
            done.wait()
            let status = child.termination?.shellStatus ?? -1
            if box.timedOut { return "rbd \(args.first ?? "") did not finish within \(timeout) s" }
            guard status != 0 else { return nil }
            let text = String(decoding: box.error, as: UTF8.self)
            return "rbd \(args.first ?? "") failed: " + (text.split(separator: "\n").first { $0.hasPrefix("rbd:") }.map(String.init)
                                                          ?? text.split(separator: "\n").last.map(String.init) ?? "status \(status)")
        }
    }
}

/// Runs the `import-diff` request on `path`, or on a FIFO `feeder` fills (the request's reader
/// and the feeder meet there; this process holds a reader of its own until the request is
/// answered, so a feeder never blocks on a FIFO nobody opened, and sees EPIPE after).
func importStream(volume: String, access: PoolAccess, what: String, path: String? = nil, until: String? = nil,
                  feeder: ((String) throws -> StreamFeeder)?) throws {
    var fifoPath = path ?? ""
    var directory: TemporaryDirectory?
    var holder: FileDescriptor?
    var producer: StreamFeeder?
    try reportingErrors {
        if let feeder {
            let d = try TemporaryDirectory(prefix: "pmem-nbd-import")
            directory = d
            fifoPath = try d.makeFIFO("stream")
            holder = try FileDescriptor.open(fifoPath, O_RDONLY | O_NONBLOCK)
            do { producer = try feeder(fifoPath) } catch let e as PoolErrorLike { throw ServeError(e.description) }
        }
        return 0
    }
    var complaint: String?
    defer {
        holder?.close()
        directory?.remove()
    }
    let meter = ProgressMeter("import-diff", unit: 1)
    var request: [String: Any] = ["op": "import-diff", "name": volume, "path": fifoPath]
    if let until { request["until"] = until }
    try access.perform(request, progress: meter.update, finish: {
        meter.finish()
        holder?.close(); holder = nil
        complaint = producer?.finish()
        if let complaint { Log.error(complaint) }
    }) { r in
        func n(_ k: String) -> UInt64 { (r["data_bytes"] as? NSNumber)?.uint64Value ?? 0 }
        let snaps = (r["snapshots"] as? [String] ?? []).map { "\(volume)@\($0)" }
        return "imported \(what) into \((r["created"] as? Bool == true) ? "new volume " : "")\(volume): \(formatBytes(n("data_bytes"))) of data, "
            + "\((r["diffs"] as? NSNumber)?.intValue ?? 0) diff(s)" + (snaps.isEmpty ? "" : "; snapshots \(snaps.joined(separator: ", "))")
    }
    if complaint != nil { throw ExitCode(1) }
}

/// `volume create VOL --from rbd:POOL/IMAGE[@SNAP]`: the image (or the snapshot) with its
/// snapshots, as `rbd export --export-format 2` streams it, into a new volume.
func createFromRBD(name: String, image: String, cephConf: String?, access: PoolAccess) throws {
    var target: RBDTarget?
    var tool: RBDTool?
    try reportingErrors {
        target = try RBDTarget(parsing: image, allowSnapshot: true)
        tool = try RBDTool(conf: cephConf)
        let listing = try VolumeCommand.run(["op": "list"], pool: access.pool, control: access.control)
        if (listing["volumes"] as? [[String: Any]] ?? []).contains(where: { $0["name"] as? String == name }) {
            throw ServeError("a volume named '\(name)' exists")
        }
        guard try tool!.info(RBDTarget(parsing: "rbd:" + target!.spec)) != nil else {
            throw ServeError("\(image): no such RBD image")
        }
        return 0
    }
    guard let target, let tool else { return }
    let spec = target.spec + (target.snapshot.map { "@\($0)" } ?? "")
    try importStream(volume: name, access: access, what: image, until: target.snapshot) { fifo in
        try StreamFeeder.rbd(tool, ["export", "--export-format", "2", "--no-progress", spec, "-"], into: fifo)
    }
}
