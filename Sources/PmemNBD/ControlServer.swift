import Foundation
import Glibc
import CPmemSupport
import PmemPool
import PmemSystem
import PmemVolumes

/// The control socket of a running server: a Unix socket (mode 0600) taking one JSON request
/// per line and answering one JSON line each (Docs/CONTROL.md). Only root and the server's own
/// user may talk to it.
public final class ControlServer: @unchecked Sendable {
    let path: String
    let pool: Pool
    let listener: FileDescriptor
    private let wake: EventFD

    public init(path: String, pool: Pool) throws {
        self.path = path
        self.pool = pool
        do { listener = try Socket.listenUnix(path: path, backlog: 16) } catch {
            throw ServeError("cannot listen on the control socket \(path): \(error == .exists ? "another server answers there" : error.description)")
        }
        chmod(path, 0o600)
        wake = try EventFD()
    }

    public func start() {
        OSThread.spawn(name: "pmem-control") { [self] in
            do { try acceptLoop() } catch { Log.error("control socket: \(error)") }
        }
    }

    public func stop() {
        wake.signal()
        Socket.shutdown(listener)
        unlink(path)
    }

    private func acceptLoop() throws(Errno) {
        let epoll = try Epoll()
        try epoll.add(listener, token: 0)
        try epoll.add(wake.fd, token: 1)
        while true {
            let ready = try epoll.wait()
            if ready.contains(1) { return }
            guard let client = try? Socket.accept(listener) else { continue }
            var uid: UInt32 = 0
            var pid: Int32 = 0
            if pmem_peer_credentials(client.rawValue, &uid, &pid) != 0 || (uid != 0 && uid != getuid()) {
                Log.warning("control socket: refusing uid \(uid)")
                client.close()
                continue
            }
            OSThread.spawn(name: "pmem-control-c") { [self] in serve(client) }
        }
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
                    response = VolumeRequests.perform(request, on: pool)
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
    public static func run(_ request: [String: Any], pool path: String, control: String?,
                           progress: (UInt64, UInt64) -> Void = { _, _ in }) throws -> [String: Any] {
        if let control { return try online(request, control) }
        // A served pool answers on its control socket: ask there first. (Trying the pool's lock
        // first would wait up to a second for it on every command against a served pool.)
        if let answer = try? online(request, ControlClient.defaultPath(forPool: path)) { return answer }
        let opened = Result { () throws(PoolError) -> Pool in try Pool.open(path: path, commitMode: .inline) }
        if case .failure(let e) = opened {
            guard e.kind == .exists else { throw e }
            // In use: ask the server that has it.
            let socket = ControlClient.defaultPath(forPool: path)
            guard let answer = try? online(request, socket) else {
                throw ServeError("\(e.message), and its control socket \(socket) does not answer (pass --control PATH)")
            }
            return answer
        }
        let pool = try opened.get()
        defer { try? pool.close() }
        var response = VolumeRequests.perform(request, on: pool, progress: progress)
        // Offline there is no background deleter: finish deletions before returning.
        if response["ok"] as? Bool == true {
            let start = DispatchTime.now().uptimeNanoseconds
            do { try pool.runDeletions(progress: progress) } catch { response = ["ok": false, "error": error.message] }
            response["deletion_us"] = (DispatchTime.now().uptimeNanoseconds - start) / 1000
        }
        return response
    }

    static func online(_ request: [String: Any], _ socket: String) throws -> [String: Any] {
        let client = try ControlClient(path: socket)
        defer { client.close() }
        return try client.request(request)
    }
}
