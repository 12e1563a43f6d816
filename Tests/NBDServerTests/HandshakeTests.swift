import CLibNBD
import Foundation
@testable import TestSupport
import Testing

/// Handshake variants, driven by libnbd, against a RAM volume.
@Suite(.timeLimit(.minutes(5))) struct HandshakeTests {
    @Test func simpleRepliesWhenStructuredIsNotRequested() throws {
        let s = try RAMServer()
        let c = try s.client { try $0.requestStructuredReplies(false) }
        #expect(try !c.structuredReplies)
        #expect(try !c.canDF)
        let data = pattern(10_000, seed: 1)
        try c.pwrite(data, offset: 12_345)
        #expect(try c.pread(count: 10_000, offset: 12_345) == data)
        #expect(try c.pread(count: 4096, offset: 1 << 20) == [UInt8](repeating: 0, count: 4096))
    }

    @Test func oldNewstyleExportNameWithZeroes() throws {
        let s = try RAMServer()
        // No handshake flags: libnbd falls back to NBD_OPT_EXPORT_NAME and expects 124 zero bytes.
        let c = try s.client { try $0.setHandshakeFlags(0) }
        #expect(c.protocolName == "newstyle")
        let data = pattern(4096, seed: 2)
        try c.pwrite(data, offset: 0)
        #expect(try c.pread(count: 4096, offset: 0) == data)
        // Fixed newstyle without NO_ZEROES.
        let d = try s.client { try $0.setHandshakeFlags(LibNBDFlags.fixedNewstyle) }
        #expect(try d.pread(count: 4096, offset: 0) == data)
    }

    @Test func optionModeThenGo() throws {
        let s = try RAMServer()
        let c = try NBDClient()
        try c.setOptMode(true)
        try c.connect(unix: s.socketPath)
        _ = try c.optList()
        try c.setExportName("ram")
        try c.optGo()
        try c.pwrite([1, 2, 3], offset: 7)
        #expect(try c.pread(count: 3, offset: 7) == [1, 2, 3])
    }

    @Test func unknownExportIsRefused() throws {
        let s = try RAMServer()
        let c = try NBDClient()
        try c.setExportName("no-such-export")
        #expect(throws: LibNBDError.self) { try c.connect(unix: s.socketPath) }
        // The default export ("") and the real name both work.
        let d = try s.client { try $0.setExportName("") }
        #expect(try d.size == s.volume.size)
        let e = try s.client { try $0.setExportName("ram") }
        #expect(try e.size == s.volume.size)
    }
}
