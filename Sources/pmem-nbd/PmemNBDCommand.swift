import ArgumentParser
import Foundation
import Glibc
import NBDWire
import PmemNBD
import PmemPool
import PmemSystem

@main
struct PmemNBDCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "pmem-nbd",
        abstract: "Serve a persistent-memory pool over the NBD protocol.",
        discussion: """
        Examples:
          pmem-nbd serve pool.pmem --create 4G --unix /tmp/pmem.sock
          pmem-nbd create pool.pmem --size 4G
          nbdinfo 'nbd+unix:///?socket=/tmp/pmem.sock'
          pmem-nbd info pool.pmem --json
          pmem-nbd snapshot create --pool pool.pmem pmem0@before-upgrade
          pmem-nbd clone --pool pool.pmem pmem0@before-upgrade test
          nbdinfo --map=qemu:dirty-bitmap:before-upgrade 'nbd+unix:///pmem0?socket=/tmp/pmem.sock'
          pmem-nbd export-diff --pool pool.pmem pmem0@before-upgrade pmem0@after upgrade.diff

        Sizes take qemu-img's suffixes: K, M, G, T, P, E (powers of 1024; KiB, MiB… too), with a
        fraction if you like (1.5G). Shell completion: pmem-nbd --generate-completion-script bash
        (or zsh, fish); see the man page.
        """,
        version: PmemNBDVersion.text,
        subcommands: [Serve.self, Create.self, Info.self, Check.self, VolumeCommandGroup.self, SnapshotCommandGroup.self, Clone.self, ExportDiff.self, ImportDiff.self, Replicate.self,
                      Connections.self, Feed.self, Stats.self])

    static func main() {
        SignalMask.unblockAll()
        // -V, as nbdkit and qemu-nbd spell --version.
        if CommandLine.arguments.dropFirst().first == "-V" {
            print(PmemNBDVersion.text)
            return
        }
        main(nil)
    }
}

/// Runs a command body, turning pool and serve errors into one clear line on stderr and exit
/// status `failure` (1; `check` uses fsck's 8, "operational error").
func reportingErrors(failure: Int32 = 1, _ body: () throws -> Int32) throws {
    do {
        let code = try body()
        if code != 0 { throw ExitCode(code) }
    } catch let e as ExitCode {
        throw e
    } catch let e as PoolError {
        Log.error(e.message)
        throw ExitCode(failure)
    } catch let e as ServeError {
        Log.error(e.description)
        throw ExitCode(failure)
    } catch let e as PoolErrorLike {
        Log.error(e.description)
        throw ExitCode(failure)
    } catch let e as Errno {
        Log.error(e.description)
        throw ExitCode(failure)
    } catch {
        Log.error("\(error)")
        throw ExitCode(failure)
    }
}

struct Create: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "create",
        abstract: "Format a new pool (a sparse file, or a DAX device).",
        discussion: """
        --size is the pool's size; its first volume gets the pool's space less a reserve for \
        metadata and copy-on-write, unless --volume-size says otherwise. With --volume-size alone \
        (a file), the pool is sized to hold a volume of exactly that size, as serve --create does. \
        A create that fails leaves no file behind.
        """)

    @Argument(help: "Pool file or DAX device (/dev/daxX.Y).") var pool: String
    @Option(name: .long, help: "Pool size, e.g. 4G (a file needs this or --volume-size; a device's size by default).") var size: String?
    @Option(name: .long, help: "Name of the pool's first volume (its NBD export name).") var name: String = "pmem0"
    @Option(name: .long, help: "Size of that volume (default: the pool's space less a reserve for copy-on-write).") var volumeSize: String?
    @Flag(name: .long, help: "Reformat even if the target holds data or a pool.") var force = false
    @Flag(name: .long, help: "Allocate the file's space now (fallocate): no surprise ENOSPC from the file system later.") var prefault = false

    func run() throws {
        try reportingErrors {
            var vsize: UInt64?
            if let volumeSize { vsize = try SizeArgument.blocks(volumeSize, "--volume-size") }
            var bytes: UInt64?
            if let size {
                bytes = try SizeArgument.blocks(size, "--size")
            } else if let vsize {
                var st = stat()
                let isDevice = stat(pool, &st) == 0 && (st.st_mode & S_IFMT) != S_IFREG
                if !isDevice { bytes = try PoolEngine.poolSize(holding: vsize) }
            }
            let meter = ProgressMeter("allocate", unit: 1)
            let sb = try PoolEngine.create(path: pool, size: bytes, volumeName: name, volumeSize: vsize, force: force, prefault: prefault,
                                           progress: meter.update)
            meter.finish()
            let engine = try PoolEngine.open(path: pool, readOnly: true, lock: false)
            let size = engine.records().first?.size ?? 0
            print("created \(pool): \(formatBytes(sb.layout.poolSize)), uuid \(sb.uuidString), volume '\(name)' of \(formatBytes(size))")
            return 0
        }
    }
}

struct Info: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "info", abstract: "Show a pool's size, persistence mode, UUID and exports.")

    @Argument(help: "Pool file or device.") var pool: String
    @Flag(name: .long, help: "Print JSON.") var json = false
    @Option(name: .long, help: "auto, cacheline or page.") var persistence: String = "auto"

    func run() throws {
        try reportingErrors {
            guard let mode = PersistenceMode(rawValue: persistence) else { throw ServeError("--persistence must be auto, cacheline or page") }
            print(try PoolInfo.describe(path: pool, persistence: mode, json: json))
            return 0
        }
    }
}

struct Check: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "check",
        abstract: "Check a pool's consistency (like fsck); --repair fixes what is safe.",
        discussion: """
        Exit status, as fsck's: 0 clean, 1 problems found and all repaired, 4 problems left, 8 \
        the check could not run (the pool is served, missing, or not a pool). The pool must not \
        be served meanwhile.
        """)

    @Argument(help: "Pool file or device.") var pool: String
    @Flag(name: .long, help: "Fix what can be fixed safely, and say what was done.") var repair = false
    @Flag(name: .long, help: "Print JSON.") var json = false

    func run() throws {
        try reportingErrors(failure: 8) {
            let meter = ProgressMeter("check", unit: 2048)
            let report: CheckReport
            do { report = try PoolCheck.run(path: pool, repair: repair, progress: meter.update) } catch let error as PoolError {
                // Every error names the file.
                throw error.naming(pool)
            }
            meter.finish()
            print(json ? report.json() : report.text())
            return report.exitStatus
        }
    }
}

struct Serve: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "serve",
        abstract: "Serve a pool over NBD (SIGTERM, SIGINT or SIGHUP stops it cleanly).",
        discussion: """
        With neither --unix nor --port it listens on TCP \(ServeOptions.defaultPort) at --bind (with --run alone: a private Unix socket). Sockets passed by systemd (LISTEN_PID/LISTEN_FDS; unit files in Docs/systemd) are used instead when present. It prints one line per listener on standard error (pmem-nbd: serving pmem0 (4 GiB) at nbd://localhost:10809/pmem0) and stays in the foreground unless --fork is given. Aliases follow nbdkit and qemu-nbd: -U/-k socket, -p port, -r read-only, -e/-x export name, -s stdio, -P pid file.

        Examples:
          # serve on a Unix socket, and print the URI clients use
          pmem-nbd serve pool.pmem --unix /tmp/pmem.sock --print-uri
          nbdinfo 'nbd+unix:///pmem0?socket=/tmp/pmem.sock'

          # create the pool if missing, with a 4 GiB export; serve TCP on every address
          pmem-nbd serve pool.pmem --create 4G --port 10809 --bind 0.0.0.0

          # captive mode, as nbdkit's: serve a private socket while a command runs
          pmem-nbd serve pool.pmem --run 'nbdinfo "$uri"'
          pmem-nbd serve pool.pmem --run 'qemu-img convert -n disk.qcow2 "$uri"'

          # daemonize once listening (no race with the next command)
          pmem-nbd serve pool.pmem -U /tmp/pmem.sock --fork --pidfile pmem.pid
          nbdinfo 'nbd+unix:///?socket=/tmp/pmem.sock'
          kill $(cat pmem.pid)

          # Prometheus metrics, and a summary of them
          pmem-nbd serve pool.pmem -U /tmp/pmem.sock --metrics 127.0.0.1:10810
          pmem-nbd stats --metrics 127.0.0.1:10810

          # let libnbd start a private server
          nbdinfo -- [ pmem-nbd serve pool.pmem ]

          # TLS required, X.509 certificates in the nbdkit/qemu layout (ca-cert.pem,
          # server-cert.pem, server-key.pem); clients use nbds:// URIs
          pmem-nbd serve pool.pmem -U /tmp/pmem.sock --tls require --tls-certificates /etc/pki/pmem-nbd
          nbdinfo 'nbds+unix:///?socket=/tmp/pmem.sock&tls-certificates=/etc/pki/pmem-nbd-client'

          # TLS with a pre-shared key (psktool -u alice -p keys.psk)
          pmem-nbd serve pool.pmem -U /tmp/pmem.sock --tls require --tls-psk keys.psk
          nbdinfo 'nbds+unix://alice@/?socket=/tmp/pmem.sock&tls-psk-file=keys.psk'
        """)

    @Argument(help: "Pool file or device.") var pool: String = "pmem-nbd.pool"
    @Option(name: [.customLong("create")], help: "Create the pool if it does not exist, with a first volume (the export) of this size, e.g. 4G.") var create: String?
    @Option(name: [.customShort("U"), .customShort("k"), .customLong("unix"), .customLong("socket")], help: "Listen on this Unix socket ('-': a private one, for --run).") var unix: String?
    @Option(name: [.customShort("p"), .customLong("port")], help: "Listen on this TCP port (default \(ServeOptions.defaultPort)).") var port: UInt16?
    @Option(name: [.customShort("b"), .customShort("i"), .customLong("bind"), .customLong("ipaddr")], help: "TCP address to bind.") var bind: String = "127.0.0.1"
    @Flag(name: [.customShort("s"), .customLong("stdio"), .customLong("single")], help: "Serve one connection on stdin/stdout.") var stdio = false
    @Flag(name: [.customShort("r"), .customLong("read-only"), .customLong("readonly")], help: "Export read-only.") var readOnly = false
    @Option(name: [.customShort("e"), .customShort("x"), .customLong("export-name"), .customLong("exportname"), .customLong("export")],
            help: "The default export: this volume (or VOL@SNAP) if the pool has it, else the first volume advertised under this name.") var exportName: String?
    @Option(name: [.customShort("P"), .customLong("pidfile"), .customLong("pid-file")], help: "Write the process id here once listening.") var pidfile: String?
    @Option(name: .long, help: "auto (cache-line on DAX, page elsewhere), cacheline or page.") var persistence: String = "auto"
    @Flag(name: [.customShort("v"), .customLong("verbose")], help: "More logging (repeat for more).") var verbose: Int
    @Flag(name: [.customShort("f"), .customLong("foreground")], help: "Stay in the foreground (the default; see --fork).") var foreground = false
    @Flag(name: [.customShort("t"), .customLong("persistent")], help: "Keep serving after clients disconnect (the default).") var persistent = false
    @Option(name: .long, help: "Control socket for volume and snapshot commands (default POOL.ctl; 'none' to disable).") var control: String?
    @Flag(name: .long, help: "Fault the pool's blocks into memory at start, in the background.") var prefault = false
    @Option(name: .long, help: "Mapping-change feed socket (default POOL.feed; 'none' to disable).") var feed: String?
    @Option(name: .long, help: "File of bad byte ranges of the pool, 'OFFSET LENGTH' per line (testing media errors).") var badblocks: String?
    @Option(name: .long, help: "Seconds a write-lease holder has to return a recalled lease before it is fenced.") var recallDeadline: Double = 2
    @Option(name: .long, help: "Seconds a feed client may leave an event that pinned a block unacknowledged before it is fenced.") var ackDeadline: Double = 10
    @Option(name: .long, help: ArgumentHelp("Connections served at once (0: no limit); a client beyond it is closed at once, as qemu-nbd does.", valueName: "n"))
    var maxConnections: Int = ServeOptions.defaultMaxConnections
    @Option(name: .long, help: ArgumentHelp("Seconds a client has from connecting to the end of its handshake, TLS included (0: no limit).", valueName: "seconds"))
    var handshakeTimeout: Int = ServeOptions.defaultHandshakeTimeout
    @Flag(name: .long, help: "Once listening, print the NBD URI of each listening socket on standard output, one per line.") var printURI = false
    @Flag(name: .long, help: "Go into the background once listening: the command returns (0) when the server is ready.") var fork = false
    @Option(name: .long, help: ArgumentHelp("Serve Prometheus metrics over HTTP (GET /metrics) at HOST:PORT, :PORT (127.0.0.1) or unix:PATH.", valueName: "address"))
    var metrics: String?
    @Option(name: .long, help: ArgumentHelp("STARTTLS: off, on (clients choose) or require (every option but STARTTLS is refused until TLS is up).", valueName: "off|on|require"))
    var tls: String = "off"
    @Option(name: .long, help: ArgumentHelp("Directory with server-cert.pem and server-key.pem (and ca-cert.pem for --tls-verify-peer), as for nbdkit and qemu.", valueName: "dir"))
    var tlsCertificates: String?
    @Option(name: .long, help: ArgumentHelp("Pre-shared keys: a psktool file of username:hexkey lines.", valueName: "file"))
    var tlsPsk: String?
    @Flag(name: .long, help: "Require a client certificate signed by the certificate directory's ca-cert.pem.") var tlsVerifyPeer = false
    @Option(name: .customLong("run"), help: ArgumentHelp("Once serving, run this shell command with $uri, $unixsocket, $port, $exportname and $tls set; stop when it exits and exit with its status (nbdkit's captive mode).", valueName: "command"))
    var runCommand: String?
    @Flag(name: .long, help: "Stop (as on SIGTERM) when the parent process exits.") var exitWithParent = false
    @Option(name: .long, help: ArgumentHelp("Where messages go: stderr (default), syslog or null.", valueName: "stderr|syslog|null"))
    var log: String = "stderr"
    @Flag(name: .long, help: "Start each line on standard error with the time (UTC).") var logTimestamps = false

    func run() throws {
        Log.setLevel(Log.Level(rawValue: min(Log.Level.trace.rawValue, Log.Level.warning.rawValue + verbose)) ?? .trace)
        try reportingErrors {
            guard let destination = Log.Destination(rawValue: log) else { throw ServeError("--log must be stderr, syslog or null, not '\(log)'") }
            Log.configure(destination: destination, timestamps: logTimestamps)
            guard let mode = PersistenceMode(rawValue: persistence) else { throw ServeError("--persistence must be auto, cacheline or page") }
            var o = ServeOptions(poolPath: pool)
            if let create { o.createVolumeSize = try SizeArgument.blocks(create, "--create") }
            o.runCommand = runCommand
            o.exitWithParent = exitWithParent
            o.unixPath = unix
            o.port = port
            o.bindAddress = bind
            o.stdio = stdio
            o.readOnly = readOnly
            o.exportName = exportName
            o.pidFile = pidfile
            o.persistence = mode
            o.controlPath = control
            o.prefault = prefault
            o.feedPath = feed
            o.badBlocksFile = badblocks
            o.recallDeadline = recallDeadline
            o.ackDeadline = ackDeadline
            guard maxConnections >= 0 else { throw ServeError("--max-connections must be 0 (no limit) or more") }
            guard handshakeTimeout >= 0 else { throw ServeError("--handshake-timeout must be 0 (no limit) or more seconds") }
            o.maxConnections = maxConnections
            o.handshakeTimeout = handshakeTimeout
            if fork && foreground { throw ServeError("--fork and --foreground cannot be used together") }
            o.printURI = printURI
            o.fork = fork
            o.verbose = verbose > 0
            if let metrics {
                guard let address = MetricsAddress(metrics) else { throw ServeError("--metrics takes HOST:PORT, :PORT or unix:PATH, not '\(metrics)'") }
                o.metrics = address
            }
            guard let tlsMode = Negotiator.TLSMode(rawValue: tls) else { throw ServeError("--tls must be off, on or require, not '\(tls)'") }
            o.tlsMode = tlsMode
            o.tlsCertificates = tlsCertificates
            o.tlsPSK = tlsPsk
            o.tlsVerifyPeer = tlsVerifyPeer
            return try ServeCommand.run(o)
        }
    }
}

struct Stats: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "stats",
        abstract: "Show a running server's metrics (from its --metrics endpoint).",
        discussion: """
        Fetches GET /metrics from the endpoint and summarises it: connections, requests by command,
        bytes moved, latency, pool space, volumes and snapshots, copy-on-write copies, the feed.
        --raw prints the Prometheus text as served.
        """)

    @Option(name: .long, help: ArgumentHelp("The server's metrics endpoint: HOST:PORT, :PORT or unix:PATH.", valueName: "address"))
    var metrics: String = MetricsAddress.defaultText
    @Flag(name: .long, help: "Print the Prometheus text exposition as served.") var raw = false
    @Flag(name: .long, help: "Print the summary as JSON.") var json = false

    func run() throws {
        try reportingErrors {
            guard let address = MetricsAddress(metrics) else { throw ServeError("--metrics takes HOST:PORT, :PORT or unix:PATH, not '\(metrics)'") }
            print(try StatsReport.run(address: address, raw: raw, json: json), terminator: raw ? "" : "\n")
            return 0
        }
    }
}

struct Connections: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "connections",
        abstract: "List a running server's NBD connections: peer, export, since, bytes in and out, requests in flight.",
        discussion: "Asks the server through its control socket (the pool must be served read-write).")

    @OptionGroup var access: PoolAccess

    func run() throws {
        try access.perform(["op": "connections"], online: true) { r in
            let rows = r["connections"] as? [[String: Any]] ?? []
            func n(_ v: Any?) -> UInt64 { (v as? NSNumber)?.uint64Value ?? 0 }
            var lines = ["ID".padding(6) + "PEER".padding(24) + "EXPORT".padding(20) + "SINCE".padding(22) + "IN".padding(11)
                         + "OUT".padding(11) + "REQUESTS".padding(10) + "IN FLIGHT"]
            for c in rows {
                let since = (c["since"] as? NSNumber)?.doubleValue ?? 0
                let date = Date(timeIntervalSince1970: since)
                let f = DateFormatter()
                f.dateFormat = "yyyy-MM-dd HH:mm:ss"
                lines.append("\(n(c["id"]))".padding(6) + (c["peer"] as? String ?? "").padding(24) + (c["export"] as? String ?? "-").padding(20)
                             + f.string(from: date).padding(22) + formatBytes(n(c["bytes_in"])).padding(11) + formatBytes(n(c["bytes_out"])).padding(11)
                             + "\(n(c["requests"]))".padding(10) + "\(n(c["in_flight"]))")
            }
            return lines.joined(separator: "\n")
        }
    }
}
