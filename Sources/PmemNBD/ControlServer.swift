import Foundation
import Glibc
import NBDServer
import PmemPool
import PmemSystem
import PmemVolumes

/// The control socket of a running server: a Unix socket (mode 0600) taking one JSON request
/// per line and answering one JSON line each (Docs/CONTROL.md). Only root and the server's own
/// user may talk to it.
public final class ControlServer: @unchecked Sendable {
    let path: String
    let pool: Pool
    private var loop: AcceptLoop!
    /// The server's side of requests (connections, busy volumes, URIs).
    let context: VolumeRequests.ServerContext?

    public init(path: String, pool: Pool, context: VolumeRequests.ServerContext? = nil) throws {
        self.path = path
        self.pool = pool
        self.context = context
        let listener: FileDescriptor
        do { listener = try Socket.listenUnix(path: path, backlog: 16) } catch {
            throw ServeError("cannot listen on the control socket \(path): \(error == .exists ? "another server answers there" : error.description)")
        }
        chmod(path, 0o600)
        do {
            loop = try AcceptLoop(sockets: [listener], name: "pmem-control", label: "control socket", policy: .rootOrOwnUser) {
                [unowned self] client in OSThread.spawn(name: "pmem-control-c") { [self] in serve(client) }
            }
        } catch {
            listener.close()
            throw error
        }
    }

    public func start() { loop.start() }

    public func stop() {
        loop.stop()
        unlink(path)
    }

    private func serve(_ fd: FileDescriptor) {
        defer { fd.close() }
        var buffer: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 4096)
        while true {
            if let nl = buffer.firstIndex(of: 10) {
                let line = String(decoding: buffer[..<nl], as: UTF8.self)
                buffer.removeSubrange(...nl)
                let response: [String: Any]
                if let request = VolumeRequests.decode(line) {
                    Log.info("control: \(request["op"] as? String ?? "?") \(request["name"] as? String ?? "")")
                    response = VolumeRequests.perform(request, on: pool, server: context)
                } else {
                    response = ["ok": false, "error": "request is not a JSON object"]
                }
                guard (try? fd.writeAll(bytes: Array((VolumeRequests.encode(response) + "\n").utf8))) != nil else { return }
                continue
            }
            if buffer.count > 1 << 20 { return }
            guard let n = try? chunk.withUnsafeMutableBytes({ try fd.read(into: $0) }), n > 0 else { return }
            buffer += chunk[0..<n]
        }
    }
}

/// Talks to a server's control socket.
public struct ControlClient {
    let fd: FileDescriptor

    public init(path: String) throws {
        fd = try Socket.connectUnix(path: path)
    }

    public func request(_ object: [String: Any]) throws -> [String: Any] {
        try fd.writeAll(bytes: Array((VolumeRequests.encode(object) + "\n").utf8))
        var buffer: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 65536)
        while buffer.last != 10 {
            let n = try chunk.withUnsafeMutableBytes { try fd.read(into: $0) }
            if n == 0 { throw ServeError("the server closed the control connection") }
            buffer += chunk[0..<n]
        }
        guard let r = VolumeRequests.decode(String(decoding: buffer.dropLast(), as: UTF8.self)) else {
            throw ServeError("the server's reply is not JSON")
        }
        return r
    }

    public func close() { fd.close() }

    /// Where a server of `pool` listens for control requests unless told otherwise.
    public static func defaultPath(forPool pool: String) -> String {
        var st = stat()
        if stat(pool, &st) == 0 && (st.st_mode & S_IFMT) != S_IFREG {
            let base = pool.split(separator: "/").last.map(String.init) ?? "pool"
            return "/tmp/pmem-nbd-\(base).ctl"
        }
        return pool + ".ctl"
    }
}

/// Runs a volume request on a pool: through its server's control socket when the pool is
/// being served (or `control` is given), else directly on the pool file.
public enum VolumeCommand {
    /// With `requireServer`, a pool that is not being served is an error (`connections`).
    public static func run(_ request: [String: Any], pool path: String, control: String?, requireServer: Bool = false,
                           progress: (UInt64, UInt64) -> Void = { _, _ in }) throws -> [String: Any] {
        if let control { return try online(request, control) }
        // A served pool answers on its control socket: ask there first. (Trying the pool's lock
        // first would wait up to a second for it on every command against a served pool.)
        if let answer = try? online(request, ControlClient.defaultPath(forPool: path)) { return answer }
        if requireServer {
            if heldShared(path) { throw ServeError("\(path) is served read-only (serve -r), which has no control socket") }
            throw ServeError("\(path) is not being served (or its server has no control socket at \(ControlClient.defaultPath(forPool: path)); pass --control PATH)")
        }
        let opened = Result { () throws(PoolError) -> Pool in try Pool.open(path: path, commitMode: .inline) }
        if case .failure(let e) = opened {
            guard e.kind == .exists else { throw e }
            // In use: ask the server that has it.
            let socket = ControlClient.defaultPath(forPool: path)
            guard let answer = try? online(request, socket) else {
                if heldShared(path), let op = request["op"] as? String, readOnlyOps.contains(op) {
                    // A read-only server shares the lock: read the pool the same way.
                    let pool = try Pool.open(path: path, readOnly: true)
                    defer { try? pool.close() }
                    return VolumeRequests.perform(request, on: pool, progress: progress)
                }
                if heldShared(path) {
                    throw ServeError("\(path) is served read-only (serve -r), which has no control socket: stop that server to change "
                                     + "the pool, or serve it read-write and the command goes through its control socket")
                }
                throw ServeError("\(e.message), and its control socket \(socket) does not answer (pass --control PATH if the server "
                                 + "was given one; a server started with --control none takes no volume commands)")
            }
            return answer
        }
        let pool = try opened.get()
        defer { try? pool.close() }
        var response = VolumeRequests.perform(request, on: pool, progress: progress)
        // Offline there is no background deleter: finish deletions before returning.
        if response["ok"] as? Bool == true {
            let start = MonotonicClock.nanoseconds()
            do { try pool.runDeletions(progress: progress) } catch { response = ["ok": false, "error": error.message] }
            response["deletion_us"] = (MonotonicClock.nanoseconds() - start) / 1000
        }
        return response
    }

    /// Requests that only read the pool (they work beside a read-only server).
    static let readOnlyOps: Set<String> = ["hello", "list", "export-diff", "diff-extents"]

    /// Whether the pool is locked by readers only (a read-only server holds a shared lock).
    static func heldShared(_ path: String) -> Bool {
        guard let fd = try? FileDescriptor.open(path, O_RDONLY) else { return false }
        defer { fd.close() }
        return (try? fd.lockShared(patience: 0)) != nil
    }

    /// Runs a request through a server's control socket.
    public static func online(_ request: [String: Any], _ socket: String) throws -> [String: Any] {
        let client = try ControlClient(path: socket)
        defer { client.close() }
        return try client.request(request)
    }
}

/// An NBD URI through which a command reads or writes a volume of a pool: the running
/// server's (found through its control socket), or, when the pool is not served, that of a
/// private server this process runs on a Unix socket in a temporary directory until `close`.
/// `volume create --from` and `volume export` hand it to qemu-img.
public final class VolumeAccess {
    public let uri: String
    private var server: Server?
    private var pool: Pool?
    private var directory: TemporaryDirectory?

    private init(uri: String, server: Server? = nil, pool: Pool? = nil, directory: TemporaryDirectory? = nil) {
        self.uri = uri
        self.server = server
        self.pool = pool
        self.directory = directory
    }

    public static func open(pool path: String, control: String?, export: String, readOnly: Bool) throws -> VolumeAccess {
        let socket = control ?? ControlClient.defaultPath(forPool: path)
        if let hello = try? VolumeCommand.online(["op": "hello"], socket), hello["ok"] as? Bool == true {
            if hello["tls_required"] as? Bool == true {
                throw ServeError("the server of \(path) requires TLS; use qemu-img or nbdcopy with its nbds:// URI and your certificates")
            }
            let listeners = hello["listeners"] as? [[String: Any]] ?? []
            // A Unix socket if there is one, else TCP.
            let unix = listeners.compactMap { $0["unix"] as? String }.map { Socket.LocalAddress.unix($0) }
            let tcp = listeners.compactMap { l -> Socket.LocalAddress? in
                guard let h = l["host"] as? String, let port = (l["port"] as? NSNumber)?.uint16Value else { return nil }
                return .inet(host: h, port: port)
            }
            let addresses = unix + tcp
            guard let first = addresses.first, let uri = NBDURI.uri(for: first, exportName: export) else {
                throw ServeError("the server of \(path) answers on \(socket) but lists no NBD socket")
            }
            return VolumeAccess(uri: uri)
        }
        let pool = try Pool.open(path: path, readOnly: readOnly)
        do {
            let directory = try TemporaryDirectory(prefix: "pmem-nbd")
            let server = Server(exports: PoolExports(pool: pool, readOnly: readOnly))
            let path = directory.file("nbd")
            let fd = try Socket.listenUnix(path: path)
            try server.listen(on: [fd])
            return VolumeAccess(uri: NBDURI.uri(for: .unix(path), exportName: export)!, server: server, pool: pool, directory: directory)
        } catch {
            try? pool.close()
            throw error
        }
    }

    /// Stops the private server (if any), persisting the pool.
    public func close() throws {
        server?.shutdown(timeoutSeconds: 30)
        server = nil
        try pool?.close()
        pool = nil
        directory?.remove()
        directory = nil
    }

    deinit { try? close() }
}
