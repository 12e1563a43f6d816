import Testing

/// Commands and flags of NBD requests, as numbers on the wire (not the server's codec).
enum ExtendedHeaderCommand {
    static let read: UInt16 = 0, write: UInt16 = 1, disc: UInt16 = 2, flush: UInt16 = 3, trim: UInt16 = 4
    static let cache: UInt16 = 5, writeZeroes: UInt16 = 6, blockStatus: UInt16 = 7
}

enum ExtendedHeaderFlag {
    static let fua: UInt16 = 1, noHole: UInt16 = 2, df: UInt16 = 4, reqOne: UInt16 = 8, fastZero: UInt16 = 0x10
    static let payloadLen: UInt16 = 0x20
}

/// What a suite of extended-header tests uses over `RawClient`: connecting with extended
/// headers, a request's whole reply with every chunk's header checked, reads reassembled from
/// their chunks, BLOCK_STATUS_EXT decoded. Shared by NBDServerTests.ExtendedHeadersTests (a RAM
/// volume) and IntegrationTests.PoolExtendedHeadersTests (a pool's volume).
protocol ExtendedHeaderChecks {}

extension ExtendedHeaderChecks {
    typealias Chunk = RawClient.ExtendedChunk

    typealias Cmd = ExtendedHeaderCommand
    typealias Flag = ExtendedHeaderFlag

    static var EINVAL: UInt32 { 22 }
    static var ENOSPC: UInt32 { 28 }
    static var EOVERFLOW: UInt32 { 75 }
    static var maxPayload: Int { 32 << 20 }

    /// A raw client in transmission with extended headers.
    func connect(_ socketPath: String, contexts: [String] = ["base:allocation"], structuredFirst: Bool = false) throws -> (RawClient, RawClient.ExtendedSession) {
        let raw = try RawClient(unix: socketPath)
        _ = try raw.greet()
        return (raw, try raw.goExtended(structuredFirst: structuredFirst, metaContexts: contexts))
    }

    /// Sends a request and reads its whole reply; every chunk must carry the request's cookie
    /// and offset in its header.
    func roundTrip(_ raw: RawClient, _ type: UInt16, flags: UInt16 = 0, cookie: UInt64, offset: UInt64, length: UInt64,
                   payload: [UInt8] = [], sourceLocation: SourceLocation = #_sourceLocation) throws -> [Chunk] {
        try raw.send(RawClient.extendedRequest(type: type, flags: flags, cookie: cookie, offset: offset, length: length) + payload)
        guard let chunks = try raw.extendedReply() else {
            Issue.record("connection closed instead of a reply to cookie \(cookie)", sourceLocation: sourceLocation)
            return []
        }
        for c in chunks {
            #expect(c.cookie == cookie && c.offset == offset, "chunk header \(c.cookie)@\(c.offset)", sourceLocation: sourceLocation)
        }
        return chunks
    }

    /// Expects exactly one NONE chunk with DONE (success without data).
    func expectSuccess(_ chunks: [Chunk], _ what: String, sourceLocation: SourceLocation = #_sourceLocation) {
        #expect(chunks.count == 1 && chunks[0].type == 0 && chunks[0].done && chunks[0].payload.isEmpty,
                "\(what): \(chunks.map { "type \($0.type) error \($0.errorCode ?? 0) \($0.errorMessage ?? "")" })",
                sourceLocation: sourceLocation)
    }

    /// Expects one ERROR chunk with DONE and `errno`.
    func expectError(_ chunks: [Chunk], _ errno: UInt32, _ what: String, sourceLocation: SourceLocation = #_sourceLocation) {
        #expect(chunks.count == 1 && chunks[0].type == 0x8001 && chunks[0].done && chunks[0].errorCode == errno,
                "\(what): \(chunks.map { "type \($0.type) error \($0.errorCode ?? 0)" })", sourceLocation: sourceLocation)
    }

    /// Reads through extended replies and reassembles the content chunks, checking each lies
    /// inside the request and none overlap.
    func read(_ raw: RawClient, cookie: UInt64, offset: UInt64, count: Int, flags: UInt16 = 0,
              sourceLocation: SourceLocation = #_sourceLocation) throws -> (data: [UInt8], chunks: [Chunk]) {
        let chunks = try roundTrip(raw, Cmd.read, flags: flags, cookie: cookie, offset: offset, length: UInt64(count),
                                   sourceLocation: sourceLocation)
        var data = [UInt8](repeating: 0xAA, count: count)
        var covered = 0
        for c in chunks {
            var at: UInt64 = 0, n = 0
            switch c.type {
            case 1:
                at = RawClient.u64(c.payload, 0)
                n = c.payload.count - 8
            case 2:
                #expect(c.payload.count == 12, sourceLocation: sourceLocation)
                at = RawClient.u64(c.payload, 0)
                n = Int(RawClient.u32(c.payload, 8))
            case 0:
                continue
            default:
                Issue.record("read chunk type \(c.type) error \(c.errorCode ?? 0)", sourceLocation: sourceLocation)
                continue
            }
            guard at >= offset, at + UInt64(n) <= offset + UInt64(count) else {
                Issue.record("chunk [\(at), +\(n)) outside the request", sourceLocation: sourceLocation)
                continue
            }
            let start = Int(at - offset)
            if c.type == 1 {
                data.replaceSubrange(start..<(start + n), with: c.payload[8...])
            } else {
                data.replaceSubrange(start..<(start + n), with: repeatElement(0, count: n))
            }
            covered += n
        }
        #expect(covered == count, "content chunks cover \(covered) of \(count) bytes", sourceLocation: sourceLocation)
        return (data, chunks)
    }

    /// Decodes a BLOCK_STATUS_EXT chunk into (context id, [(length, status)]), checking the
    /// descriptor count against the length.
    func extents(_ c: Chunk, sourceLocation: SourceLocation = #_sourceLocation) -> (UInt32, [(UInt64, UInt64)]) {
        #expect(c.type == 6, "chunk type \(c.type) error \(c.errorCode ?? 0) \(c.errorMessage ?? "")", sourceLocation: sourceLocation)
        guard c.type == 6, c.payload.count >= 8 else { return (0, []) }
        let count = Int(RawClient.u32(c.payload, 4))
        #expect(count > 0 && c.payload.count == 8 + 16 * count, "descriptor count \(count), payload \(c.payload.count)",
                sourceLocation: sourceLocation)
        var out: [(UInt64, UInt64)] = []
        var at = 8
        while at + 16 <= c.payload.count {
            out.append((RawClient.u64(c.payload, at), RawClient.u64(c.payload, at + 8)))
            at += 16
        }
        return (RawClient.u32(c.payload, 0), out)
    }
}
