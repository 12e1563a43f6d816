import Foundation
import Glibc
@testable import TestSupport
import Testing

/// Malformed input whose handling reaches the pool: a WRITE whose payload stops arriving fails
/// inside the pool's write (the bytes are read straight into it), and the connection alone
/// pays. (The rest of the malformed input is NBDServerTests.MalformedInputTests, against a RAM
/// volume.)
@Suite(.timeLimit(.minutes(5))) struct PoolMalformedInputTests {
    /// A libnbd client connected before the abuse must still work after it.
    func bystanderStillWorks(_ s: TestServer, _ bystander: NBDClient) throws {
        try bystander.pwrite([0x42], offset: 99)
        #expect(try bystander.pread(count: 1, offset: 99) == [0x42])
        let fresh = try s.client()
        #expect(try fresh.pread(count: 1, offset: 99) == [0x42])
    }

    @Test func payloadThatNeverArrivesOnlyAffectsItsConnection() throws {
        let s = try TestServer()
        let bystander = try s.client()
        let raw = try RawClient(unix: s.socketPath)
        _ = try raw.greet()
        _ = try raw.go()
        try raw.send(RawClient.request(type: 1, cookie: 1, offset: 0, length: 1 << 20) + [1, 2, 3])
        try bystanderStillWorks(s, bystander)
        Socket_shutdownWrite(raw)
        #expect(raw.isClosedByServer())
        try bystanderStillWorks(s, bystander)
    }
}
