// The mapping-change feed's wire format (Docs/FEED.md): framed little-endian messages over a
// Unix socket. Pure: no I/O, shared by the server (PmemFeed) and the client (PmemDAX).

public enum FeedProtocol {
    /// 2: VOLUMES and VOLUME-LIST carry a request id (and the list its sequence); the server
    /// confirms RELEASE and RETURN with RELEASED. Version 1 clients are refused.
    public static let version: UInt32 = 2
    /// Bytes of a frame header: payload length (u32), type (u16), flags (u16).
    public static let headerSize = 8
    /// Largest payload accepted (an EVENTS batch, or a map reply of 256k blocks).
    public static let maxPayload = 4 << 20
    /// Largest range one MAP or LEASE request may name.
    public static let maxRangeBlocks: UInt32 = 262_144
    /// Magic of the shared status page.
    public static let statusMagic: UInt64 = 0x3147_4150_5346_4e50 // "PNFSPAG1"
    /// Byte offset of the global event sequence counter in the status page.
    public static let statusSequenceOffset = 16
    /// Byte offset of the server instance id in the status page.
    public static let statusInstanceOffset = 8
}

/// Message types. Requests from the client are below 100, messages from the server at 100+.
public enum FeedMessage: UInt16, Sendable {
    // client → server
    case hello = 1
    case subscribe = 2
    case mapQuery = 3
    case reverseQuery = 4
    case lease = 5
    case release = 6
    case ack = 7
    case returnLease = 8
    case listVolumes = 9
    // server → client
    case welcome = 100
    case events = 101
    case mapReply = 102
    case reverseReply = 103
    case leaseGranted = 104
    case leaseDenied = 105
    case recall = 106
    case fenced = 107
    case resync = 108
    case error = 109
    case volumes = 110
    /// The server processed a RELEASE or RETURN of a lease that was still valid: stores made
    /// through it before are in the volume. (A lease that was fenced first gets FENCED instead.)
    case released = 111
}

/// What happened to a mapping or a volume.
public enum FeedEventKind: UInt8, Sendable {
    /// Blocks now live elsewhere (or nowhere: new = 0).
    case remap = 1
    case volumeCreated = 2
    case volumeDeleted = 3
    case snapshotCreated = 4
    case snapshotDeleted = 5
    /// The volume's whole map was replaced by a snapshot's: re-query it.
    case rollback = 6
    case resized = 7
    /// A physical block is bad; `entries` name its owners (volume, virtual block).
    case mediaError = 8
}

/// Why blocks moved.
public enum RemapReason: UInt8, Sendable {
    case write = 1
    case trim = 2
    case zero = 3
    /// Copied so a write lease owns it alone.
    case copyOnWrite = 4
    /// Moved off a bad block.
    case mediaRelocation = 5
    /// Moved away from a fenced write-lease holder.
    case fence = 6
    case other = 0
}

/// One event. For `remap`: `first` is the first virtual block and `entries` the (old, new)
/// physical blocks of consecutive virtual blocks. For `mediaError`: `first` is the physical
/// block and `entries` its owners as (volume, virtual block). Others carry `aux`.
public struct FeedEvent: Equatable, Sendable {
    public var sequence: UInt64
    public var kind: FeedEventKind
    public var reason: RemapReason
    public var volume: UInt64
    public var first: UInt64
    public var aux: UInt64
    public var entries: [(UInt64, UInt64)]

    public init(sequence: UInt64, kind: FeedEventKind, reason: RemapReason = .other, volume: UInt64, first: UInt64 = 0,
                aux: UInt64 = 0, entries: [(UInt64, UInt64)] = []) {
        self.sequence = sequence
        self.kind = kind
        self.reason = reason
        self.volume = volume
        self.first = first
        self.aux = aux
        self.entries = entries
    }

    public static func == (a: FeedEvent, b: FeedEvent) -> Bool {
        a.sequence == b.sequence && a.kind == b.kind && a.reason == b.reason && a.volume == b.volume && a.first == b.first
            && a.aux == b.aux && a.entries.count == b.entries.count && zip(a.entries, b.entries).allSatisfy { $0 == $1 }
    }

    /// Encoded size: 48-byte header + 16 bytes per entry.
    public var encodedSize: Int { 48 + 16 * entries.count }

    public func encode(into w: inout FeedWriter) {
        w.u64(sequence)
        w.u8(kind.rawValue)
        w.u8(reason.rawValue)
        w.u16(0)
        w.u32(UInt32(entries.count))
        w.u64(volume)
        w.u64(first)
        w.u64(aux)
        w.u64(0)
        for (a, b) in entries {
            w.u64(a)
            w.u64(b)
        }
    }

    public static func decode(_ r: inout FeedReader) throws(FeedWireError) -> FeedEvent {
        let seq = try r.u64()
        guard let kind = FeedEventKind(rawValue: try r.u8()) else { throw .malformed("unknown event kind") }
        let reason = RemapReason(rawValue: try r.u8()) ?? .other
        _ = try r.u16()
        let count = Int(try r.u32())
        let volume = try r.u64(), first = try r.u64(), aux = try r.u64()
        _ = try r.u64()
        guard count <= r.remaining / 16 else { throw .malformed("event entry count") }
        var entries: [(UInt64, UInt64)] = []
        entries.reserveCapacity(count)
        for _ in 0..<count { entries.append((try r.u64(), try r.u64())) }
        return FeedEvent(sequence: seq, kind: kind, reason: reason, volume: volume, first: first, aux: aux, entries: entries)
    }
}

public enum FeedWireError: Error, Equatable, Sendable {
    case truncated
    case malformed(String)
}

/// Appends little-endian fields.
public struct FeedWriter {
    public private(set) var bytes: [UInt8] = []
    public init(capacity: Int = 64) { bytes.reserveCapacity(capacity) }
    public mutating func u8(_ v: UInt8) { bytes.append(v) }
    public mutating func u16(_ v: UInt16) { withUnsafeBytes(of: v.littleEndian) { bytes += $0 } }
    public mutating func u32(_ v: UInt32) { withUnsafeBytes(of: v.littleEndian) { bytes += $0 } }
    public mutating func u64(_ v: UInt64) { withUnsafeBytes(of: v.littleEndian) { bytes += $0 } }
    public mutating func string(_ s: String) {
        let b = Array(s.utf8.prefix(4096))
        u32(UInt32(b.count))
        bytes += b
    }
    public mutating func raw(_ b: [UInt8]) { bytes += b }

    /// A whole frame: header then `payload`.
    public static func frame(_ type: FeedMessage, _ payload: [UInt8], flags: UInt16 = 0) -> [UInt8] {
        var w = FeedWriter(capacity: FeedProtocol.headerSize + payload.count)
        w.u32(UInt32(payload.count))
        w.u16(type.rawValue)
        w.u16(flags)
        w.bytes += payload
        return w.bytes
    }
}

/// Reads little-endian fields with bounds checks.
public struct FeedReader {
    let bytes: [UInt8]
    public private(set) var position: Int

    public init(_ bytes: [UInt8], from position: Int = 0) {
        self.bytes = bytes
        self.position = position
    }

    public var remaining: Int { bytes.count - position }

    private mutating func take(_ n: Int) throws(FeedWireError) -> Int {
        guard remaining >= n else { throw .truncated }
        defer { position += n }
        return position
    }

    public mutating func u8() throws(FeedWireError) -> UInt8 { bytes[try take(1)] }

    public mutating func u16() throws(FeedWireError) -> UInt16 {
        let p = try take(2)
        return UInt16(bytes[p]) | UInt16(bytes[p + 1]) << 8
    }

    public mutating func u32() throws(FeedWireError) -> UInt32 {
        let p = try take(4)
        var v: UInt32 = 0
        for i in 0..<4 { v |= UInt32(bytes[p + i]) << (8 * UInt32(i)) }
        return v
    }

    public mutating func u64() throws(FeedWireError) -> UInt64 {
        let p = try take(8)
        var v: UInt64 = 0
        for i in 0..<8 { v |= UInt64(bytes[p + i]) << (8 * UInt64(i)) }
        return v
    }

    public mutating func string() throws(FeedWireError) -> String {
        let n = Int(try u32())
        guard n <= 4096 else { throw .malformed("string too long") }
        let p = try take(n)
        return String(decoding: bytes[p..<(p + n)], as: UTF8.self)
    }
}

/// A frame header: payload length, type, flags.
public struct FeedFrameHeader: Equatable, Sendable {
    public var length: Int
    public var type: UInt16
    public var flags: UInt16

    public static func decode(_ b: [UInt8]) throws(FeedWireError) -> FeedFrameHeader {
        var r = FeedReader(b)
        let length = Int(try r.u32())
        guard length <= FeedProtocol.maxPayload else { throw .malformed("frame of \(length) bytes") }
        return FeedFrameHeader(length: length, type: try r.u16(), flags: try r.u16())
    }
}

/// Lease modes.
public enum LeaseMode: UInt8, Sendable {
    /// Blocks the holder reads stay where they are until it acknowledges their remap.
    case read = 1
    /// The holder may store directly into the (exclusively owned) blocks until recalled.
    case write = 2
}
