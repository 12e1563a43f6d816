// swift-tools-version: 6.0
import PackageDescription

let package = Package(
    name: "pmem-nbd",
    products: [
        .executable(name: "pmem-nbd", targets: ["pmem-nbd"]),
        .library(name: "NBDWire", targets: ["NBDWire"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.5.0"),
    ],
    targets: [
        // C: epoll, eventfd, accept4, MAP_SYNC, CPUID-selected cache-line flushes, CRC32C.
        .target(name: "CPmemSupport", cSettings: [.define("_GNU_SOURCE"), .unsafeFlags(["-O2"])]),
        // Thin typed wrappers over system calls, threads, logging.
        .target(name: "PmemSystem", dependencies: ["CPmemSupport"]),
        // The NBD wire protocol: codec and negotiation state machine. No I/O.
        .target(name: "NBDWire"),
        // The pool engine: persistence, journal, allocator, maps, recovery, check.
        .target(name: "PmemPool", dependencies: ["PmemSystem", "CPmemSupport"]),
        // Volumes and snapshots over the engine: the block devices the server exports.
        .target(name: "PmemVolumes", dependencies: ["PmemPool", "PmemSystem"]),
        // Sessions and listeners: sockets, handshake and transmission I/O.
        .target(name: "NBDServer", dependencies: ["NBDWire", "PmemVolumes", "PmemPool", "PmemSystem", "CPmemSupport"]),
        // The application: pools exposed as NBD exports; commands the CLI calls.
        .target(name: "PmemNBD", dependencies: ["NBDServer", "NBDWire", "PmemVolumes", "PmemPool", "PmemSystem"]),
        .executableTarget(name: "pmem-nbd", dependencies: [
            "PmemNBD", "PmemSystem",
            .product(name: "ArgumentParser", package: "swift-argument-parser"),
        ]),
        // libnbd, for tests that drive the server through a real client.
        .systemLibrary(name: "CLibNBD", pkgConfig: "libnbd", providers: [.apt(["libnbd-dev"])]),
        .testTarget(name: "NBDWireTests", dependencies: ["NBDWire"]),
        .testTarget(name: "PmemNBDTests", dependencies: [
            "PmemNBD", "NBDServer", "NBDWire", "PmemVolumes", "PmemPool", "PmemSystem", "CLibNBD", "pmem-nbd",
        ]),
    ]
)
