import Glibc
import PmemSystem

/// The metrics endpoint: a minimal HTTP/1.1 responder on its own thread answering
/// `GET /metrics` (and HEAD) with the Prometheus text format; every other path is 404, every
/// other method 405. One request per connection (`Connection: close`), handled in turn on the
/// accept thread with 5-second socket timeouts: scrapes are rare and small, and nothing here
/// touches the NBD connections' threads.
public final class MetricsServer: @unchecked Sendable {
    public let address: MetricsAddress
    let sockets: [FileDescriptor]
    private let render: @Sendable () -> String
    private var loop: AcceptLoop!

    /// Largest request head read before answering 431.
    static let maxRequestHead = 16 * 1024

    public init(address: MetricsAddress, render: @escaping @Sendable () -> String) throws {
        self.address = address
        self.render = render
        do { sockets = try address.listen() } catch {
            throw ServeError("cannot listen for metrics on \(address): \(error == .exists ? "another server answers there" : error.description)")
        }
        do {
            loop = try AcceptLoop(sockets: sockets, name: "pmem-metrics", label: "metrics endpoint") { [unowned self] client in
                Socket.setTimeouts(client, seconds: 5)
                serve(client)
                client.close()
            }
        } catch {
            for s in sockets { s.close() }
            throw error
        }
    }

    /// Ports the TCP sockets are bound to (useful with port 0).
    public var boundPorts: [UInt16] { sockets.compactMap { Socket.boundPort($0) } }

    public func start() { loop.start() }

    public func stop() {
        loop.stop(timeoutSeconds: 10)
        if case .unix(let path) = address { unlink(path) }
    }

    private func serve(_ fd: FileDescriptor) {
        var head: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 4096)
        let terminator: [UInt8] = Array("\r\n\r\n".utf8)
        while head.firstRange(of: terminator) == nil {
            guard head.count < Self.maxRequestHead else { return respond(fd, status: "431 Request Header Fields Too Large", body: "request too large\n") }
            guard let n = try? chunk.withUnsafeMutableBytes({ try fd.read(into: $0) }), n > 0 else { return }
            head += chunk[0..<n]
        }
        let requestLine = String(decoding: head.prefix { $0 != 13 && $0 != 10 }, as: UTF8.self)
        let parts = requestLine.split(separator: " ", omittingEmptySubsequences: false)
        guard parts.count == 3, parts[2].hasPrefix("HTTP/1.") else { return respond(fd, status: "400 Bad Request", body: "bad request\n") }
        let method = parts[0]
        let path = parts[1].split(separator: "?", maxSplits: 1, omittingEmptySubsequences: false).first ?? ""
        guard method == "GET" || method == "HEAD" else {
            return respond(fd, status: "405 Method Not Allowed", body: "only GET and HEAD\n", extra: "Allow: GET, HEAD\r\n")
        }
        guard path == "/metrics" else { return respond(fd, status: "404 Not Found", body: "metrics are at /metrics\n", headOnly: method == "HEAD") }
        respond(fd, status: "200 OK", body: render(), contentType: "text/plain; version=0.0.4; charset=utf-8", headOnly: method == "HEAD")
    }

    private func respond(_ fd: FileDescriptor, status: String, body: String, contentType: String = "text/plain; charset=utf-8",
                         extra: String = "", headOnly: Bool = false) {
        let bodyBytes = Array(body.utf8)
        var out = Array("HTTP/1.1 \(status)\r\nContent-Type: \(contentType)\r\nContent-Length: \(bodyBytes.count)\r\n\(extra)Connection: close\r\n\r\n".utf8)
        if !headOnly { out += bodyBytes }
        try? fd.writeAll(bytes: out)
    }
}

/// Fetches a metrics endpoint's text (`GET /metrics`): what `pmem-nbd stats` reads.
public enum MetricsClient {
    public static func fetch(_ address: MetricsAddress, path: String = "/metrics") throws -> String {
        let fd: FileDescriptor
        do { fd = try address.connect() } catch { throw ServeError("cannot connect to the metrics endpoint \(address): \(error)") }
        defer { fd.close() }
        Socket.setTimeouts(fd, seconds: 10)
        let host: String
        if case .tcp(let h, let p) = address { host = h.contains(":") ? "[\(h)]:\(p)" : "\(h):\(p)" } else { host = "localhost" }
        do {
            try fd.writeAll(bytes: Array("GET \(path) HTTP/1.1\r\nHost: \(host)\r\nAccept: text/plain\r\nConnection: close\r\n\r\n".utf8))
            var response: [UInt8] = []
            var chunk = [UInt8](repeating: 0, count: 65536)
            while true {
                let n = try chunk.withUnsafeMutableBytes { (b) throws(Errno) in try fd.read(into: b) }
                if n == 0 { break }
                response += chunk[0..<n]
            }
            guard let split = response.firstRange(of: Array("\r\n\r\n".utf8)) else { throw ServeError("the metrics endpoint \(address) sent no HTTP response") }
            let head = String(decoding: response[..<split.lowerBound], as: UTF8.self)
            let body = String(decoding: response[split.upperBound...], as: UTF8.self)
            let status = head.split(separator: "\r\n").first.map(String.init) ?? ""
            guard status.hasPrefix("HTTP/1.1 200") || status.hasPrefix("HTTP/1.0 200") else {
                throw ServeError("the metrics endpoint \(address) answered \(status)")
            }
            return body
        } catch let e as Errno {
            throw ServeError("reading from the metrics endpoint \(address): \(e)")
        }
    }
}
