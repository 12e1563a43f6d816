import Dispatch
import Glibc
import NBDServer
import NBDTLS
import NBDWire
import PmemPool
import PmemVolumes
import PmemFeed
import PmemSystem

/// `pmem-nbd serve`: opens (or creates) the pool, listens, serves until SIGTERM, SIGINT or
/// SIGHUP (or until the `--run` command exits), then stops accepting, finishes in-flight
/// requests, persists and unmaps.
public enum ServeCommand {
    public static func run(_ o: ServeOptions) throws -> Int32 {
        if o.fork && o.stdio { throw ServeError("--fork and --stdio cannot be used together") }
        if o.runCommand != nil && o.fork { throw ServeError("--run and --fork cannot be used together (--run waits for its command)") }
        if o.runCommand != nil && o.stdio { throw ServeError("--run and --stdio cannot be used together") }
        if o.exitWithParent && o.fork { throw ServeError("--exit-with-parent and --fork cannot be used together") }
        if o.unixPath == ServeOptions.privateSocket && o.stdio { throw ServeError("-U - and --stdio cannot be used together") }
        try checkTLSOptions(o)
        let parent = getppid()
        // First, before anything can start a thread: fork() is only safe in a single-threaded process.
        let daemon = o.fork ? try Daemon.forkIntoBackground() : nil
        // SIGTERM, SIGINT and SIGHUP are blocked before any thread exists (every thread inherits
        // the mask) and taken by a sigwait thread once listening is set up, so one that arrives
        // at any moment — even before the handler runs — stops the server cleanly. (With
        // --stdio they keep their default action: the one connection just ends.)
        let stopSignals = [SIGTERM, SIGINT, SIGHUP]
        if !o.stdio { SignalMask.block(stopSignals) }
        signal(SIGPIPE, SIG_IGN)
        // Large transient buffers go back to the kernel when freed (see the function).
        ProcessControl.keepLargeAllocationsMapped()
        let tls = try loadTLSCredentials(o)
        var st = stat()
        if stat(o.poolPath, &st) != 0, o.createSize != nil || o.createVolumeSize != nil {
            try createPool(o)
        }
        let pool = try Pool.open(path: o.poolPath, readOnly: o.readOnly, persistence: o.persistence)
        // From here on, a failure undoes what was set up: no socket or pid file is left behind.
        var undo: [() -> Void] = [{ try? pool.close() }]
        var started = false
        defer { if !started { for u in undo.reversed() { u() } } }
        let engine = pool.engine
        if o.prefault && !o.readOnly { engine.prefaultInBackground() }
        if engine.recoveredWords > 0 { Log.info("recovered: replayed \(engine.recoveredWords) journal words") }
        let exports = PoolExports(pool: pool, readOnly: o.readOnly, defaultName: o.exportName)
        let server = Server(exports: exports)
        server.measuresLatency = o.metrics != nil
        server.maxConnections = o.maxConnections
        server.handshakeTimeoutSeconds = o.handshakeTimeout
        server.tlsMode = o.tlsMode
        server.tlsCredentials = tls
        pool.onVolumeChange { [weak server] id in
            server?.disconnect { $0.volumeID == id }
        }
        let p = engine.persistence
        Log.info("pool \(o.poolPath): \(engine.layout.poolSize) bytes, persistence \(p.domain.rawValue)\(p.synchronousMapping ? " (MAP_SYNC)" : "")"
                 + (p.domain == .page ? " (\(p.usesPwrite ? "pwrite" : "stores through the mapping"), \(p.rangeSync == .range ? "range syncs" : "whole-file syncs"))" : ""))

        var sockets = o.socketActivation ? SocketActivation.inheritedSockets() : []
        if o.stdio {
            // One connection: on stdin/stdout, or (as `nbdinfo -- [ pmem-nbd serve -s ]` does
            // it) the first client of a socket passed by socket activation.
            started = true
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

        // SIGTERM, SIGINT and SIGHUP (as nbdkit and qemu-nbd treat it), blocked since the start,
        // are taken from here on: one that came early (before the first client could connect,
        // or learn the pid from the pid file or --fork's parent) stops the server at once.
        let stop = DispatchSemaphore(value: 0)
        SignalMask.waitOnThread(for: stopSignals) { sig in
            Log.info("signal \(sig): stopping")
            stop.signal()
        }
        if o.exitWithParent {
            do { try ProcessControl.signalWhenParentExits(SIGTERM, parent: parent) } catch {
                throw ServeError("--exit-with-parent: prctl(PR_SET_PDEATHSIG): \(error)")
            }
        }
        var createdUnixPath: String?
        var unixPath = o.unixPath
        var privateDirectory: TemporaryDirectory?
        if sockets.isEmpty && (unixPath == ServeOptions.privateSocket || (o.runCommand != nil && unixPath == nil && o.port == nil)) {
            // A private socket (nbdkit's -U -; --run alone implies it).
            do { privateDirectory = try TemporaryDirectory(prefix: "pmem-nbd") } catch {
                throw ServeError("-U -: cannot make a private directory for the socket: \(error)")
            }
            undo.append { [privateDirectory] in privateDirectory?.remove() }
            unixPath = privateDirectory!.file("socket")
        }
        if !sockets.isEmpty {
            Log.info("serving \(sockets.count) socket(s) passed by the service manager")
        } else {
            if let path = unixPath {
                do { sockets.append(try Socket.listenUnix(path: path)) } catch {
                    throw ServeError("cannot listen on \(path): \(error == .exists ? "another server answers there" : error.description)")
                }
                createdUnixPath = path
                undo.append { unlink(path) }
                Log.info("listening on unix:\(path)")
            }
            if o.port != nil || unixPath == nil {
                let port = o.port ?? ServeOptions.defaultPort
                do { sockets += try Socket.listenTCP(host: o.bindAddress, port: port) } catch {
                    throw ServeError("cannot listen on \(o.bindAddress):\(port): \(error)")
                }
                Log.info("listening on \(o.bindAddress):\(port)")
            }
        }
        let defaultExport = exports.lookup("")
        let uris = NBDURI.uris(for: sockets, exportName: defaultExport?.name ?? "", tls: o.tlsMode == .require)
        try server.listen(on: sockets)
        undo.append { _ = server.shutdown(timeoutSeconds: 5) }
        var control: ControlServer?
        if o.controlPath != "none" && !o.readOnly {
            let path = o.controlPath ?? ControlClient.defaultPath(forPool: o.poolPath)
            let context = VolumeRequests.ServerContext(
                clients: { [weak server] ids in server?.connectionCount { ids.contains($0.volumeID) } ?? 0 },
                connections: { [weak server] in (server?.connectionInfo() ?? []).map(describe) },
                uris: uris,
                listeners: sockets.compactMap { s -> [String: Any]? in
                    switch Socket.localAddress(s) {
                    case .unix(let path)?: return path.isEmpty ? nil : ["unix": path]
                    case .inet(let host, let port)?: return ["host": host, "port": Int(port)]
                    case nil: return nil
                    }
                },
                tlsRequired: o.tlsMode == .require)
            control = try ControlServer(path: path, pool: pool, context: context)
            control?.start()
            undo.append { [control] in control?.stop() }
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
            undo.append { [feed] in feed?.stop() }
            media = MediaErrors(hub: hub, file: o.badBlocksFile, poolPath: o.poolPath)
            media?.start()
            undo.append { [media] in media?.stop() }
            Log.info("mapping-change feed \(path)")
            feedHub = hub
        }
        var metrics: MetricsServer?
        if let address = o.metrics {
            let collector = ServeMetrics(server: server, pool: pool, hub: feedHub)
            metrics = try MetricsServer(address: address) { collector.render() }
            metrics?.start()
            undo.append { [metrics] in metrics?.stop() }
            Log.info("metrics on \(address)\(metrics!.boundPorts.isEmpty ? "" : " (port \(metrics!.boundPorts[0]))")")
        }

        if let pidFile = o.pidFile {
            try writePidFile(pidFile)
            undo.append { unlink(pidFile) }
        }
        // One line per listener, on standard error, unless logging was turned down.
        if let d = defaultExport {
            let what = "\(d.name) (\(formatBytes(d.size))\(d.flags.contains(.readOnly) ? ", read-only" : ""))"
            for uri in uris { Log.notice("serving \(what) at \(uri)") }
        }
        if o.printURI {
            // Straight to the descriptor: stdout may be a pipe, and the URIs must be out before
            // --fork's parent exits.
            try? FileDescriptor.standardOutput.writeAll(bytes: Array(uris.map { $0 + "\n" }.joined().utf8))
        }
        var runStatus: Locked<Int32>?
        if let command = o.runCommand {
            let tcpPort = sockets.compactMap { Socket.boundPort($0) }.first
            let environment = [
                "uri": uris.first(where: { $0.contains("+unix") }) ?? uris.first ?? "",
                "unixsocket": sockets.compactMap { s -> String? in
                    if case .unix(let path) = Socket.localAddress(s) { return path } else { return nil }
                }.first ?? "",
                "port": tcpPort.map(String.init) ?? "",
                "exportname": defaultExport?.name ?? "",
                "tls": o.tlsMode == .off ? "0" : o.tlsMode == .on ? "1" : "2",
            ]
            let pid: pid_t
            do { pid = try ProcessControl.spawnShell(command, environment: environment) } catch {
                throw ServeError("--run: cannot start /bin/sh: \(error)")
            }
            Log.info("--run: started \(command) (pid \(pid))")
            let status = Locked<Int32>(1)
            runStatus = status
            OSThread.spawn(name: "pmem-run") {
                let ended = try? ProcessControl.wait(for: pid)
                status.withLock { $0 = ended?.shellStatus ?? 1 }
                Log.info("--run: the command ended (status \(ended?.shellStatus ?? -1)); stopping")
                stop.signal()
            }
        }
        started = true
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
        privateDirectory?.remove()
        if let pidFile = o.pidFile { unlink(pidFile) }
        return runStatus?.withLock { $0 } ?? 0
    }

    /// `serve --create`: a pool whose first volume is exactly the size asked for (the pool file
    /// is larger by its metadata and copy-on-write reserve; it is sparse), or with
    /// `createSize` alone a pool of that size.
    static func createPool(_ o: ServeOptions) throws {
        let poolSize: UInt64
        if let v = o.createVolumeSize { poolSize = try PoolEngine.poolSize(holding: v) } else { poolSize = o.createSize! }
        let sb = try PoolEngine.create(path: o.poolPath, size: poolSize, volumeSize: o.createVolumeSize)
        let engine = try PoolEngine.open(path: o.poolPath, readOnly: true, lock: false)
        let volume = engine.records().first
        Log.notice("created \(o.poolPath): volume \(volume?.name ?? "pmem0") of \(formatBytes(volume?.size ?? 0)) in a sparse pool file "
                   + "of \(formatBytes(sb.layout.poolSize)) (the rest holds metadata and the copy-on-write reserve), uuid \(sb.uuidString)")
    }

    /// A connection as the `connections` control request answers it.
    static func describe(_ c: ConnectionInfo) -> [String: Any] {
        var d: [String: Any] = ["id": c.id, "peer": c.peer, "since": c.since, "bytes_in": c.bytesIn, "bytes_out": c.bytesOut,
                                "requests": c.requests, "in_flight": c.inFlight]
        if let e = c.export { d["export"] = e }
        return d
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
        do {
            let fd = try FileDescriptor.open(tmp, O_WRONLY | O_CREAT | O_TRUNC)
            defer { fd.close() }
            try fd.writeAll(bytes: Array(text.utf8))
        } catch {
            unlink(tmp)
            throw ServeError("cannot write the pid file \(path): \(error)")
        }
        guard rename(tmp, path) == 0 else {
            let e = Errno.current
            unlink(tmp)
            throw ServeError("cannot write the pid file \(path): \(e)")
        }
    }
}

public struct ServeError: Error, CustomStringConvertible {
    public var description: String
    public init(_ d: String) { description = d }
}
