import Foundation
import Glibc
@testable import TestSupport

/// Certificates and pre-shared keys made with certtool and psktool (gnutls-bin), once per test
/// process, in the directory layout nbdkit, qemu and libnbd use.
final class TestPKI: @unchecked Sendable {
    static let shared = TestPKI()

    private let scratch = ScratchDirectory()
    /// ca-cert.pem, server-cert.pem (CN and DNS name localhost), server-key.pem.
    let serverDir: String
    /// ca-cert.pem and a client certificate signed by that CA (client-cert.pem, client-key.pem).
    let clientDir: String
    /// ca-cert.pem only: a client without a certificate.
    let anonymousClientDir: String
    /// ca-cert.pem, and a client certificate signed by another CA.
    let rogueClientDir: String
    /// psktool file with a key for alice, and one with another key for alice.
    let pskFile: String
    let wrongPSKFile: String
    /// Why making them failed, if it did (certtool or psktool missing or failing).
    private(set) var failure: String?

    private init() {
        let root = scratch.path
        serverDir = root + "/server"
        clientDir = root + "/client"
        anonymousClientDir = root + "/anonymous"
        rogueClientDir = root + "/rogue"
        pskFile = root + "/keys.psk"
        wrongPSKFile = root + "/wrong.psk"
        do { try make(root) } catch { failure = "\(error)" }
    }

    /// Fails the calling test when the fixture could not be made.
    func check() throws {
        if let failure { throw TestPKIError(description: failure) }
    }

    private func make(_ root: String) throws {
        for dir in [serverDir, clientDir, anonymousClientDir, rogueClientDir] {
            try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        }
        try makeCA(root + "/ca", name: "pmem-nbd test CA")
        try makeCA(root + "/rogue-ca", name: "someone else's CA")
        try issue(root + "/ca", key: serverDir + "/server-key.pem", cert: serverDir + "/server-cert.pem",
                  template: "cn = localhost\ndns_name = localhost\nip_address = 127.0.0.1\ntls_www_server\nsigning_key\nencryption_key\nexpiration_days = 2\n")
        let client = "cn = test client\ntls_www_client\nsigning_key\nencryption_key\nexpiration_days = 2\n"
        try issue(root + "/ca", key: clientDir + "/client-key.pem", cert: clientDir + "/client-cert.pem", template: client)
        try issue(root + "/rogue-ca", key: rogueClientDir + "/client-key.pem", cert: rogueClientDir + "/client-cert.pem", template: client)
        for dir in [serverDir, clientDir, anonymousClientDir, rogueClientDir] {
            try FileManager.default.copyItem(atPath: root + "/ca/ca-cert.pem", toPath: dir + "/ca-cert.pem")
        }
        try tool(["psktool", "-u", "alice", "-p", pskFile])
        try tool(["psktool", "-u", "alice", "-p", wrongPSKFile])
        let a = try String(contentsOfFile: pskFile, encoding: .utf8), b = try String(contentsOfFile: wrongPSKFile, encoding: .utf8)
        guard a.hasPrefix("alice:"), b.hasPrefix("alice:"), a != b else { throw TestPKIError(description: "psktool made the same key twice") }
    }

    private func makeCA(_ dir: String, name: String) throws {
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        try tool(["certtool", "--generate-privkey", "--key-type=ecdsa", "--outfile", dir + "/ca-key.pem"])
        guard FileManager.default.createFile(atPath: dir + "/ca.info", contents: Data("cn = \(name)\nca\ncert_signing_key\nexpiration_days = 2\n".utf8)) else {
            throw TestPKIError(description: "cannot write \(dir)/ca.info")
        }
        try tool(["certtool", "--generate-self-signed", "--load-privkey", dir + "/ca-key.pem", "--template", dir + "/ca.info",
                  "--outfile", dir + "/ca-cert.pem"])
    }

    private func issue(_ ca: String, key: String, cert: String, template: String) throws {
        let info = cert + ".info"
        guard FileManager.default.createFile(atPath: info, contents: Data(template.utf8)) else { throw TestPKIError(description: "cannot write \(info)") }
        try tool(["certtool", "--generate-privkey", "--key-type=ecdsa", "--outfile", key])
        try tool(["certtool", "--generate-certificate", "--load-ca-certificate", ca + "/ca-cert.pem", "--load-ca-privkey", ca + "/ca-key.pem",
                  "--load-privkey", key, "--template", info, "--outfile", cert])
    }

    private func tool(_ argv: [String]) throws {
        let r = try run(argv, timeout: 30)
        guard r.status == 0 else { throw TestPKIError(description: "\(argv.joined(separator: " ")): \(r.stderr)") }
    }
}

struct TestPKIError: Error, CustomStringConvertible {
    var description: String
}
