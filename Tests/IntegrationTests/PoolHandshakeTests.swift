import CLibNBD
import Foundation
@testable import TestSupport
import Testing

/// Handshake variants, driven by libnbd, that show what a pool exports: its volume's name and
/// description, its meta contexts, `--export-name`, a pool opened read-only. (The rest of the
/// handshake is in NBDServerTests.HandshakeTests, against a RAM volume.)
@Suite(.timeLimit(.minutes(5))) struct PoolHandshakeTests {
    @Test func defaultNegotiationAdvertisesEverything() throws {
        let s = try TestServer()
        let c = try s.client { c in
            try c.addMetaContext("base:allocation")
            try c.setFullInfo(true)
        }
        #expect(try c.size == s.volume.size)
        #expect(c.protocolName == "newstyle-fixed")
        #expect(try c.structuredReplies)
        #expect(try !c.isReadOnly)
        #expect(try c.canFlush && c.canFUA && c.canTrim && c.canZero && c.canFastZero)
        #expect(try c.canDF && c.canMultiConn && c.canCache)
        #expect(try c.canMetaContext("base:allocation"))
        #expect(try c.blockSize(Int32(LIBNBD_SIZE_MINIMUM)) == 1)
        #expect(try c.blockSize(Int32(LIBNBD_SIZE_PREFERRED)) == 4096)
        #expect(try c.blockSize(Int32(LIBNBD_SIZE_MAXIMUM)) == 32 << 20)
        #expect(try c.canonicalName == "vol0")
        #expect(try c.exportDescription.contains("vol0"))
    }

    @Test func optionModeListInfoAndAbort() throws {
        let s = try TestServer()
        let c = try NBDClient()
        try c.setOptMode(true)
        try c.connect(unix: s.socketPath)
        let exports = try c.optList()
        #expect(exports.map(\.name) == ["vol0"])
        #expect(exports[0].description.contains("vol0"))
        // Every context the export answers: allocation, and our sharing map (no snapshots yet,
        // so no dirty bitmaps).
        #expect(try c.optListMetaContexts() == ["base:allocation", "pmem-nbd:sharing"])
        try c.setExportName("missing")
        #expect(throws: LibNBDError.self) { try c.optInfo() }
        try c.setExportName("vol0")
        try c.optInfo()
        #expect(try c.size == s.volume.size)
        try c.optAbort()
        // A namespace query lists only the contexts in that namespace.
        let q = try NBDClient()
        try q.setOptMode(true)
        try q.connect(unix: s.socketPath)
        try q.addMetaContext("base:")
        #expect(try q.optListMetaContexts() == ["base:allocation"])
        try q.optAbort()
    }

    @Test func exportNameOverride() throws {
        let s = try TestServer(exportName: "disk")
        let c = try NBDClient()
        try c.setOptMode(true)
        try c.connect(unix: s.socketPath)
        #expect(try c.optList().map(\.name) == ["disk"])
        try c.setExportName("disk")
        try c.optGo()
        #expect(try c.size == s.volume.size)
    }

    @Test func readOnlyExport() throws {
        let s = try TestServer(readOnly: true)
        let c = try s.client { try $0.setStrictMode(0) }
        #expect(try c.isReadOnly)
        #expect(try !c.canTrim)
        #expect(try c.pread(count: 4096, offset: 0) == [UInt8](repeating: 0, count: 4096))
        do {
            try c.pwrite([1], offset: 0)
            Issue.record("write to a read-only export succeeded")
        } catch let e as LibNBDError {
            #expect(e.errno == EPERM)
        }
        do {
            try c.trim(count: 4096, offset: 0)
            Issue.record("trim on a read-only export succeeded")
        } catch let e as LibNBDError {
            #expect(e.errno == EPERM)
        }
    }
}
