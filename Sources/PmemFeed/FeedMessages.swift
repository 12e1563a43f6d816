import FeedWire

/// Server → client frames (Docs/FEED.md has the layouts).
enum FeedMessages {
    static func welcome(instance: UInt64, sequence: UInt64, blockAreaOffset: UInt64, blockCount: UInt64, poolSize: UInt64,
                        uuid: [UInt8], writable: Bool) -> [UInt8] {
        var w = FeedWriter()
        w.u32(FeedProtocol.version)
        w.u32(writable ? 1 : 0)
        w.u64(instance)
        w.u64(sequence)
        w.u64(blockAreaOffset)
        w.u64(blockCount)
        w.u64(poolSize)
        w.u32(4096)
        w.u32(0)
        w.raw(uuid)
        return FeedWriter.frame(.welcome, w.bytes)
    }

    static func events(_ events: [FeedEvent]) -> [UInt8] {
        var w = FeedWriter(capacity: 4 + events.reduce(0) { $0 + $1.encodedSize })
        w.u32(UInt32(events.count))
        for e in events { e.encode(into: &w) }
        return FeedWriter.frame(.events, w.bytes)
    }

    static func mapReply(request: UInt64, sequence: UInt64, volume: UInt64, first: UInt64, blocks: [UInt64]) -> [UInt8] {
        var w = FeedWriter(capacity: 40 + 8 * blocks.count)
        w.u64(request)
        w.u64(sequence)
        w.u64(volume)
        w.u64(first)
        w.u32(UInt32(blocks.count))
        w.u32(0)
        for b in blocks { w.u64(b) }
        return FeedWriter.frame(.mapReply, w.bytes)
    }

    static func reverseReply(request: UInt64, sequence: UInt64, block: UInt64, owners: [(UInt64, UInt64)]) -> [UInt8] {
        var w = FeedWriter(capacity: 32 + 16 * owners.count)
        w.u64(request)
        w.u64(sequence)
        w.u64(block)
        w.u32(UInt32(owners.count))
        w.u32(0)
        for (v, b) in owners {
            w.u64(v)
            w.u64(b)
        }
        return FeedWriter.frame(.reverseReply, w.bytes)
    }

    static func granted(request: UInt64, lease: UInt64, mode: LeaseMode, sequence: UInt64, durationMs: UInt32, volume: UInt64,
                        first: UInt64, blocks: [UInt64]) -> [UInt8] {
        var w = FeedWriter(capacity: 56 + 8 * blocks.count)
        w.u64(request)
        w.u64(lease)
        w.u8(mode.rawValue)
        w.u8(0)
        w.u16(0)
        w.u32(durationMs)
        w.u64(sequence)
        w.u64(volume)
        w.u64(first)
        w.u32(UInt32(blocks.count))
        w.u32(0)
        for b in blocks { w.u64(b) }
        return FeedWriter.frame(.leaseGranted, w.bytes)
    }

    static func denied(request: UInt64, reason: String) -> [UInt8] {
        var w = FeedWriter()
        w.u64(request)
        w.string(reason)
        return FeedWriter.frame(.leaseDenied, w.bytes)
    }

    static func recall(lease: UInt64, deadlineMs: UInt32) -> [UInt8] {
        var w = FeedWriter()
        w.u64(lease)
        w.u32(deadlineMs)
        w.u32(0)
        return FeedWriter.frame(.recall, w.bytes)
    }

    static func fenced(lease: UInt64) -> [UInt8] {
        var w = FeedWriter()
        w.u64(lease)
        return FeedWriter.frame(.fenced, w.bytes)
    }

    static func resync(sequence: UInt64) -> [UInt8] {
        var w = FeedWriter()
        w.u64(sequence)
        return FeedWriter.frame(.resync, w.bytes)
    }

    static func error(_ text: String) -> [UInt8] {
        var w = FeedWriter()
        w.string(text)
        return FeedWriter.frame(.error, w.bytes)
    }

    static func released(lease: UInt64) -> [UInt8] {
        var w = FeedWriter()
        w.u64(lease)
        return FeedWriter.frame(.released, w.bytes)
    }

    /// Volumes: request, sequence, count, then per volume: id, parent, size, kind, name.
    static func volumes(request: UInt64, sequence: UInt64, _ list: [(id: UInt64, parent: UInt64, size: UInt64, kind: UInt8, name: String)]) -> [UInt8] {
        var w = FeedWriter()
        w.u64(request)
        w.u64(sequence)
        w.u32(UInt32(list.count))
        for v in list {
            w.u64(v.id)
            w.u64(v.parent)
            w.u64(v.size)
            w.u8(v.kind)
            w.string(v.name)
        }
        return FeedWriter.frame(.volumes, w.bytes)
    }
}
