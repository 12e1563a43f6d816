import Glibc
import PmemSystem

/// Where the metrics endpoint listens: `unix:PATH`, `HOST:PORT`, `[IPV6]:PORT`, or `:PORT` /
/// `PORT` (127.0.0.1).
public enum MetricsAddress: Equatable, Sendable, CustomStringConvertible {
    case unix(String)
    case tcp(host: String, port: UInt16)

    /// The address `pmem-nbd stats` asks when given none.
    public static let defaultText = "127.0.0.1:10810"

    public init?(_ text: String) {
        if text.hasPrefix("unix:") {
            let path = String(text.dropFirst(5))
            guard !path.isEmpty else { return nil }
            self = .unix(path)
            return
        }
        var host = "127.0.0.1"
        var portText = Substring(text)
        if text.hasPrefix("[") {
            guard let close = text.firstIndex(of: "]"), text[text.index(after: close)...].hasPrefix(":") else { return nil }
            host = String(text[text.index(after: text.startIndex)..<close])
            portText = text[text.index(close, offsetBy: 2)...]
        } else if let colon = text.lastIndex(of: ":") {
            if colon != text.startIndex { host = String(text[..<colon]) }
            portText = text[text.index(after: colon)...]
        }
        guard let port = UInt16(portText), !host.isEmpty else { return nil }
        self = .tcp(host: host, port: port)
    }

    public var description: String {
        switch self {
        case .unix(let path): "unix:\(path)"
        case .tcp(let host, let port): host.contains(":") ? "[\(host)]:\(port)" : "\(host):\(port)"
        }
    }

    /// Listening sockets for the endpoint.
    func listen() throws(Errno) -> [FileDescriptor] {
        switch self {
        case .unix(let path): [try Socket.listenUnix(path: path, backlog: 16)]
        case .tcp(let host, let port): try Socket.listenTCP(host: host, port: port, backlog: 16)
        }
    }

    /// A connection to the endpoint.
    func connect() throws(Errno) -> FileDescriptor {
        switch self {
        case .unix(let path): try Socket.connectUnix(path: path)
        case .tcp(let host, let port): try Socket.connectTCP(host: host, port: port)
        }
    }
}
