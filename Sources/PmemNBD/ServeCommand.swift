import Dispatch
import Glibc
import NBDServer
import NBDTLS
import PmemPool
import PmemVolumes
import PmemFeed
import PmemSystem

/// `pmem-nbd serve`: opens (or creates) the pool, listens, serves until SIGTERM/SIGINT,
/// then stops accepting, finishes in-flight requests, persists and unmaps.
public enum ServeCommand {
    public static func run(_ o: ServeOptions) throws -> Int32 {
        if o.fork && o.stdio { throw ServeError("--fork and --stdio cannot be used together") }
        try checkTLSOptions(o)
        // First, before anything can start a thread: fork() is only safe in a single-threaded process.
        let daemon = o.fork ? try Daemon.forkIntoBackground() : nil
        signal(SIGPIPE, SIG_IGN)
        let tls = try loadTLSCredentials(o)
        var st = stat()
        if stat(o.poolPath, &st) != 0, let size = o.createSize {
            let sb = try PoolEngine.create(path: o.poolPath, size: size)
            Log.info("created pool \(o.poolPath) (\(sb.layout.poolSize) bytes, \(sb.uuidString))")
        }
        let pool = try Pool.open(path: o.poolPath, readOnly: o.readOnly, persistence: o.persistence)
        let engine = pool.engine
        if o.prefault && !o.readOnly { engine.prefaultInBackground() }
        if engine.recoveredWords > 0 { Log.info("recovered: replayed \(engine.recoveredWords) journal words") }
        let exports = PoolExports(pool: pool, readOnly: o.readOnly, defaultName: o.exportName)
        let server = Server(exports: exports)
        server.measuresLatency = o.metrics != nil
        server.tlsMode = o.tlsMode
        server.tlsCredentials = tls
        pool.onVolumeChange { [weak server] id in
            server?.disconnect { ($0 as? Volume)?.id == id }
        }
        let p = engine.persistence
        Log.info("pool \(o.poolPath): \(engine.layout.poolSize) bytes, persistence \(p.domain.rawValue)\(p.synchronousMapping ? " (MAP_SYNC)" : "")"
                 + (p.domain == .page ? " (\(p.usesPwrite ? "pwrite" : "stores through the mapping"), \(p.rangeSync == .range ? "range syncs" : "whole-file syncs"))" : ""))

        var sockets = o.socketActivation ? SocketActivation.inheritedSockets() : []
        if o.stdio {
            // One connection: on stdin/stdout, or (as `nbdinfo -- [ pmem-nbd serve -s ]` does
            // it) the first client of a socket passed by socket activation.
            if let listening = sockets.first {
                let fd = try Socket.accept(listening)
                for s in sockets { s.close() }
                server.serveConnection(input: fd, output: fd, peer: "activated socket")
            } else {
                server.serveConnection(input: FileDescriptor.standardInput, output: FileDescriptor.standardOutput, peer: "stdio")
            }
            try pool.close()
            return 0
        }

        // SIGTERM and SIGINT are handled from before the first client can connect (or learn the
        // pid from the pid file or --fork's parent): one that arrives early stops the server cleanly.
        let stop = DispatchSemaphore(value: 0)
        var sources: [DispatchSourceSignal] = []
        for sig in [SIGTERM, SIGINT] {
            signal(sig, SIG_IGN)
            let s = DispatchSource.makeSignalSource(signal: sig, queue: .global())
            s.setEventHandler { stop.signal() }
            s.resume()
            sources.append(s)
        }
        var createdUnixPath: String?
        if !sockets.isEmpty {
            Log.info("serving \(sockets.count) socket(s) passed by the service manager")
        } else {
            if let path = o.unixPath {
                do { sockets.append(try Socket.listenUnix(path: path)) } catch {
                    throw ServeError("cannot listen on \(path): \(error == .exists ? "another server answers there" : error.description)")
                }
                createdUnixPath = path
                Log.info("listening on unix:\(path)")
            }
            if o.port != nil || o.unixPath == nil {
                let port = o.port ?? ServeOptions.defaultPort
                do { sockets += try Socket.listenTCP(host: o.bindAddress, port: port) } catch {
                    throw ServeError("cannot listen on \(o.bindAddress):\(port): \(error)")
                }
                Log.info("listening on \(o.bindAddress):\(port)")
            }
        }
        let uris = NBDURI.uris(for: sockets, exportName: exports.lookup("")?.name ?? "", tls: o.tlsMode == .require)
        try server.listen(on: sockets)
        var control: ControlServer?
        if o.controlPath != "none" && !o.readOnly {
            let path = o.controlPath ?? ControlClient.defaultPath(forPool: o.poolPath)
            control = try ControlServer(path: path, pool: pool)
            control?.start()
            Log.info("control socket \(path)")
        }
        var feed: FeedServer?
        var feedHub: FeedHub?
        var media: MediaErrors?
        if o.feedPath != "none" {
            let hub = try FeedHub(pool: pool, recallDeadline: o.recallDeadline, ackDeadline: o.ackDeadline)
            let path = o.feedPath ?? FeedPaths.defaultPath(forPool: o.poolPath)
            do { feed = try FeedServer(path: path, hub: hub) } catch {
                throw ServeError("cannot listen on the feed socket \(path): \(error)")
            }
            feed?.start()
            media = MediaErrors(hub: hub, file: o.badBlocksFile, poolPath: o.poolPath)
            media?.start()
            Log.info("mapping-change feed \(path)")
            feedHub = hub
        }
        var metrics: MetricsServer?
        if let address = o.metrics {
            let collector = ServeMetrics(server: server, pool: pool, hub: feedHub)
            metrics = try MetricsServer(address: address) { collector.render() }
            metrics?.start()
            Log.info("metrics on \(address)\(metrics!.boundPorts.isEmpty ? "" : " (port \(metrics!.boundPorts[0]))")")
        }

        if let pidFile = o.pidFile { try writePidFile(pidFile) }
        if o.printURI {
            // Straight to the descriptor: stdout may be a pipe, and the URIs must be out before
            // --fork's parent exits.
            try? FileDescriptor.standardOutput.writeAll(bytes: Array(uris.map { $0 + "\n" }.joined().utf8))
        }
        daemon?.ready(keepStandardError: o.verbose)

        stop.wait()
        Log.info("shutting down: finishing in-flight requests")
        metrics?.stop()
        control?.stop()
        media?.stop()
        feed?.stop()
        if !server.shutdown(timeoutSeconds: 30) { Log.warning("some connections did not finish in time") }
        try pool.close()
        if let path = createdUnixPath { unlink(path) }
        if let pidFile = o.pidFile { unlink(pidFile) }
        _ = sources
        return 0
    }

    /// Option combinations that cannot work, refused before anything starts.
    static func checkTLSOptions(_ o: ServeOptions) throws {
        let given = o.tlsCertificates != nil || o.tlsPSK != nil
        if o.tlsMode == .off {
            if given || o.tlsVerifyPeer {
                let which = o.tlsCertificates != nil ? "--tls-certificates" : o.tlsPSK != nil ? "--tls-psk" : "--tls-verify-peer"
                throw ServeError("\(which) has no effect with --tls off: add --tls on or --tls require")
            }
            return
        }
        if !given {
            throw ServeError("--tls \(o.tlsMode.rawValue) needs credentials: --tls-certificates DIR (server-cert.pem, server-key.pem) or --tls-psk FILE (from psktool)")
        }
        if o.tlsVerifyPeer && o.tlsCertificates == nil {
            throw ServeError("--tls-verify-peer needs --tls-certificates DIR with ca-cert.pem, the CA that signs client certificates")
        }
    }

    /// Loads certificates and keys once, at start; nil with --tls off.
    static func loadTLSCredentials(_ o: ServeOptions) throws -> TLSCredentials? {
        guard o.tlsMode != .off else { return nil }
        do {
            let c = try TLSCredentials(certificateDirectory: o.tlsCertificates, pskFile: o.tlsPSK, verifyPeer: o.tlsVerifyPeer)
            Log.info("TLS \(o.tlsMode.rawValue): \(c.summary)")
            return c
        } catch {
            throw ServeError(error.description)
        }
    }

    static func writePidFile(_ path: String) throws {
        let text = "\(getpid())\n"
        let tmp = path + ".tmp"
        let fd = try FileDescriptor.open(tmp, O_WRONLY | O_CREAT | O_TRUNC)
        defer { fd.close() }
        try Array(text.utf8).withUnsafeBytes { try fd.writeAll($0) }
        guard rename(tmp, path) == 0 else { throw ServeError("cannot write pid file \(path): \(Errno.current)") }
    }
}

public struct ServeError: Error, CustomStringConvertible {
    public var description: String
    public init(_ d: String) { description = d }
}
