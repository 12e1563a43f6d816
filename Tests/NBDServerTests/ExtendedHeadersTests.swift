import Foundation
import Glibc
import PmemSystem
@testable import TestSupport
import Testing

/// NBD extended headers end to end over raw sockets (Debian's libnbd 1.14 cannot speak them):
/// negotiation orderings, every command with 32-byte requests and extended replies, 64-bit
/// lengths on a large sparse volume, bad lengths, and libnbd with compact headers on other
/// connections of the same server as the independent reader and bystander.
@Suite(.timeLimit(.minutes(5))) struct ExtendedHeadersTests: ExtendedHeaderChecks {
    typealias Chunk = RawClient.ExtendedChunk

    /// A raw client in transmission with extended headers.
    func connect(_ s: RAMServer, contexts: [String] = ["base:allocation"], structuredFirst: Bool = false) throws -> (RawClient, RawClient.ExtendedSession) {
        try connect(s.socketPath, contexts: contexts, structuredFirst: structuredFirst)
    }

    // MARK: negotiation

    @Test func negotiationOrderingsOverTheWire() throws {
        let s = try RAMServer()
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
        let s = try RAMServer()
        let (raw, session) = try connect(s, structuredFirst: true)
        #expect(session.size == s.volume.size)
        expectSuccess(try roundTrip(raw, Cmd.cache, cookie: 2, offset: 4096, length: 4096), "CACHE")
    }

    @Test func exportNameAfterExtendedHeadersEndsTheSession() throws {
        let s = try RAMServer()
        let raw = try RawClient(unix: s.socketPath)
        _ = try raw.greet()
        try raw.send(RawClient.option(11, []))
        #expect(try raw.optionReply()?.type == 1)
        try raw.send(RawClient.option(1, []))
        #expect(raw.isClosedByServer())
    }

    @Test func refusedExtendedHeadersLeaveCompactTransmission() throws {
        let s = try RAMServer()
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
        let s = try RAMServer()
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
        let s = try RAMServer()
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

    @Test func badLengthsAreAnsweredAndTheStreamStaysInSync() throws {
        let s = try RAMServer()
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
        let s = try RAMServer()
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
}
