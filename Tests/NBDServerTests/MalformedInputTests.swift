import Foundation
import Glibc
@testable import TestSupport
import Testing

/// Hostile and malformed input over raw sockets: each gets the spec's answer or a
/// disconnect, the server never crashes, and other clients do not notice.
@Suite(.timeLimit(.minutes(5))) struct MalformedInputTests {
    /// A libnbd client connected before the abuse must still work after it.
    func bystanderStillWorks(_ s: RAMServer, _ bystander: NBDClient) throws {
        try bystander.pwrite([0x42], offset: 99)
        #expect(try bystander.pread(count: 1, offset: 99) == [0x42])
        let fresh = try s.client()
        #expect(try fresh.pread(count: 1, offset: 99) == [0x42])
    }

    @Test func badOptionMagicDisconnects() throws {
        let s = try RAMServer()
        let bystander = try s.client()
        let raw = try RawClient(unix: s.socketPath)
        _ = try raw.greet()
        try raw.send(RawClient.option(7, [0, 0, 0, 0, 0, 0], magic: 0x1122_3344_5566_7788))
        #expect(raw.isClosedByServer())
        try bystanderStillWorks(s, bystander)
    }

    @Test func unknownClientFlagsDisconnect() throws {
        let s = try RAMServer()
        let raw = try RawClient(unix: s.socketPath)
        _ = try raw.greet(clientFlags: 0x8000_0001)
        #expect(raw.isClosedByServer())
    }

    @Test func unknownOptionsAreUnsupportedAndNegotiationGoesOn() throws {
        let s = try RAMServer()
        let raw = try RawClient(unix: s.socketPath)
        _ = try raw.greet()
        for code: UInt32 in [0, 4, 12, 13, 0x7FFF_FFFF, 0xFFFF_FFFF] {
            try raw.send(RawClient.option(code, [1, 2, 3]))
            let r = try raw.optionReply()
            #expect(r?.type == 0x8000_0001, "option \(code)")
            #expect(r?.option == code)
        }
        try raw.send(RawClient.option(5, []))
        #expect(try raw.optionReply()?.type == 0x8000_0002, "STARTTLS: policy")
        #expect(try raw.go() == s.volume.size)
    }

    @Test func oversizedOptionsAreSkippedOrCut() throws {
        let s = try RAMServer()
        let raw = try RawClient(unix: s.socketPath)
        _ = try raw.greet()
        // 1 MiB of junk: skipped, answered with ERR_TOO_BIG, negotiation continues.
        try raw.send(RawClient.option(6, [UInt8](repeating: 7, count: 1 << 20)))
        #expect(try raw.optionReply()?.type == 0x8000_0009)
        // A 4 KiB+ export name.
        let long = [UInt8](repeating: 0x61, count: 5000)
        try raw.send(RawClient.option(6, RawClient.be(UInt32(long.count)) + long + RawClient.be(UInt16(0))))
        #expect(try raw.optionReply()?.type == 0x8000_0003)
        #expect(try raw.go() == s.volume.size)
        // A header claiming 1 GiB: treated as hostile, the connection is closed.
        let other = try RawClient(unix: s.socketPath)
        _ = try other.greet()
        try other.send(RawClient.be(UInt64(0x4948_4156_454F_5054)) + RawClient.be(UInt32(3)) + RawClient.be(UInt32(1 << 30)))
        #expect(other.isClosedByServer())
    }

    @Test func truncatedHandshakesAreHarmless() throws {
        let s = try RAMServer()
        let bystander = try s.client()
        for cut in [0, 2, 10, 20] {
            let raw = try RawClient(unix: s.socketPath)
            _ = try raw.receive(18)
            let msg = RawClient.be(UInt32(3)) + RawClient.option(7, RawClient.be(UInt32(0)) + RawClient.be(UInt16(0)))
            try raw.send(Array(msg.prefix(cut)))
            Socket_shutdownWrite(raw)
            _ = raw.isClosedByServer()
        }
        try bystanderStillWorks(s, bystander)
    }

    @Test func badRequestMagicDisconnects() throws {
        let s = try RAMServer()
        let bystander = try s.client()
        let raw = try RawClient(unix: s.socketPath)
        _ = try raw.greet()
        _ = try raw.go()
        try raw.send(RawClient.request(type: 0, cookie: 1, offset: 0, length: 512, magic: 0x2560_9514))
        #expect(raw.isClosedByServer())
        try bystanderStillWorks(s, bystander)
    }

    @Test func badRequestsGetErrorsAndTheStreamStaysInSync() throws {
        let s = try RAMServer(size: 112 << 20)
        let bystander = try s.client()
        let raw = try RawClient(unix: s.socketPath)
        _ = try raw.greet()
        let size = try raw.go()
        func expectError(_ bytes: [UInt8], cookie: UInt64, _ errno: UInt32, _ what: String) throws {
            try raw.send(bytes)
            guard let r = try raw.reply() else { Issue.record("\(what): connection closed"); return }
            #expect(r.cookie == cookie, "\(what)")
            #expect(r.error == errno, "\(what)")
        }
        try expectError(RawClient.request(type: 99, cookie: 10, offset: 0, length: 0), cookie: 10, 22, "unknown command")
        try expectError(RawClient.request(type: 0, flags: 0x40, cookie: 11, offset: 0, length: 512), cookie: 11, 22, "unknown flag")
        try expectError(RawClient.request(type: 0, cookie: 12, offset: size, length: 512), cookie: 12, 22, "read past the end")
        try expectError(RawClient.request(type: 4, cookie: 13, offset: size - 512, length: 1024), cookie: 13, 22, "trim past the end")
        try expectError(RawClient.request(type: 3, cookie: 14, offset: 4, length: 0), cookie: 14, 22, "flush with an offset")
        try expectError(RawClient.request(type: 7, cookie: 15, offset: 0, length: 4096), cookie: 15, 22, "block status without context")
        // This client did not ask for the block sizes: up to 64 MiB is accepted, one byte more is not.
        try expectError(RawClient.request(type: 0, cookie: 16, offset: 0, length: (64 << 20) + 1), cookie: 16, 75, "read over the maximum")
        // A write past the end carries its payload: it is consumed, never parsed as requests.
        let evil = RawClient.request(type: 0, cookie: 666, offset: 0, length: 4096)
        try expectError(RawClient.request(type: 1, cookie: 17, offset: size - 2, length: UInt32(evil.count)) + evil,
                        cookie: 17, 28, "write past the end")
        // An oversized write (over the 64 MiB maximum payload of a client that did not ask for
        // the block sizes) is consumed as well.
        let big = (64 << 20) + 28
        try raw.send(RawClient.request(type: 1, cookie: 18, offset: 0, length: UInt32(big)))
        var junk = [UInt8](repeating: 0, count: 1 << 20)
        for i in stride(from: 0, to: junk.count, by: 28) where i + 28 <= junk.count {
            junk.replaceSubrange(i..<(i + 28), with: RawClient.request(type: 2, cookie: 777, offset: 0, length: 0))
        }
        for _ in 0..<(big >> 20) { try raw.send(junk) }
        try raw.send(RawClient.request(type: 2, cookie: 777, offset: 0, length: 0))
        guard let r18 = try raw.reply() else { Issue.record("closed after oversized write"); return }
        #expect(r18.cookie == 18 && r18.error == 22)
        // Zero-length requests are answered, not fatal.
        try raw.send(RawClient.request(type: 0, cookie: 19, offset: 0, length: 0))
        #expect(try raw.reply()?.cookie == 19)
        try raw.send(RawClient.request(type: 1, cookie: 20, offset: 0, length: 0))
        #expect(try raw.reply().map { $0.cookie == 20 && $0.error == 0 } == true)
        // And the stream is still in sync: a real write and read.
        try raw.send(RawClient.request(type: 1, cookie: 21, offset: 4096, length: 4) + [9, 8, 7, 6])
        #expect(try raw.reply().map { $0.cookie == 21 && $0.error == 0 } == true)
        try raw.send(RawClient.request(type: 0, cookie: 22, offset: 4096, length: 4))
        guard case .chunk(let data) = try raw.reply() else { Issue.record("no data chunk"); return }
        #expect(data.cookie == 22 && Array(data.payload.suffix(4)) == [9, 8, 7, 6])
        try bystanderStillWorks(s, bystander)
    }

    @Test func simpleReplyErrorsWithoutStructuredReplies() throws {
        let s = try RAMServer()
        let raw = try RawClient(unix: s.socketPath)
        _ = try raw.greet()
        let size = try raw.go(structured: false)
        try raw.send(RawClient.request(type: 0, cookie: 5, offset: size, length: 16))
        guard case .simple(let r) = try raw.reply() else { Issue.record("expected a simple reply"); return }
        #expect(r.cookie == 5 && r.error == 22)
        try raw.send(RawClient.request(type: 0, flags: 4, cookie: 6, offset: 0, length: 16))
        guard case .simple(let df) = try raw.reply() else { Issue.record("expected a simple reply"); return }
        #expect(df.cookie == 6 && df.error == 22, "DF was not negotiated")
    }

    @Test func disconnectFinishesInFlightRequests() throws {
        let s = try RAMServer()
        let raw = try RawClient(unix: s.socketPath)
        _ = try raw.greet()
        _ = try raw.go()
        try raw.send(RawClient.request(type: 1, cookie: 1, offset: 0, length: 4) + [1, 2, 3, 4]
                     + RawClient.request(type: 3, cookie: 2, offset: 0, length: 0)
                     + RawClient.request(type: 2, cookie: 3, offset: 0, length: 0))
        var cookies = Set<UInt64>()
        while let r = try raw.reply() { cookies.insert(r.cookie) }
        #expect(cookies == [1, 2], "both replies before the close, none for DISC")
    }

    /// Thousands of options in one handshake: answered until the limit, then the client is cut off.
    @Test func optionFloodIsCutOff() throws {
        let s = try RAMServer()
        let bystander = try s.client()
        let raw = try RawClient(unix: s.socketPath)
        _ = try raw.greet()
        // Send LIST 5000 times without reading; the server answers each until the limit.
        let list = RawClient.option(3, [])
        var answered = 0
        let writer = Thread { for _ in 0..<5000 { guard (try? raw.send(list)) != nil else { return } } }
        writer.start()
        while let r = try raw.optionReply() {
            if r.type == 1 { answered += 1 }
        }
        #expect(answered > 0 && answered <= 4096, "\(answered) LIST options answered")
        #expect(raw.isClosedByServer())
        try bystanderStillWorks(s, bystander)
    }

    /// A client that sends requests but never reads the replies only stalls itself: once its
    /// socket buffer is full the server stops reading from it, others are served as usual, and
    /// closing it frees everything.
    @Test func clientThatNeverReadsRepliesOnlyStallsItself() throws {
        let s = try RAMServer()
        let bystander = try s.client()
        let raw = try RawClient(unix: s.socketPath)
        _ = try raw.greet()
        _ = try raw.go()
        var small = Int32(16 << 10)
        setsockopt(raw.fd.rawValue, SOL_SOCKET, SO_RCVBUF, &small, socklen_t(MemoryLayout<Int32>.size))
        // 2000 reads of 1 MiB = 2 GiB of replies nobody reads, sent from another thread (the
        // send blocks once the server stops reading).
        let sender = Thread {
            for i in 0..<2000 {
                guard (try? raw.send(RawClient.request(type: 0, cookie: UInt64(i), offset: 0, length: 1 << 20))) != nil else { return }
            }
        }
        sender.start()
        usleep(500_000)
        let t0 = Date()
        for i in 0..<50 { try bystanderStillWorks(s, bystander); _ = i }
        #expect(Date().timeIntervalSince(t0) < 10, "other clients are served while one does not read")
        Socket_shutdownWrite(raw)
        shutdown(raw.fd.rawValue, Int32(SHUT_RDWR))
        usleep(200_000)
        try bystanderStillWorks(s, bystander)
    }

    /// Hundreds of connections that connect and then say nothing (or half a handshake) do not
    /// keep anyone else out.
    @Test func manyHalfOpenConnectionsDoNotBlockOthers() throws {
        let s = try RAMServer()
        var idle: [RawClient] = []
        for i in 0..<300 {
            let raw = try RawClient(unix: s.socketPath)
            if i % 3 == 1 { _ = try raw.receive(18) }
            if i % 3 == 2 { _ = try raw.receive(18); try raw.send(RawClient.be(UInt32(3)) + [0x49, 0x48]) }
            idle.append(raw)
        }
        let c = try s.client()
        try c.pwrite([1, 2, 3], offset: 4096)
        #expect(try c.pread(count: 3, offset: 4096) == [1, 2, 3])
        idle.removeAll()
        usleep(200_000)
        let d = try s.client()
        #expect(try d.pread(count: 3, offset: 4096) == [1, 2, 3])
    }
}
