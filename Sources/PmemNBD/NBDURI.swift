import PmemSystem

/// NBD URIs (the NBD URI specification, as nbdkit's `--print-uri` writes them) for clients of
/// the server's listening sockets.
public enum NBDURI {
    /// One URI per distinct listening address, in the order of the sockets:
    /// `nbd://localhost:PORT/EXPORT` for TCP, `nbd+unix:///EXPORT?socket=PATH` for Unix;
    /// `nbds` and `nbds+unix` when `tls` (the server requires TLS).
    public static func uris(for sockets: [FileDescriptor], exportName: String, tls: Bool = false) -> [String] {
        var out: [String] = []
        for s in sockets {
            guard let a = Socket.localAddress(s), let u = uri(for: a, exportName: exportName, tls: tls), !out.contains(u) else { continue }
            out.append(u)
        }
        return out
    }

    /// The URI of one address; nil for an unnamed Unix socket.
    public static func uri(for address: Socket.LocalAddress, exportName: String, tls: Bool = false) -> String? {
        let export = "/" + percentEncode(exportName, keeping: pathCharacters)
        let scheme = tls ? "nbds" : "nbd"
        switch address {
        case .unix(let path):
            guard !path.isEmpty else { return nil }
            return "\(scheme)+unix://\(export)?socket=\(percentEncode(path, keeping: queryCharacters))"
        case .inet(let host, let port):
            return "\(scheme)://\(uriHost(host)):\(port)\(export)"
        }
    }

    /// `localhost` for loopback and wildcard addresses (as nbdkit prints), else the numeric host
    /// (IPv6 in brackets).
    static func uriHost(_ host: String) -> String {
        if host.hasPrefix("127.") || host == "::1" || host == "0.0.0.0" || host == "::" || host.hasPrefix("::ffff:127.") { return "localhost" }
        if host.contains(":") { return "[" + percentEncode(host, keeping: unreserved + ":") + "]" }
        return host
    }

    static let unreserved = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~"
    /// RFC 3986 pchar: '/' is encoded, so an export name stays one path segment; '@' (in
    /// snapshot names) is kept.
    static let pathCharacters = unreserved + "!$&'()*+,;=:@"
    /// Query characters, less '&', '=' and '+', which separate or mean space in query parameters.
    static let queryCharacters = unreserved + "!$'()*,;:@/"

    static func percentEncode(_ s: String, keeping allowed: String) -> String {
        let keep = Set(allowed.utf8)
        var out = ""
        for b in s.utf8 {
            if keep.contains(b) {
                out.unicodeScalars.append(Unicode.Scalar(b))
            } else {
                let hex = Array("0123456789ABCDEF".utf8)
                out += "%" + String(decoding: [hex[Int(b >> 4)], hex[Int(b & 15)]], as: UTF8.self)
            }
        }
        return out
    }
}
