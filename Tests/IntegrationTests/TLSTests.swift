import Foundation
import Glibc
import NBDTLS
import NBDWire
@testable import TestSupport
import Testing

/// TLS (STARTTLS with GnuTLS): X.509 and PSK through libnbd and nbdinfo, the require/on/off
/// policies seen by libnbd and by a raw client, client certificate verification, and bad
/// credentials. Certificates and keys are made by certtool and psktool (TestPKI).
@Suite(.timeLimit(.minutes(5))) struct TLSTests {
    let pki = TestPKI.shared

    func x509(verifyPeer: Bool = false) throws -> TLSCredentials {
        try pki.check()
        return try TLSCredentials(certificateDirectory: pki.serverDir, pskFile: nil, verifyPeer: verifyPeer)
    }

    func psk() throws -> TLSCredentials {
        try pki.check()
        return try TLSCredentials(certificateDirectory: nil, pskFile: pki.pskFile, verifyPeer: false)
    }

    /// A libnbd client that requires TLS and authenticates with the certificate directory `dir`.
    func certificateClient(_ s: TestServer, dir: String) throws -> NBDClient {
        try s.client { c in
            try c.setTLS(LibNBDTLS.require)
            try c.setTLSCertificates(dir)
        }
    }

    /// A libnbd client that requires TLS and authenticates as alice with the PSK file `file`.
    func pskClient(_ s: TestServer, file: String, user: String = "alice") throws -> NBDClient {
        try s.client { c in
            try c.setTLS(LibNBDTLS.require)
            try c.setTLSPSKFile(file)
            try c.setTLSUsername(user)
        }
    }

    // MARK: X.509

    @Test func x509ReadWriteThroughLibNBD() throws {
        let s = try TestServer(tls: (.require, try x509()))
        let c = try certificateClient(s, dir: pki.clientDir)
        #expect(try c.tlsNegotiated)
        #expect(try c.structuredReplies)
        // Small and large writes (large WRITE payloads are read straight into the pool, through
        // TLS too), FUA (offloaded: its reply comes from another thread), and a large read
        // (many records, data pointing into the pool).
        let small = pattern(1000, seed: 1)
        let large = pattern(3 << 20, seed: 2)
        try c.pwrite(small, offset: 4_000)
        try c.pwrite(large, offset: 1 << 20, flags: LibNBDFlags.fua)
        try c.flush()
        #expect(try c.pread(count: small.count, offset: 4_000) == small)
        #expect(try c.pread(count: large.count, offset: 1 << 20) == large)
        // Simple replies too, and a second connection sees the same bytes.
        let d = try s.client { c in
            try c.setTLS(LibNBDTLS.require)
            try c.setTLSCertificates(pki.clientDir)
            try c.requestStructuredReplies(false)
        }
        #expect(try d.tlsNegotiated)
        #expect(try !d.structuredReplies)
        #expect(try d.pread(count: large.count, offset: 1 << 20) == large)
        try c.shutdown()
        try d.shutdown()
    }

    @Test func nbdinfoWithAnNbdsURIFromPrintURI() throws {
        try pki.check()
        let scratch = ScratchDirectory()
        let socket = scratch.file("s.sock")
        let p = try ServerProcess(["serve", scratch.file("pool"), "--create", "64M", "-U", socket, "--control", "none", "--feed", "none",
                                   "--tls", "require", "--tls-certificates", pki.serverDir, "--print-uri"], captureStdout: true)
        let uri = p.readLines(1).first ?? ""
        #expect(uri == "nbds+unix:///pmem0?socket=\(socket)", "stderr: \(p.stderrText)")
        let r = try run(["nbdinfo", uri + "&tls-certificates=" + pki.clientDir], timeout: 30)
        #expect(r.status == 0, "\(r.stderr)")
        #expect(r.stdout.contains("with TLS"), "\(r.stdout)")
        #expect(r.stdout.contains("export=\"pmem0\""))
        // The same server refuses nbdinfo without TLS.
        let plain = try run(["nbdinfo", "nbd+unix:///pmem0?socket=\(socket)"], timeout: 30)
        #expect(plain.status != 0)
        #expect(p.stop() == 0)
    }

    @Test func stdioServerWithTLS() throws {
        try pki.check()
        let scratch = ScratchDirectory()
        let c = try NBDClient()
        try c.setTLS(LibNBDTLS.require)
        try c.setTLSCertificates(pki.clientDir)
        // Separate input and output descriptors (stdin, stdout) under one TLS session.
        try c.connect(command: [pmemNBDBinary, "serve", scratch.file("pool"), "--create", "32M", "--stdio", "--control", "none",
                                "--feed", "none", "--tls", "require", "--tls-certificates", pki.serverDir])
        #expect(try c.tlsNegotiated)
        let data = pattern(200_000, seed: 3)
        try c.pwrite(data, offset: 8192)
        #expect(try c.pread(count: data.count, offset: 8192) == data)
        try c.shutdown()
    }

    // MARK: PSK

    @Test func pskWorksAndAWrongKeyIsRefused() throws {
        let s = try TestServer(tls: (.require, try psk()))
        let c = try pskClient(s, file: pki.pskFile)
        #expect(try c.tlsNegotiated)
        let data = pattern(300_000, seed: 4)
        try c.pwrite(data, offset: 0)
        // The same user with another key, and an unknown user: the handshake fails.
        #expect(throws: LibNBDError.self) { _ = try pskClient(s, file: pki.wrongPSKFile) }
        #expect(throws: LibNBDError.self) { _ = try pskClient(s, file: pki.pskFile, user: "mallory") }
        // Neither disturbed the connected client, and the right key still connects.
        #expect(try c.pread(count: data.count, offset: 0) == data)
        let d = try pskClient(s, file: pki.pskFile)
        #expect(try d.pread(count: data.count, offset: 0) == data)
        #expect(s.server.connectionCount == 2)
    }

    @Test func certificatesAndPSKTogether() throws {
        try pki.check()
        let both = try TLSCredentials(certificateDirectory: pki.serverDir, pskFile: pki.pskFile, verifyPeer: false)
        let s = try TestServer(tls: (.require, both))
        #expect(try certificateClient(s, dir: pki.clientDir).tlsNegotiated)
        #expect(try pskClient(s, file: pki.pskFile).tlsNegotiated)
        #expect(throws: LibNBDError.self) { _ = try pskClient(s, file: pki.wrongPSKFile) }
    }

    // MARK: policies

    @Test func plaintextClientRefusedWhenTLSIsRequired() throws {
        let s = try TestServer(tls: (.require, try x509()))
        do {
            _ = try s.client { try $0.setTLS(LibNBDTLS.disable) }
            Issue.record("a plaintext client was served although TLS is required")
        } catch let e as LibNBDError {
            #expect(e.message.lowercased().contains("tls"), "\(e)")
        }
        // Byte level: INFO, GO, LIST and STRUCTURED_REPLY get ERR_TLS_REQD ...
        let raw = try RawClient(unix: s.socketPath)
        _ = try raw.greet()
        let go = RawClient.be(UInt32(0)) + RawClient.be(UInt16(0))
        for (option, data) in [(UInt32(6), go), (7, go), (3, []), (8, [])] as [(UInt32, [UInt8])] {
            try raw.send(RawClient.option(option, data))
            let r = try raw.optionReply()
            #expect(r?.option == option)
            #expect(r?.type == OptionReplyType.errTLSRequired, "option \(option): reply \(String(r?.type ?? 0, radix: 16))")
        }
        // ... and EXPORT_NAME, which cannot be refused with an error, ends the connection.
        try raw.send(RawClient.option(1, Array("vol0".utf8)))
        #expect(raw.isClosedByServer())
        // ABORT is still acknowledged.
        let aborting = try RawClient(unix: s.socketPath)
        _ = try aborting.greet()
        try aborting.send(RawClient.option(2, []))
        #expect(try aborting.optionReply()?.type == OptionReplyType.ack)
        // A client without fixed newstyle could never start TLS: dropped at once.
        let old = try RawClient(unix: s.socketPath)
        _ = try old.greet(clientFlags: 0)
        #expect(old.isClosedByServer())
        // And TLS clients are served as before.
        #expect(try certificateClient(s, dir: pki.clientDir).tlsNegotiated)
    }

    @Test func plaintextAllowedWhenTLSIsOn() throws {
        let s = try TestServer(tls: (.on, try x509()))
        let plain = try s.client { try $0.setTLS(LibNBDTLS.disable) }
        #expect(try !plain.tlsNegotiated)
        try plain.pwrite([1, 2, 3], offset: 0)
        let secure = try certificateClient(s, dir: pki.clientDir)
        #expect(try secure.tlsNegotiated)
        #expect(try secure.pread(count: 3, offset: 0) == [1, 2, 3])
        // libnbd's "allow" upgrades when the server offers TLS.
        let allow = try s.client { c in
            try c.setTLS(LibNBDTLS.allow)
            try c.setTLSCertificates(pki.clientDir)
        }
        #expect(try allow.tlsNegotiated)
    }

    @Test func tlsOffRefusesStartTLSWithPolicy() throws {
        let s = try TestServer()
        // libnbd's "allow" falls back to plaintext on ERR_POLICY; "require" fails.
        let allow = try s.client { try $0.setTLS(LibNBDTLS.allow) }
        #expect(try !allow.tlsNegotiated)
        #expect(throws: LibNBDError.self) { _ = try s.client { try $0.setTLS(LibNBDTLS.require) } }
        let raw = try RawClient(unix: s.socketPath)
        _ = try raw.greet()
        try raw.send(RawClient.option(5, []))
        #expect(try raw.optionReply()?.type == OptionReplyType.errPolicy)
    }

    // MARK: client certificates

    @Test func verifyPeerRequiresACertificateFromTheCA() throws {
        let s = try TestServer(tls: (.require, try x509(verifyPeer: true)))
        let good = try certificateClient(s, dir: pki.clientDir)
        #expect(try good.tlsNegotiated)
        #expect(throws: LibNBDError.self) { _ = try certificateClient(s, dir: pki.anonymousClientDir) }
        #expect(throws: LibNBDError.self) { _ = try certificateClient(s, dir: pki.rogueClientDir) }
        try good.pwrite([7], offset: 0)
        #expect(try good.pread(count: 1, offset: 0) == [7])
        // Without --tls-verify-peer a client without a certificate is served.
        let open = try TestServer(tls: (.require, try x509()))
        #expect(try certificateClient(open, dir: pki.anonymousClientDir).tlsNegotiated)
    }

    // MARK: hostile or broken clients

    @Test func bytesBeforeTheHandshakeDropTheConnection() throws {
        let s = try TestServer(tls: (.require, try x509()))
        // STARTTLS with plaintext right behind it (one write): dropped before the ACK.
        let eager = try RawClient(unix: s.socketPath)
        _ = try eager.greet()
        try eager.send(RawClient.option(5, []) + RawClient.option(7, RawClient.be(UInt32(0)) + RawClient.be(UInt16(0))))
        #expect(eager.isClosedByServer())
        // ACK, then garbage instead of a ClientHello: the handshake fails and the server closes.
        let garbage = try RawClient(unix: s.socketPath)
        _ = try garbage.greet()
        try garbage.send(RawClient.option(5, []))
        #expect(try garbage.optionReply()?.type == OptionReplyType.ack)
        try garbage.send([UInt8](repeating: 0x41, count: 300))
        #expect(garbage.closesAfterDraining())
        #expect(try certificateClient(s, dir: pki.clientDir).tlsNegotiated)
    }

    @Test func aStalledHandshakeDoesNotBlockOthersAndTimesOut() throws {
        let s = try TestServer(tls: (.require, try x509()), handshakeTimeoutSeconds: 1)
        let stalled = try RawClient(unix: s.socketPath)
        _ = try stalled.greet()
        try stalled.send(RawClient.option(5, []))
        #expect(try stalled.optionReply()?.type == OptionReplyType.ack)
        let acknowledged = Date()
        // It never sends its ClientHello; others connect and work meanwhile.
        let c = try certificateClient(s, dir: pki.clientDir)
        try c.pwrite([9, 9], offset: 100)
        #expect(try c.pread(count: 2, offset: 100) == [9, 9])
        // The server gives up on it after the handshake timeout (1 s here), well before the
        // raw client's own 10 s read timeout.
        #expect(stalled.closesAfterDraining())
        #expect(Date().timeIntervalSince(acknowledged) < 8)
        #expect(try c.pread(count: 2, offset: 100) == [9, 9])
    }

    // MARK: credentials and options

    @Test func credentialErrorsSayWhatIsWrong() throws {
        try pki.check()
        let scratch = ScratchDirectory()
        func message(_ dir: String?, _ psk: String?, verify: Bool = false) -> String {
            do {
                _ = try TLSCredentials(certificateDirectory: dir, pskFile: psk, verifyPeer: verify)
                return "loaded"
            } catch {
                return error.description
            }
        }
        let missing = scratch.file("nothing")
        #expect(message(missing, nil).hasPrefix("cannot read \(missing)/server-cert.pem: No such file or directory"))
        // A key that does not belong to the certificate.
        let mixed = scratch.file("mixed")
        try FileManager.default.createDirectory(atPath: mixed, withIntermediateDirectories: true)
        try FileManager.default.copyItem(atPath: pki.serverDir + "/server-cert.pem", toPath: mixed + "/server-cert.pem")
        try FileManager.default.copyItem(atPath: pki.clientDir + "/client-key.pem", toPath: mixed + "/server-key.pem")
        let m = message(mixed, nil)
        #expect(m.contains("cannot load \(mixed)/server-cert.pem with \(mixed)/server-key.pem"), "\(m)")
        #expect(m.lowercased().contains("do not match"), "\(m)")
        // Client verification needs the CA.
        try FileManager.default.copyItem(atPath: pki.serverDir + "/server-key.pem", toPath: scratch.file("key"))
        let noCA = scratch.file("noca")
        try FileManager.default.createDirectory(atPath: noCA, withIntermediateDirectories: true)
        for f in ["server-cert.pem", "server-key.pem"] { try FileManager.default.copyItem(atPath: pki.serverDir + "/" + f, toPath: noCA + "/" + f) }
        #expect(message(noCA, nil) == "loaded")
        #expect(message(noCA, nil, verify: true).hasPrefix("cannot read \(noCA)/ca-cert.pem"))
        // PSK files.
        let bad = scratch.file("bad.psk")
        try "alice:00ff\nbob:xyz\n".write(toFile: bad, atomically: true, encoding: .utf8)
        #expect(message(nil, bad) == "\(bad) line 2: the key of 'bob' is not an even number of hexadecimal digits")
        let empty = scratch.file("empty.psk")
        try "".write(toFile: empty, atomically: true, encoding: .utf8)
        #expect(message(nil, empty).hasPrefix("\(empty) holds no keys"))
        #expect(message(nil, scratch.file("none.psk")).hasPrefix("cannot read \(scratch.file("none.psk")): No such file or directory"))
        #expect(message(nil, nil) != "loaded")
    }

    @Test func pskFileFormat() throws {
        let f = try PSKFile(text: "# keys\r\nalice:0aFF\r\n\nbob:00\n", path: "k")
        #expect(f.keys == ["alice": [0x0a, 0xff], "bob": [0]])
        #expect(throws: TLSError.self) { try PSKFile(text: "alice:0\n", path: "k") }
        #expect(throws: TLSError.self) { try PSKFile(text: "alice\n", path: "k") }
        #expect(throws: TLSError.self) { try PSKFile(text: ":00\n", path: "k") }
        #expect(throws: TLSError.self) { try PSKFile(text: "alice:00\nalice:01\n", path: "k") }
    }

    @Test func serveRefusesTLSOptionsThatCannotWork() throws {
        try pki.check()
        let scratch = ScratchDirectory()
        let pool = scratch.file("pool")
        let base = ["serve", pool, "--create", "16M", "-U", scratch.file("s.sock"), "--control", "none", "--feed", "none"]
        let cases: [([String], String)] = [
            (["--tls", "on"], "--tls on needs credentials"),
            (["--tls", "require"], "--tls require needs credentials"),
            (["--tls", "sometimes", "--tls-psk", pki.pskFile], "--tls must be off, on or require"),
            (["--tls-certificates", pki.serverDir], "--tls-certificates has no effect with --tls off"),
            (["--tls", "on", "--tls-psk", pki.pskFile, "--tls-verify-peer"], "--tls-verify-peer needs --tls-certificates"),
            (["--tls", "on", "--tls-certificates", scratch.file("missing")], "cannot read \(scratch.file("missing"))/server-cert.pem"),
        ]
        for (extra, expected) in cases {
            let r = try run([pmemNBDBinary] + base + extra, timeout: 30)
            #expect(r.status == 1, "\(extra)")
            #expect(r.stderr.contains(expected), "\(extra): \(r.stderr)")
        }
    }
}

extension RawClient {
    /// Reads whatever the server still sends (a TLS alert, say) until it closes: true at end
    /// of stream, false if the read timeout (10 s) passes first.
    func closesAfterDraining() -> Bool {
        var buffer = [UInt8](repeating: 0, count: 4096)
        while true {
            let r = Glibc.read(fd.rawValue, &buffer, buffer.count)
            if r == 0 { return true }
            if r < 0 {
                if errno == EINTR { continue }
                return errno == ECONNRESET
            }
        }
    }
}
