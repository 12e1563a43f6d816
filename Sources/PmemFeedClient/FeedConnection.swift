import FeedWire
import Glibc
import PmemSystem

/// What the server says in WELCOME.
public struct FeedWelcome: Sendable {
    public var version: UInt32
    public var writable: Bool
    public var instance: UInt64
    public var sequence: UInt64
    public var blockAreaOffset: UInt64
    public var blockCount: UInt64
    public var poolSize: UInt64
    public var uuid: [UInt8]
}

/// A volume or snapshot as the feed lists it.
public struct FeedVolume: Sendable, Equatable {
    public var id: UInt64
    public var parent: UInt64
    public var size: UInt64
    /// 1 volume, 2 snapshot.
    public var kind: UInt8
    public var name: String
}

public struct FeedClientError: Error, CustomStringConvertible {
    public var description: String
    public init(_ d: String) { description = d }
}

/// A connection to a server's mapping-change feed (Docs/FEED.md): HELLO/WELCOME with the pool
/// and status page descriptors attached, then framed messages both ways.
public final class FeedConnection: @unchecked Sendable {
    public let fd: FileDescriptor
    public private(set) var welcome: FeedWelcome!
    /// The pool (read-write when the server allows write leases) and the status page.
    public private(set) var poolFD: FileDescriptor?
    public private(set) var statusFD: FileDescriptor?
    private let sendLock = PosixMutex()

    public init(path: String, name: String) throws {
        fd = try Socket.connectUnix(path: path)
        var w = FeedWriter()
        w.u32(FeedProtocol.version)
        w.u32(0)
        w.string(name)
        try send(.hello, w.bytes)
        // WELCOME carries descriptors: receive its header with recvmsg.
        var header = [UInt8](repeating: 0, count: FeedProtocol.headerSize)
        let received = header.withUnsafeMutableBytes { h in try? Socket.receive(fd, into: h, maxDescriptors: 4) }
        guard let (got, fds) = received, got > 0 else { throw FeedClientError("the feed closed the connection") }
        if got < header.count {
            guard let rest = try readExactly(header.count - got) else { throw FeedClientError("the feed closed the connection") }
            header.replaceSubrange(got..., with: rest)
        }
        let h = try FeedFrameHeader.decode(header)
        guard let payload = try readExactly(h.length) else { throw FeedClientError("the feed closed the connection") }
        guard h.type == FeedMessage.welcome.rawValue else {
            var r = FeedReader(payload)
            throw FeedClientError("the feed refused: \((try? r.string()) ?? "message \(h.type)")")
        }
        var r = FeedReader(payload)
        welcome = FeedWelcome(version: try r.u32(), writable: try r.u32() & 1 != 0, instance: try r.u64(), sequence: try r.u64(),
                              blockAreaOffset: try r.u64(), blockCount: try r.u64(), poolSize: try r.u64(),
                              uuid: { _ = try? r.u32(); _ = try? r.u32(); return (0..<16).map { _ in (try? r.u8()) ?? 0 } }())
        if fds.count >= 2 {
            poolFD = fds[0]
            statusFD = fds[1]
        } else if fds.count == 1 {
            statusFD = fds[0]
        }
    }

    deinit {
        fd.close()
        poolFD?.close()
        statusFD?.close()
    }

    public func send(_ type: FeedMessage, _ payload: [UInt8]) throws {
        let frame = FeedWriter.frame(type, payload)
        try sendLock.withLock { () throws in try fd.writeAll(bytes: frame) }
    }

    /// Blocks for the next frame; nil when the server closed the connection.
    public func receive() throws -> (UInt16, [UInt8])? {
        guard let header = try readExactly(FeedProtocol.headerSize) else { return nil }
        let h = try FeedFrameHeader.decode(header)
        guard let payload = try readExactly(h.length) else { return nil }
        return (h.type, payload)
    }

    public func close() { Socket.shutdown(fd) }

    /// Whether a frame (or part of one) is already waiting to be received (`poll(2)`, no wait).
    public var hasPendingInput: Bool {
        var p = pollfd(fd: fd.rawValue, events: Int16(POLLIN), revents: 0)
        return poll(&p, 1, 0) > 0 && p.revents & Int16(POLLIN) != 0
    }

    private func readExactly(_ n: Int) throws -> [UInt8]? { try fd.readExactly(n) }

    // MARK: requests

    /// VOLUMES; the VOLUME-LIST answer echoes `request`.
    public func listVolumes(_ request: UInt64 = 0) throws {
        var w = FeedWriter()
        w.u64(request)
        try send(.listVolumes, w.bytes)
    }

    public func subscribe(volume: UInt64, from: UInt64) throws {
        var w = FeedWriter()
        w.u64(volume)
        w.u64(from)
        try send(.subscribe, w.bytes)
    }

    public func ack(_ sequence: UInt64) throws {
        var w = FeedWriter()
        w.u64(sequence)
        try send(.ack, w.bytes)
    }

    public func requestMap(_ request: UInt64, volume: UInt64, first: UInt64, count: UInt32) throws {
        var w = FeedWriter()
        w.u64(request)
        w.u64(volume)
        w.u64(first)
        w.u32(count)
        try send(.mapQuery, w.bytes)
    }

    public func requestReverse(_ request: UInt64, block: UInt64) throws {
        var w = FeedWriter()
        w.u64(request)
        w.u64(block)
        try send(.reverseQuery, w.bytes)
    }

    public func requestLease(_ request: UInt64, mode: LeaseMode, volume: UInt64, first: UInt64, count: UInt32, durationMs: UInt32) throws {
        var w = FeedWriter()
        w.u64(request)
        w.u8(mode.rawValue)
        w.u8(0)
        w.u16(0)
        w.u32(durationMs)
        w.u64(volume)
        w.u64(first)
        w.u32(count)
        try send(.lease, w.bytes)
    }

    public func release(_ lease: UInt64) throws {
        var w = FeedWriter()
        w.u64(lease)
        try send(.release, w.bytes)
    }

    public func returnLease(_ lease: UInt64) throws {
        var w = FeedWriter()
        w.u64(lease)
        try send(.returnLease, w.bytes)
    }

    // MARK: decoding replies

    public static func decodeVolumes(_ payload: [UInt8]) throws -> [FeedVolume] { try decodeVolumeList(payload).volumes }

    /// A VOLUME-LIST: the request it answers, the sequence it reflects, the volumes.
    public static func decodeVolumeList(_ payload: [UInt8]) throws -> (request: UInt64, sequence: UInt64, volumes: [FeedVolume]) {
        var r = FeedReader(payload)
        let request = try r.u64(), sequence = try r.u64()
        let n = Int(try r.u32())
        guard n <= r.remaining / 29 else { throw FeedWireError.malformed("volume count") }
        var out: [FeedVolume] = []
        for _ in 0..<n { out.append(FeedVolume(id: try r.u64(), parent: try r.u64(), size: try r.u64(), kind: try r.u8(), name: try r.string())) }
        return (request, sequence, out)
    }

    public static func decodeEvents(_ payload: [UInt8]) throws -> [FeedEvent] {
        var r = FeedReader(payload)
        let n = Int(try r.u32())
        var out: [FeedEvent] = []
        out.reserveCapacity(n)
        for _ in 0..<n { out.append(try FeedEvent.decode(&r)) }
        return out
    }
}
