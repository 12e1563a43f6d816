import ArgumentParser
import FeedWire
import Foundation
import PmemFeedClient
import PmemNBD
import PmemSystem

struct Feed: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "feed",
        abstract: "Show a served pool's mapping-change feed (Docs/FEED.md).",
        discussion: """
        Without --follow: the pool's volumes and the current event sequence number. With --follow: every
        event as it happens (remaps, snapshots, rollbacks, media errors), one per line; --json for scripts
        (each event names its volume). When the server stops, --follow says so and exits with status 1.
        """)

    @Option(name: .long, help: "The pool (default: pmem-nbd.pool); its feed is POOL.feed unless --feed is given.") var pool: String = "pmem-nbd.pool"
    @Option(name: .long, help: "The feed socket.") var feed: String?
    @Option(name: .long, help: "Only events of this volume (name).") var volume: String?
    @Option(name: .long, help: "Resume from this sequence number (0: from now).") var from: UInt64 = 0
    @Flag(name: .long, help: "Print events until interrupted.") var follow = false
    @Flag(name: .long, help: "Print JSON.") var json = false

    func run() throws {
        try reportingErrors {
            let path = feed ?? FeedPaths.defaultPath(forPool: pool)
            let c: FeedConnection
            do { c = try FeedConnection(path: path, name: "pmem-nbd feed") } catch {
                throw ServeError("cannot reach the feed at \(path): \(error) (is the pool being served?)")
            }
            try c.listVolumes()
            var volumes: [FeedVolume] = []
            while let (type, payload) = try c.receive() {
                if type == FeedMessage.volumes.rawValue { volumes = try FeedConnection.decodeVolumes(payload); break }
            }
            var names = Dictionary(volumes.map { ($0.id, $0.name) }, uniquingKeysWith: { a, _ in a })
            var filter: UInt64 = 0
            if let volume {
                guard let v = volumes.first(where: { $0.name == volume }) else { throw ServeError("no volume '\(volume)' in the feed") }
                filter = v.id
            }
            if !follow {
                if json {
                    let list = volumes.map { "{\"id\":\($0.id),\"name\":\"\(jsonEscape($0.name))\",\"kind\":\"\($0.kind == 2 ? "snapshot" : "volume")\",\"size\":\($0.size)}" }
                    print("{\"sequence\":\(c.welcome.sequence),\"instance\":\(c.welcome.instance),\"volumes\":[\(list.joined(separator: ","))]}")
                } else {
                    print("sequence \(c.welcome.sequence), server instance \(String(c.welcome.instance, radix: 16))")
                    for v in volumes { print("volume \(v.id): \(v.name) (\(v.kind == 2 ? "snapshot" : "volume"), \(formatBytes(v.size)))") }
                }
                return 0
            }
            try c.subscribe(volume: filter, from: from)
            while true {
                let message: (UInt16, [UInt8])?
                do { message = try c.receive() } catch {
                    throw ServeError("the feed at \(path) failed: \(error) (did the server stop?)")
                }
                guard let (type, payload) = message else {
                    throw ServeError("the feed at \(path) closed: the server stopped")
                }
                switch FeedMessage(rawValue: type) {
                case .events:
                    let events = try FeedConnection.decodeEvents(payload)
                    for e in events {
                        // Volumes created while following are named by their events' successors;
                        // learn the name from a fresh list when an unknown id shows up.
                        if names[e.volume] == nil { names = (try? refreshNames(path)) ?? names }
                        emitLine(json ? jsonLine(e, names) : textLine(e, names))
                    }
                    if let last = events.last { try c.ack(last.sequence) }
                case .resync:
                    emitLine(json ? "{\"resync\":true}" : "resync: events were lost; rebuild maps from map queries")
                default:
                    break
                }
            }
        }
    }

    /// The volume names the feed lists now (a second connection).
    func refreshNames(_ path: String) throws -> [UInt64: String] {
        let c = try FeedConnection(path: path, name: "pmem-nbd feed")
        try c.listVolumes()
        while let (type, payload) = try c.receive() {
            if type == FeedMessage.volumes.rawValue {
                return Dictionary(try FeedConnection.decodeVolumes(payload).map { ($0.id, $0.name) }, uniquingKeysWith: { a, _ in a })
            }
        }
        return [:]
    }

    /// One event as JSON: `volume` is the id, `name` the volume's name (when known); a media
    /// error's owners carry names too.
    func jsonLine(_ e: FeedEvent, _ names: [UInt64: String]) -> String {
        let entries = e.entries.map { "[\($0.0),\($0.1)]" }.joined(separator: ",")
        var line = "{\"seq\":\(e.sequence),\"kind\":\"\(kindName(e.kind))\",\"reason\":\"\(reasonName(e.reason))\",\"volume\":\(e.volume),"
        if let name = names[e.volume] { line += "\"name\":\"\(jsonEscape(name))\"," }
        line += "\"first\":\(e.first),\"aux\":\(e.aux),\"entries\":[\(entries)]"
        if e.kind == .mediaError {
            line += ",\"owners\":[" + e.entries.map { "{\"volume\":\($0.0),\"name\":\"\(jsonEscape(names[$0.0] ?? ""))\",\"block\":\($0.1)}" }.joined(separator: ",") + "]"
        }
        return line + "}"
    }

    func textLine(_ e: FeedEvent, _ names: [UInt64: String]) -> String {
        let v = names[e.volume] ?? "volume \(e.volume)"
        switch e.kind {
        case .remap:
            let n = e.entries.count
            let moved = e.entries.prefix(4).map { $0.1 == 0 ? "\($0.0)→hole" : "\($0.0)→\($0.1)" }.joined(separator: " ")
            return "\(e.sequence) remap \(v) blocks \(e.first)..\(e.first + UInt64(n) - 1) (\(reasonName(e.reason))): \(moved)\(n > 4 ? " …" : "")"
        case .mediaError:
            return "\(e.sequence) media error: physical block \(e.first), owners \(e.entries.map { "\(names[$0.0] ?? String($0.0)):\($0.1)" })"
        default:
            return "\(e.sequence) \(kindName(e.kind)) \(v) \(e.aux)"
        }
    }

    func kindName(_ k: FeedEventKind) -> String {
        switch k {
        case .remap: "remap"
        case .volumeCreated: "volume-created"
        case .volumeDeleted: "volume-deleted"
        case .snapshotCreated: "snapshot-created"
        case .snapshotDeleted: "snapshot-deleted"
        case .rollback: "rollback"
        case .resized: "resized"
        case .mediaError: "media-error"
        }
    }

    func reasonName(_ r: RemapReason) -> String {
        switch r {
        case .write: "write"
        case .trim: "trim"
        case .zero: "zero"
        case .copyOnWrite: "copy-on-write"
        case .mediaRelocation: "media"
        case .fence: "fence"
        case .other: "other"
        }
    }
}

/// Writes a line to standard output at once (scripts read events as they come).
func emitLine(_ line: String) {
    try? FileDescriptor.standardOutput.writeAll(bytes: Array((line + "\n").utf8))
}
