import NBDWire
import PmemPool

/// Everything `pmem-nbd serve` was asked for.
public struct ServeOptions: Sendable {
    public var poolPath: String
    /// Create the pool with this size when the file does not exist.
    public var createSize: UInt64?
    public var unixPath: String?
    public var port: UInt16?
    public var bindAddress: String = "127.0.0.1"
    public var stdio = false
    public var readOnly = false
    public var exportName: String?
    public var pidFile: String?
    public var persistence: PersistenceMode = .auto
    /// Use sockets passed by systemd (LISTEN_FDS) when present.
    public var socketActivation = true
    /// The control socket ("none" disables it; nil means the default next to the pool).
    public var controlPath: String?
    /// Fault the pool's blocks in at start (in the background).
    public var prefault = false
    /// The mapping-change feed's socket ("none" disables it; nil means POOL.feed).
    public var feedPath: String?
    /// A file of bad byte ranges of the pool (`OFFSET LENGTH` per line), for tests.
    public var badBlocksFile: String?
    /// Seconds a write-lease holder has to return a recalled lease.
    public var recallDeadline: Double = 2
    /// Seconds a feed client may leave an event that pinned a block unacknowledged.
    public var ackDeadline: Double = 10

    /// Connections served at once (0: no limit); clients beyond it are closed at once.
    public var maxConnections = ServeOptions.defaultMaxConnections
    /// Seconds a client has to finish the handshake (0: no limit).
    public var handshakeTimeout = ServeOptions.defaultHandshakeTimeout

    /// Print the NBD URIs clients should use on standard output once listening.
    public var printURI = false
    /// Fork into the background once listening (the parent exits 0 when the child serves).
    public var fork = false
    /// Keep standard error open in the background (with `-v`).
    public var verbose = false
    /// Serve Prometheus metrics over HTTP here.
    public var metrics: MetricsAddress?

    /// STARTTLS policy: off, on (clients choose) or require.
    public var tlsMode: Negotiator.TLSMode = .off
    /// Directory with server-cert.pem, server-key.pem (and ca-cert.pem to verify clients).
    public var tlsCertificates: String?
    /// psktool file of `username:hexkey` lines.
    public var tlsPSK: String?
    /// Require client certificates signed by the directory's ca-cert.pem.
    public var tlsVerifyPeer = false

    /// With `createSize`: the pool is sized so that its first volume is exactly this many bytes
    /// (and can be filled); `createSize` is then ignored.
    public var createVolumeSize: UInt64?
    /// Captive mode (nbdkit's `--run`): run this shell command once serving, with `$uri`,
    /// `$unixsocket`, `$port`, `$exportname` and `$tls` set, stop when it exits, and exit with
    /// its status.
    public var runCommand: String?
    /// Stop (as on SIGTERM) when the parent process exits.
    public var exitWithParent = false

    public init(poolPath: String) { self.poolPath = poolPath }

    /// `-U -`: a private socket in a new temporary directory (removed at exit).
    public static let privateSocket = "-"


    public static let defaultPort: UInt16 = 10809
    /// As qemu-nbd since CVE-2024-7409 (clients that connect and never finish the handshake
    /// must not exhaust the server).
    public static let defaultMaxConnections = 100
    public static let defaultHandshakeTimeout = 10
}
