import Foundation
import Glibc
import PmemSystem
@testable import TestSupport
import Testing

/// NBD extended headers end to end over raw sockets (Debian's libnbd 1.14 cannot speak them):
/// negotiation orderings, every command with 32-byte requests and extended replies, 64-bit
/// lengths on a large sparse volume, bad lengths, and libnbd with compact headers on other
/// connections of the same server as the independent reader and bystander.
@Suite(.timeLimit(.minutes(5))) struct ExtendedHeadersTests {
    typealias Chunk = RawClient.ExtendedChunk

    enum Cmd {
        static let read: UInt16 = 0, write: UInt16 = 1, disc: UInt16 = 2, flush: UInt16 = 3, trim: UInt16 = 4
        static let cache: UInt16 = 5, writeZeroes: UInt16 = 6, blockStatus: UInt16 = 7
    }

    enum Flag {
        static let fua: UInt16 = 1, noHole: UInt16 = 2, df: UInt16 = 4, reqOne: UInt16 = 8, fastZero: UInt16 = 0x10
        static let payloadLen: UInt16 = 0x20
    }

    static let EINVAL: UInt32 = 22, ENOSPC: UInt32 = 28, EOVERFLOW: UInt32 = 75
    static let maxPayload = 32 << 20

    /// A raw client in transmission with extended headers.
    func connect(_ s: TestServer, contexts: [String] = ["base:allocation"], structuredFirst: Bool = false) throws -> (RawClient, RawClient.ExtendedSession) {
        let raw = try RawClient(unix: s.socketPath)
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

    // MARK: negotiation

    @Test func negotiationOrderingsOverTheWire() throws {
        let s = try TestServer()
        let raw = try RawClient(unix: s.socketPath)
        _ = try raw.greet()
        try raw.send(RawClient.option(11, [1]))
        #expect(try raw.optionReply()?.type == 0x8000_0003, "data with EXTENDED_HEADERS")
        try raw.send(RawClient.option(11, []))
        #expect(try raw.optionReply().map { $0.option == 11 && $0.type == 1 } == true)
        try raw.send(RawClient.option(11, []))
        #expect(try raw.optionReply()?.type == 0x8000_0003, "a repeat")
        try raw.send(RawClient.option(8, []))
        #expect(try raw.optionReply()?.type == 0x8000_000a, "STRUCTURED_REPLY after: ERR_EXT_HEADER_REQD")
        // LIST and LIST_META_CONTEXT still answer (no STRUCTURED_REPLY was acknowledged).
        try raw.send(RawClient.option(3, []))
        var servers = 0
        while let r = try raw.optionReply(), r.type != 1 { servers += r.type == 2 ? 1 : 100 }
        #expect(servers == 1)
        try raw.send(RawClient.option(9, RawClient.be(UInt32(0)) + RawClient.be(UInt32(0))))
        var contexts: [String] = []
        while let r = try raw.optionReply(), r.type != 1 {
            #expect(r.type == 4)
            contexts.append(String(decoding: r.data.dropFirst(4), as: UTF8.self))
        }
        #expect(contexts.contains("base:allocation"))
        // INFO: DF (replies are chunks), no BLOCK_STATUS payload form.
        try raw.send(RawClient.option(6, RawClient.be(UInt32(0)) + RawClient.be(UInt16(0))))
        var flags: UInt16 = 0
        while let r = try raw.optionReply(), r.type != 1 {
            if r.type == 3, r.data.prefix(2) == [0, 0] { flags = UInt16(r.data[10]) << 8 | UInt16(r.data[11]) }
        }
        #expect(flags & 0x80 != 0 && flags & 0x1000 == 0, "flags 0x\(String(flags, radix: 16))")
        // GO, then the first request gets an extended reply.
        try raw.send(RawClient.option(7, RawClient.be(UInt32(0)) + RawClient.be(UInt16(0))))
        while let r = try raw.optionReply(), r.type != 1 { #expect(r.type == 3) }
        expectSuccess(try roundTrip(raw, Cmd.flush, cookie: 1, offset: 0, length: 0), "FLUSH")
    }

    @Test func structuredRepliesFirstThenExtendedHeaders() throws {
        let s = try TestServer()
        let (raw, session) = try connect(s, structuredFirst: true)
        #expect(session.size == s.volume.size)
        expectSuccess(try roundTrip(raw, Cmd.cache, cookie: 2, offset: 4096, length: 4096), "CACHE")
    }

    @Test func exportNameAfterExtendedHeadersEndsTheSession() throws {
        let s = try TestServer()
        let raw = try RawClient(unix: s.socketPath)
        _ = try raw.greet()
        try raw.send(RawClient.option(11, []))
        #expect(try raw.optionReply()?.type == 1)
        try raw.send(RawClient.option(1, []))
        #expect(raw.isClosedByServer())
    }

    @Test func refusedExtendedHeadersLeaveCompactTransmission() throws {
        let s = try TestServer()
        let raw = try RawClient(unix: s.socketPath)
        _ = try raw.greet()
        try raw.send(RawClient.option(11, [0, 0]))
        #expect(try raw.optionReply()?.type == 0x8000_0003)
        _ = try raw.go(structured: false)
        try raw.send(RawClient.request(type: Cmd.flush, cookie: 3, offset: 0, length: 0))
        guard case .simple(let r) = try raw.reply() else { Issue.record("expected a simple reply"); return }
        #expect(r.cookie == 3 && r.error == 0)
    }

    // MARK: transmission

    @Test func writeThenReadBackByContentAndThroughLibnbd() throws {
        let s = try TestServer()
        let (raw, session) = try connect(s)
        #expect(session.size == s.volume.size)
        #expect(session.flags & 0x80 != 0, "DF advertised")
        let data = pattern(70_000, seed: 11)
        let at: UInt64 = (1 << 20) + 100
        expectSuccess(try roundTrip(raw, Cmd.write, flags: Flag.payloadLen, cookie: 1, offset: at, length: UInt64(data.count),
                                    payload: data), "WRITE")
        // Read a range with a hole before and after the data: content chunks reassemble to it.
        let (back, chunks) = try read(raw, cookie: 2, offset: 1 << 20, count: 96 << 10)
        #expect(Array(back[100..<(100 + data.count)]) == data)
        #expect(back[0..<100].allSatisfy { $0 == 0 } && back[(100 + data.count)...].allSatisfy { $0 == 0 })
        #expect(chunks.contains { $0.type == 2 }, "holes are sent as OFFSET_HOLE")
        #expect(chunks.last?.done == true && chunks.dropLast().allSatisfy { !$0.done })
        // DF: one OFFSET_DATA chunk, zeroes included.
        let (df, dfChunks) = try read(raw, cookie: 3, offset: 1 << 20, count: 96 << 10, flags: Flag.df)
        #expect(df == back)
        #expect(dfChunks.count == 1 && dfChunks[0].type == 1 && dfChunks[0].done)
        // The same bytes through libnbd with compact headers on another connection.
        let c = try s.client()
        #expect(try c.pread(count: data.count, offset: at) == data)
        // And what libnbd writes, the extended client reads.
        let other = pattern(8192, seed: 12)
        try c.pwrite(other, offset: 8 << 20)
        #expect(try read(raw, cookie: 4, offset: 8 << 20, count: 8192).data == other)
        // A zero-length read is answered with NONE.
        expectSuccess(try roundTrip(raw, Cmd.read, cookie: 5, offset: 4096, length: 0), "zero-length READ")
    }

    @Test func everyCommandAnswersWithExtendedReplies() throws {
        let s = try TestServer()
        let (raw, _) = try connect(s)
        let data = pattern(4096, seed: 3)
        expectSuccess(try roundTrip(raw, Cmd.write, flags: Flag.payloadLen | Flag.fua, cookie: 1, offset: 65536, length: 4096,
                                    payload: data), "WRITE with FUA")
        expectSuccess(try roundTrip(raw, Cmd.flush, cookie: 2, offset: 0, length: 0), "FLUSH")
        expectSuccess(try roundTrip(raw, Cmd.cache, cookie: 3, offset: 0, length: 1 << 20), "CACHE")
        expectSuccess(try roundTrip(raw, Cmd.writeZeroes, flags: Flag.noHole, cookie: 4, offset: 65536, length: 4096), "WRITE_ZEROES")
        #expect(try read(raw, cookie: 5, offset: 65536, count: 4096).data == [UInt8](repeating: 0, count: 4096))
        expectSuccess(try roundTrip(raw, Cmd.writeZeroes, flags: Flag.fastZero, cookie: 6, offset: 0, length: 1 << 20), "fast zero")
        expectSuccess(try roundTrip(raw, Cmd.trim, flags: Flag.fua, cookie: 7, offset: 0, length: 1 << 20), "TRIM with FUA")
        expectError(try roundTrip(raw, 99, cookie: 8, offset: 12_345, length: 0), Self.EINVAL, "unknown command")
        expectError(try roundTrip(raw, Cmd.read, flags: 0x80, cookie: 9, offset: 4096, length: 4096), Self.EINVAL, "unknown flag on READ")
        // DISC: no reply, the server closes.
        try raw.send(RawClient.extendedRequest(type: Cmd.disc, cookie: 10, offset: 0, length: 0))
        #expect(try raw.extendedChunk() == nil)
    }

    @Test func blockStatusExtOnWrittenAndTrimmedRegions() throws {
        let s = try TestServer()
        let (raw, session) = try connect(s)
        let id = try #require(session.contexts["base:allocation"])
        let k: UInt64 = 1024
        for (at, n) in [(0, 64), (128, 128), (512, 64)] as [(UInt64, UInt64)] {
            expectSuccess(try roundTrip(raw, Cmd.write, flags: Flag.payloadLen, cookie: 1, offset: at * k, length: n * k,
                                        payload: pattern(Int(n * k), seed: at)), "WRITE at \(at) KiB")
        }
        expectSuccess(try roundTrip(raw, Cmd.trim, cookie: 2, offset: 160 * k, length: 64 * k), "TRIM")
        let chunks = try roundTrip(raw, Cmd.blockStatus, cookie: 3, offset: 0, length: 1 << 20)
        #expect(chunks.count == 1 && chunks[0].done)
        let (context, list) = extents(chunks[0])
        #expect(context == id)
        let expected: [(UInt64, UInt64)] = [(64, 0), (64, 3), (32, 0), (64, 3), (32, 0), (256, 3), (64, 0), (448, 3)].map { ($0.0 * k, $0.1) }
        #expect(list.map { "\($0.0 / k)K:\($0.1)" } == expected.map { "\($0.0 / k)K:\($0.1)" })
        // REQ_ONE: one descriptor, no longer than asked.
        let one = try roundTrip(raw, Cmd.blockStatus, flags: Flag.reqOne, cookie: 4, offset: 256 * k, length: 100 * k)
        #expect(extents(one[0]).1.map { "\($0.0 / k)K:\($0.1)" } == ["100K:3"])
        // libnbd (compact headers, 32-bit BLOCK_STATUS) sees the same map.
        let c = try s.client { try $0.addMetaContext("base:allocation") }
        let compact = try c.blockStatus(count: 1 << 20, offset: 0)["base:allocation"] ?? []
        #expect(compact.map { "\(UInt64($0.0) / k)K:\($0.1)" } == expected.map { "\($0.0 / k)K:\($0.1)" })
    }

    /// 64-bit effect lengths on a 24 GiB sparse volume: TRIM and WRITE_ZEROES over more than
    /// 4 GiB, block status over a range longer than 32 bits can say, reads over the maximum.
    @Test func sixtyFourBitLengthsOnALargeSparseVolume() throws {
        let gib: UInt64 = 1 << 30
        let s = try TestServer(size: 96 << 20, volumeSize: 24 * gib)
        let (raw, session) = try connect(s)
        #expect(session.size == 24 * gib)
        let spots: [UInt64] = [1 << 20, 5 * gib, 9 * gib + 4096, 10 * gib, 13 * gib, 16 * gib + 8192, 17 * gib]
        for (i, at) in spots.enumerated() {
            expectSuccess(try roundTrip(raw, Cmd.write, flags: Flag.payloadLen, cookie: UInt64(i), offset: at, length: 65536,
                                        payload: pattern(65536, seed: at)), "WRITE at \(at)")
        }
        // TRIM [4 GiB, 10 GiB): 6 GiB, a length compact headers cannot carry.
        expectSuccess(try roundTrip(raw, Cmd.trim, cookie: 20, offset: 4 * gib, length: 6 * gib), "6 GiB TRIM")
        // WRITE_ZEROES [12 GiB, 17 GiB): 5 GiB.
        expectSuccess(try roundTrip(raw, Cmd.writeZeroes, cookie: 21, offset: 12 * gib, length: 5 * gib), "5 GiB WRITE_ZEROES")
        expectSuccess(try roundTrip(raw, Cmd.cache, cookie: 22, offset: 0, length: 24 * gib), "24 GiB CACHE")
        let zero = [UInt8](repeating: 0, count: 65536)
        let c = try s.client()
        for at in spots {
            let survives = at < 4 * gib || (at >= 10 * gib && at < 12 * gib) || at >= 17 * gib
            let want = survives ? pattern(65536, seed: at) : zero
            #expect(try read(raw, cookie: 30, offset: at, count: 65536).data == want, "extended read at \(at)")
            #expect(try c.pread(count: 65536, offset: at) == want, "libnbd read at \(at)")
        }
        // Block status over [0, 20 GiB): single descriptors longer than 4 GiB.
        let chunks = try roundTrip(raw, Cmd.blockStatus, cookie: 40, offset: 0, length: 20 * gib)
        let list = extents(chunks[0]).1
        let m: UInt64 = 1 << 20
        let expected: [(UInt64, UInt64)] = [
            (m, 3), (65536, 0), (10 * gib - m - 65536, 3), (65536, 0), (7 * gib - 65536, 3), (65536, 0), (3 * gib - 65536, 3),
        ]
        #expect(list.map { "\($0.0):\($0.1)" } == expected.map { "\($0.0):\($0.1)" })
        #expect(list.contains { $0.0 > UInt64(UInt32.max) }, "a descriptor only a 64-bit length can carry")
        let one = try roundTrip(raw, Cmd.blockStatus, flags: Flag.reqOne, cookie: 41, offset: m + 65536, length: 8 * gib)
        #expect(extents(one[0]).1.map { "\($0.0):\($0.1)" } == ["\(8 * gib):3"], "REQ_ONE clipped to a 64-bit request length")
        // A read over the maximum payload (and over 32 bits): EOVERFLOW, nothing else.
        expectError(try roundTrip(raw, Cmd.read, cookie: 50, offset: 0, length: 5 * gib), Self.EOVERFLOW, "5 GiB READ")
        expectError(try roundTrip(raw, Cmd.trim, cookie: 51, offset: 20 * gib, length: 5 * gib), Self.EINVAL, "TRIM past the end")
        expectError(try roundTrip(raw, Cmd.writeZeroes, cookie: 52, offset: 20 * gib, length: 5 * gib), Self.ENOSPC, "ZERO past the end")
        expectError(try roundTrip(raw, Cmd.blockStatus, cookie: 53, offset: 20 * gib, length: 5 * gib), Self.EINVAL, "STATUS past the end")
    }

    @Test func badLengthsAreAnsweredAndTheStreamStaysInSync() throws {
        let s = try TestServer()
        let (raw, session) = try connect(s)
        let size = session.size
        // An extended DISC hidden in payloads: if a payload were parsed as requests, the
        // connection would end.
        let evil = RawClient.extendedRequest(type: Cmd.disc, cookie: 666, offset: 0, length: 0)
        expectError(try roundTrip(raw, Cmd.read, cookie: 1, offset: 0, length: UInt64(Self.maxPayload) + 1), Self.EOVERFLOW,
                    "READ over the maximum payload")
        // WRITE without PAYLOAD_LEN has no payload: EINVAL, the next header follows at once.
        expectError(try roundTrip(raw, Cmd.write, cookie: 2, offset: 0, length: 4096), Self.EINVAL, "WRITE without PAYLOAD_LEN")
        // PAYLOAD_LEN where no payload form exists: consumed, then EINVAL.
        expectError(try roundTrip(raw, Cmd.trim, flags: Flag.payloadLen, cookie: 3, offset: 0, length: UInt64(evil.count),
                                  payload: evil), Self.EINVAL, "TRIM with a payload")
        let statusPayload = RawClient.be(UInt64(4096)) + RawClient.be(UInt32(session.contexts["base:allocation"] ?? 0)) + evil
        expectError(try roundTrip(raw, Cmd.blockStatus, flags: Flag.payloadLen, cookie: 4, offset: 0, length: UInt64(statusPayload.count),
                                  payload: statusPayload), Self.EINVAL, "BLOCK_STATUS payload form (not advertised)")
        expectError(try roundTrip(raw, Cmd.write, flags: Flag.payloadLen, cookie: 5, offset: size - 2, length: UInt64(evil.count),
                                  payload: evil), Self.ENOSPC, "WRITE past the end")
        expectError(try roundTrip(raw, Cmd.trim, cookie: 6, offset: 4096, length: UInt64.max), Self.EINVAL, "TRIM length overflowing")
        expectError(try roundTrip(raw, Cmd.writeZeroes, cookie: 7, offset: 0, length: size + 4096), Self.ENOSPC, "ZERO past the end")
        expectError(try roundTrip(raw, Cmd.flush, cookie: 8, offset: 0, length: 1), Self.EINVAL, "FLUSH with a length")
        expectError(try roundTrip(raw, Cmd.blockStatus, cookie: 9, offset: 0, length: 0), Self.EINVAL, "zero-length BLOCK_STATUS")
        // Exactly the maximum payload is a write like any other.
        let big = pattern(Self.maxPayload, seed: 5)
        expectSuccess(try roundTrip(raw, Cmd.write, flags: Flag.payloadLen, cookie: 10, offset: 0, length: UInt64(big.count),
                                    payload: big), "WRITE of the maximum payload")
        #expect(try read(raw, cookie: 11, offset: UInt64(Self.maxPayload) - 4096, count: 4096).data == Array(big.suffix(4096)))
        // One byte more: the server hangs up (spec: SHOULD hard disconnect), replying nothing.
        try raw.send(RawClient.extendedRequest(type: Cmd.write, flags: Flag.payloadLen, cookie: 12, offset: 0,
                                               length: UInt64(Self.maxPayload) + 1) + [UInt8](repeating: 7, count: 65536))
        #expect(try raw.extendedChunk() == nil)
        // The data written before is intact.
        #expect(try s.client().pread(count: 4096, offset: 0) == Array(big.prefix(4096)))
    }

    @Test func headerStyleMismatchDisconnects() throws {
        let s = try TestServer()
        let bystander = try s.client()
        // Compact header after extended headers were negotiated.
        let (raw, _) = try connect(s)
        try raw.send(RawClient.request(type: Cmd.read, cookie: 1, offset: 0, length: 512) + [0, 0, 0, 0])
        #expect(try raw.extendedChunk() == nil)
        // Extended header without the negotiation.
        let plain = try RawClient(unix: s.socketPath)
        _ = try plain.greet()
        _ = try plain.go()
        try plain.send(RawClient.extendedRequest(type: Cmd.read, cookie: 2, offset: 0, length: 512))
        #expect(plain.isClosedByServer())
        try bystander.pwrite([5], offset: 77)
        #expect(try bystander.pread(count: 1, offset: 77) == [5])
    }

    /// A libnbd client keeps writing and reading while extended-header clients misbehave on
    /// other connections: it sees no error and no wrong byte.
    @Test func misbehavingExtendedClientsDoNotDisturbAConcurrentClient() throws {
        let s = try TestServer()
        // Used by the writer thread only, until it signals `done`.
        nonisolated(unsafe) let bystander = try s.client()
        let failures = Locked(0)
        let rounds = Locked(0)
        let stop = Locked(false)
        let done = DispatchSemaphore(value: 0)
        Thread {
            defer { done.signal() }
            var i: UInt64 = 0
            while !stop.withLock({ $0 }) || i < 20 {
                let data = pattern(16 << 10, seed: i)
                let at = (i % 64) << 16
                do {
                    try bystander.pwrite(data, offset: at)
                    if try bystander.pread(count: data.count, offset: at) != data { failures.withLock { $0 += 1 } }
                } catch {
                    failures.withLock { $0 += 1 }
                }
                i += 1
                rounds.withLock { $0 += 1 }
            }
        }.start()
        for round in 0..<5 {
            // Over-maximum payload: hung up on.
            let (a, _) = try connect(s)
            try a.send(RawClient.extendedRequest(type: Cmd.write, flags: Flag.payloadLen, cookie: 1, offset: 0, length: 1 << 40))
            #expect(try a.extendedChunk() == nil)
            // A compact header after extended headers: hung up on.
            let (b, _) = try connect(s)
            try b.send(RawClient.request(type: Cmd.write, cookie: 2, offset: 0, length: 4) + [1, 2, 3, 4])
            #expect(try b.extendedChunk() == nil)
            // A payload that never arrives, then the client goes away.
            let (c, _) = try connect(s)
            try c.send(RawClient.extendedRequest(type: Cmd.write, flags: Flag.payloadLen, cookie: 3, offset: 0, length: 1 << 20) + [9, 9])
            Socket_shutdownWrite(c)
            #expect(c.isClosedByServer())
            // Requests with errors and huge effect lengths, then garbage.
            let (d, _) = try connect(s)
            expectError(try roundTrip(d, Cmd.trim, cookie: 4, offset: 0, length: UInt64.max - UInt64(round)), Self.EINVAL, "huge TRIM")
            try d.send([UInt8](repeating: 0xFF, count: 64))
            #expect(try d.extendedChunk() == nil)
        }
        stop.withLock { $0 = true }
        done.wait()
        #expect(failures.withLock { $0 } == 0)
        #expect(rounds.withLock { $0 } >= 20)
    }
}
