import CGnuTLS

/// A TLS set-up or handshake failure, with a sentence for people.
public struct TLSError: Error, CustomStringConvertible, Sendable {
    public var description: String
    /// The GnuTLS error code, when GnuTLS reported it (negative), else 0.
    public var code: Int32

    public init(_ description: String, code: Int32 = 0) {
        self.description = description
        self.code = code
    }

    /// `what: <gnutls_strerror(code)>`.
    static func gnutls(_ what: String, _ code: Int32) -> TLSError {
        TLSError("\(what): \(gnutlsMessage(code))", code: code)
    }
}

/// `gnutls_strerror`: GnuTLS's text for an error code.
func gnutlsMessage(_ code: Int32) -> String {
    gnutls_strerror(code).map { String(cString: $0) } ?? "GnuTLS error \(code)"
}
