// swift-tools-version: 6.0
import PackageDescription

let package = Package(
    name: "pmem-nbd",
    products: [
        .executable(name: "pmem-nbd", targets: ["pmem-nbd"]),
        .library(name: "NBDWire", targets: ["NBDWire"]),
        .library(name: "PmemDAX", targets: ["PmemDAX"]),
        .executable(name: "pmem-dax-read", targets: ["pmem-dax-read"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.5.0"),
    ],
    targets: [
        // C: epoll, eventfd, accept4, MAP_SYNC, CPUID-selected cache-line flushes, CRC32C.
        .target(name: "CPmemSupport", cSettings: [.define("_GNU_SOURCE"), .unsafeFlags(["-O2"])]),
        // Thin typed wrappers over system calls, threads, logging: the only module that imports
        // CPmemSupport (SourceAuditTests checks it).
        .target(name: "PmemSystem", dependencies: ["CPmemSupport"]),
        // The NBD wire protocol: codec and negotiation state machine. No I/O.
        .target(name: "NBDWire"),
        // The pool engine: persistence, journal, allocator, maps, recovery, check.
        .target(name: "PmemPool", dependencies: ["PmemSystem"]),
        // Volumes and snapshots over the engine: the block devices the server exports.
        .target(name: "PmemVolumes", dependencies: ["PmemPool", "PmemSystem"]),
        // The mapping-change feed's wire format. No I/O.
        .target(name: "FeedWire"),
        // The mapping-change feed service: events, leases, map and reverse queries.
        .target(name: "PmemFeed", dependencies: ["FeedWire", "PmemVolumes", "PmemPool", "PmemSystem"]),
        // A client connection to the feed (framing, descriptors passed with WELCOME).
        .target(name: "PmemFeedClient", dependencies: ["FeedWire", "PmemSystem"]),
        // TLS through GnuTLS: credentials loaded at start, one session per connection.
        .target(name: "NBDTLS", dependencies: ["CGnuTLS", "PmemSystem"]),
        .systemLibrary(name: "CGnuTLS", pkgConfig: "gnutls", providers: [.apt(["libgnutls28-dev"])]),
        // Sessions and listeners: sockets, handshake and transmission I/O.
        // It knows nothing of pools: exports are `BlockVolume`s (Storage.swift), which PmemNBD
        // makes of volumes (VolumeExport).
        .target(name: "NBDServer", dependencies: ["NBDWire", "NBDTLS", "PmemSystem"]),
        // The application: pools exposed as NBD exports; commands the CLI calls.
        .target(name: "PmemNBD", dependencies: ["NBDServer", "NBDWire", "NBDTLS", "PmemFeed", "PmemFeedClient", "FeedWire", "PmemVolumes", "PmemPool", "PmemSystem"]),
        .executableTarget(name: "pmem-nbd", dependencies: [
            "PmemNBD", "NBDWire", "PmemSystem", "PmemFeedClient", "FeedWire",
            .product(name: "ArgumentParser", package: "swift-argument-parser"),
        ], linkerSettings: [
            // The Swift runtime and Foundation linked in: a release binary starts in about a third of
            // the time (no symbol lookups across a dozen shared libraries), which is most of a CLI
            // command's time against a served pool (Docs/PERFORMANCE.md, "Control plane").
            .unsafeFlags(["-static-stdlib", "-lCoreFoundation", "-l_FoundationICU", "-l_FoundationCShims", "-l_FoundationCollections"], .when(configuration: .release)),
        ]),
        // The DAX client library: a local process reads (and with a write lease, writes) pool
        // memory directly, following the feed; falls back to NBD through libnbd.
        .target(name: "PmemDAX", dependencies: ["PmemFeedClient", "FeedWire", "PmemSystem", "CLibNBD"]),
        // Example: reads a volume through PmemDAX; --bench compares with NBD.
        .executableTarget(name: "pmem-dax-read", dependencies: ["PmemDAX", "CLibNBD", "PmemSystem"]),
        // The wire codec's fuzz target: replays a corpus; with -DFUZZING -sanitize=fuzzer it is
        // a libFuzzer target (scripts/fuzz).
        .executableTarget(name: "nbd-fuzz", dependencies: ["NBDWire"]),
        // libnbd, for tests that drive the server through a real client.
        .systemLibrary(name: "CLibNBD", pkgConfig: "libnbd", providers: [.apt(["libnbd-dev"])]),
        .testTarget(name: "NBDWireTests", dependencies: ["NBDWire"]),
        // Tests per module (Docs/ARCHITECTURE.md, "Tests"). Test targets cannot depend on each
        // other, so what they share is this ordinary target (imported `@testable`): scratch
        // directories, programs run with a hard deadline and reaped, the libnbd client, the raw NBD
        // client. It knows neither the server nor the pool.
        .target(name: "TestSupport", dependencies: ["NBDWire", "PmemSystem", "CLibNBD"], path: "Tests/TestSupport"),
        // The engine and the system layer under it: crash states, check and repair, corruption,
        // journal memory, open cost; no server (SourceAuditTests checks the imports). Check and
        // corruption tests also run the built `pmem-nbd check`/`serve` as a process.
        .testTarget(name: "PmemPoolTests", dependencies: ["TestSupport", "PmemPool", "PmemVolumes", "PmemSystem"]),
        // Volumes and snapshots through `Pool`/`Volume`, no server (SourceAuditTests checks).
        .testTarget(name: "PmemVolumesTests", dependencies: ["TestSupport", "PmemVolumes", "PmemPool", "PmemSystem"]),
        // The server against a RAM-backed `BlockVolume`, no pool.
        .testTarget(name: "NBDServerTests", dependencies: ["TestSupport", "NBDServer", "NBDWire", "PmemSystem", "CLibNBD"]),
        // The feed's lease protocol: its spin model (Tests/Model) and negative controls.
        .testTarget(name: "PmemFeedTests", dependencies: ["TestSupport"]),
        // Everything through the assembled server: the CLI, the service, process crashes, libnbd
        // and qemu interop, the man page, metrics, the feed and DAX, snapshots over NBD, TLS,
        // hostile clients, Ceph, the torture test.
        .testTarget(name: "IntegrationTests", dependencies: [
            "TestSupport", "PmemNBD", "NBDServer", "NBDWire", "NBDTLS", "PmemVolumes", "PmemPool", "PmemSystem", "CLibNBD", "pmem-nbd",
            "PmemFeed", "PmemFeedClient", "FeedWire", "PmemDAX",
        ]),
    ]
)
