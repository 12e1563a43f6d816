import CGnuTLS
import Glibc

/// What a server authenticates with, loaded once at start: an X.509 certificate and key from
/// a directory in the layout nbdkit and qemu use, and/or pre-shared keys from a psktool file.
/// Immutable once made; shared by every TLS session (GnuTLS credentials are thread-safe).
public final class TLSCredentials: @unchecked Sendable {
    /// The certificate directory's file names.
    public static let caCertificate = "ca-cert.pem"
    public static let caRevocationList = "ca-crl.pem"
    public static let serverCertificate = "server-cert.pem"
    public static let serverKey = "server-key.pem"

    /// `gnutls_certificate_credentials_t`, with X.509.
    let certificates: gnutls_certificate_credentials_t?
    /// `gnutls_psk_server_credentials_t`, with PSK.
    let psk: gnutls_psk_server_credentials_t?
    /// The PSK file's keys (looked up by the GnuTLS PSK callback).
    let pskKeys: [String: [UInt8]]
    /// `gnutls_priority_t`: GnuTLS's NORMAL set, plus the PSK key exchanges with PSK.
    let priority: gnutls_priority_t?
    /// Require a client certificate signed by ca-cert.pem.
    public let verifiesPeer: Bool
    /// What was loaded, for the log: "X.509 (DIR)", "PSK (FILE, 2 users)".
    public let summary: String

    /// Loads the credentials. `certificateDirectory` must hold server-cert.pem and
    /// server-key.pem (and ca-cert.pem with `verifyPeer`; ca-crl.pem is used when present).
    public init(certificateDirectory: String?, pskFile: String?, verifyPeer: Bool) throws(TLSError) {
        guard certificateDirectory != nil || pskFile != nil else {
            throw TLSError("TLS needs a certificate directory or a PSK file")
        }
        if verifyPeer && certificateDirectory == nil {
            throw TLSError("verifying client certificates needs a certificate directory with \(Self.caCertificate)")
        }
        var parts: [String] = []
        var certificates: gnutls_certificate_credentials_t?
        var psk: gnutls_psk_server_credentials_t?
        var keys: [String: [UInt8]] = [:]
        var priority: gnutls_priority_t?
        do throws(TLSError) {
            if let dir = certificateDirectory {
                certificates = try Self.loadCertificates(dir, verifyPeer: verifyPeer)
                parts.append("X.509 (\(dir)\(verifyPeer ? ", client certificates required" : ""))")
            }
            if let file = pskFile {
                keys = try Self.readPSKFile(file).keys
                var p: gnutls_psk_server_credentials_t?
                let r = gnutls_psk_allocate_server_credentials(&p)
                guard r == GNUTLS_E_SUCCESS else { throw TLSError.gnutls("cannot allocate PSK credentials", r) }
                psk = p
                gnutls_psk_set_server_credentials_function(p, pskLookup)
                _ = gnutls_psk_set_server_known_dh_params(p, GNUTLS_SEC_PARAM_MEDIUM)
                parts.append("PSK (\(file), \(keys.count) user\(keys.count == 1 ? "" : "s"))")
            }
            let text = pskFile == nil ? "NORMAL" : "NORMAL:+ECDHE-PSK:+DHE-PSK:+PSK"
            let r = gnutls_priority_init(&priority, text, nil)
            guard r == GNUTLS_E_SUCCESS else { throw TLSError.gnutls("GnuTLS priority \(text)", r) }
        } catch {
            if let certificates { gnutls_certificate_free_credentials(certificates) }
            if let psk { gnutls_psk_free_server_credentials(psk) }
            throw error
        }
        self.certificates = certificates
        self.psk = psk
        self.pskKeys = keys
        self.priority = priority
        self.verifiesPeer = verifyPeer
        self.summary = parts.joined(separator: " and ")
    }

    deinit {
        if let priority { gnutls_priority_deinit(priority) }
        if let certificates { gnutls_certificate_free_credentials(certificates) }
        if let psk { gnutls_psk_free_server_credentials(psk) }
    }

    /// `gnutls_certificate_allocate_credentials`, `gnutls_certificate_set_x509_key_file2`,
    /// `..._trust_file` and `..._crl_file`.
    private static func loadCertificates(_ dir: String, verifyPeer: Bool) throws(TLSError) -> gnutls_certificate_credentials_t? {
        let cert = dir + "/" + serverCertificate
        let key = dir + "/" + serverKey
        let ca = dir + "/" + caCertificate
        let layout = "the directory needs \(serverCertificate) and \(serverKey), plus \(caCertificate) to verify clients, as for nbdkit and qemu; certtool(1) makes them"
        try checkReadable(cert, hint: layout)
        try checkReadable(key, hint: layout)
        if verifyPeer { try checkReadable(ca, hint: "client certificates are verified against it") }
        var creds: gnutls_certificate_credentials_t?
        let r = gnutls_certificate_allocate_credentials(&creds)
        guard r == GNUTLS_E_SUCCESS else { throw TLSError.gnutls("cannot allocate certificate credentials", r) }
        do throws(TLSError) {
            let k = gnutls_certificate_set_x509_key_file2(creds, cert, key, GNUTLS_X509_FMT_PEM, nil, 0)
            if k < 0 {
                throw TLSError.gnutls("cannot load \(cert) with \(key) (both must be PEM, the key unencrypted and matching the certificate)", k)
            }
            if verifyPeer {
                let n = gnutls_certificate_set_x509_trust_file(creds, ca, GNUTLS_X509_FMT_PEM)
                if n < 0 { throw TLSError.gnutls("cannot load \(ca)", n) }
                if n == 0 { throw TLSError("\(ca) holds no certificate") }
                let crl = dir + "/" + caRevocationList
                if access(crl, F_OK) == 0 {
                    let c = gnutls_certificate_set_x509_crl_file(creds, crl, GNUTLS_X509_FMT_PEM)
                    if c < 0 { throw TLSError.gnutls("cannot load \(crl)", c) }
                }
            }
            _ = gnutls_certificate_set_known_dh_params(creds, GNUTLS_SEC_PARAM_MEDIUM)
        } catch {
            gnutls_certificate_free_credentials(creds)
            throw error
        }
        return creds
    }

    private static func readPSKFile(_ path: String) throws(TLSError) -> PSKFile {
        try checkReadable(path, hint: "a PSK file has username:hexkey lines; create one with: psktool -u USER -p \(path)")
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { throw TLSError("cannot read \(path): \(String(cString: strerror(errno)))") }
        defer { close(fd) }
        var bytes: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 4096)
        while true {
            let n = chunk.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
            if n < 0 && errno == EINTR { continue }
            guard n >= 0 else { throw TLSError("cannot read \(path): \(String(cString: strerror(errno)))") }
            if n == 0 { break }
            bytes += chunk[..<n]
            guard bytes.count <= 1 << 20 else { throw TLSError("\(path) is larger than 1 MiB: not a PSK file") }
        }
        return try PSKFile(text: String(decoding: bytes, as: UTF8.self), path: path)
    }

    /// A clear error for a missing or unreadable file (`access(2)`), before GnuTLS's vaguer one.
    private static func checkReadable(_ path: String, hint: String) throws(TLSError) {
        if access(path, R_OK) != 0 {
            throw TLSError("cannot read \(path): \(String(cString: strerror(errno))) (\(hint))")
        }
    }
}

/// The GnuTLS PSK callback (`gnutls_psk_set_server_credentials_function`): the key of the
/// username the client named, copied into `gnutls_malloc` memory; -1 for an unknown user.
/// The session's pointer (`gnutls_session_set_ptr`) is its TLSCredentials.
private let pskLookup: @convention(c) (gnutls_session_t?, UnsafePointer<CChar>?, UnsafeMutablePointer<gnutls_datum_t>?) -> Int32 = { session, username, key in
    guard let session, let username, let key, let owner = gnutls_session_get_ptr(session) else { return -1 }
    let credentials = Unmanaged<TLSCredentials>.fromOpaque(owner).takeUnretainedValue()
    guard let bytes = credentials.pskKeys[String(cString: username)] else { return -1 }
    guard let data = cgnutls_malloc(bytes.count) else { return -1 }
    bytes.withUnsafeBytes { data.copyMemory(from: $0.baseAddress!, byteCount: bytes.count) }
    key.pointee.data = data.assumingMemoryBound(to: UInt8.self)
    key.pointee.size = UInt32(bytes.count)
    return 0
}
