import CLibNBD
import Foundation
@testable import TestSupport
import Testing

/// Many requests in flight on one connection.
@Suite(.timeLimit(.minutes(5))) struct InFlightTests {
    @Test func libnbdWith128InFlight() throws {
        let s = try RAMServer()
        let c = try s.client()
        let blocks = 128
        let data = (0..<blocks).map { pattern(4096, seed: UInt64(100 + $0)) }
        var cookies: [Int64] = []
        for i in 0..<blocks {
            cookies.append(try data[i].withUnsafeBytes { try c.aioPwrite($0, offset: UInt64(i) * 8192 + 512) })
        }
        #expect(c.inFlight > 0)
        while c.inFlight > 0 { try c.poll() }
        for k in cookies { #expect(try c.completed(k)) }
        let buffers = (0..<blocks).map { _ in UnsafeMutableRawBufferPointer.allocate(byteCount: 4096, alignment: 8) }
        defer { buffers.forEach { $0.deallocate() } }
        cookies = try (0..<blocks).map { try c.aioPread(buffers[$0], offset: UInt64($0) * 8192 + 512) }
        while c.inFlight > 0 { try c.poll() }
        for i in 0..<blocks {
            #expect(try c.completed(cookies[i]))
            #expect(Array(buffers[i]) == data[i])
        }
    }

    @Test func pipelinedRequestsEchoEveryCookie() throws {
        let s = try RAMServer()
        let raw = try RawClient(unix: s.socketPath)
        _ = try raw.greet()
        _ = try raw.go()
        // 128 reads with arbitrary distinct cookies, sent in one write.
        var rng = SystemRandomNumberGenerator()
        let cookies = Set((0..<200).map { _ in UInt64.random(in: 1...UInt64.max, using: &rng) }).prefix(128)
        var bytes: [UInt8] = []
        for (i, k) in cookies.enumerated() {
            bytes += RawClient.request(type: 0, cookie: k, offset: UInt64(i) * 4096, length: 4096)
        }
        // Plus a flush and a write in the same burst.
        bytes += RawClient.request(type: 3, cookie: 1, offset: 0, length: 0)
        bytes += RawClient.request(type: 1, cookie: 2, offset: 0, length: 8) + [1, 2, 3, 4, 5, 6, 7, 8]
        try raw.send(bytes)
        var seen: [UInt64: Int] = [:]
        var done = Set<UInt64>()
        while done.count < cookies.count + 2 {
            guard let r = try raw.reply() else { Issue.record("connection closed"); return }
            #expect(r.error == 0)
            seen[r.cookie, default: 0] += 1
            switch r {
            case .simple: done.insert(r.cookie)
            case .chunk(let ch): if ch.flags & 1 != 0 { done.insert(r.cookie) }
            }
        }
        #expect(done == Set(cookies).union([1, 2]))
    }
}
