import FeedWire
import Foundation
import Glibc
import NBDServer
import PmemFeedClient
import PmemNBD
import PmemPool
import PmemSystem
@testable import TestSupport
import Testing

/// `serve --metrics`: the Prometheus endpoint, what it counts, and `pmem-nbd stats`.
@Suite(.timeLimit(.minutes(5))) struct MetricsTests {
    func scrape(_ address: MetricsAddress) throws -> (text: String, doc: PrometheusText.Document) {
        let text = try MetricsClient.fetch(address)
        return (text, try PrometheusText.parse(text))
    }

    /// Checks the text format line by line with regular expressions (independently of the
    /// parser `stats` uses): HELP/TYPE comments, `name{label="value",…} value` samples, every
    /// sample after its family's TYPE line, each family's samples together.
    func checkExpositionFormat(_ text: String) {
        let name = "[a-zA-Z_:][a-zA-Z0-9_:]*"
        let label = #"[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\[\\"n])*""#
        let value = #"(?:[-+]?[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?|\+Inf|-Inf|NaN)"#
        let comment = try! NSRegularExpression(pattern: "^# (HELP|TYPE) (\(name))( .*)?$")
        let sample = try! NSRegularExpression(pattern: "^(\(name))(\\{\(label)(,\(label))*\\})? \(value)$")
        var typed: [String: String] = [:]
        var finished: Set<String> = []
        var current: String?
        #expect(text.hasSuffix("\n"))
        for line in text.split(separator: "\n").map(String.init) {
            let range = NSRange(line.startIndex..., in: line)
            if let m = comment.firstMatch(in: line, range: range) {
                let family = (line as NSString).substring(with: m.range(at: 2))
                if (line as NSString).substring(with: m.range(at: 1)) == "TYPE" {
                    let type = (line as NSString).substring(with: m.range(at: 3)).trimmingCharacters(in: .whitespaces)
                    #expect(["counter", "gauge", "histogram"].contains(type), "\(line)")
                    #expect(typed[family] == nil, "second TYPE: \(line)")
                    typed[family] = type
                }
                continue
            }
            guard let m = sample.firstMatch(in: line, range: range) else {
                Issue.record("not a sample or comment: \(line)")
                continue
            }
            var family = (line as NSString).substring(with: m.range(at: 1))
            for suffix in ["_bucket", "_sum", "_count"] where family.hasSuffix(suffix) && typed[String(family.dropLast(suffix.count))] == "histogram" {
                family = String(family.dropLast(suffix.count))
            }
            #expect(typed[family] != nil, "sample before its TYPE: \(line)")
            if typed[family] == "counter" { #expect(family.hasSuffix("_total"), "\(family)") }
            if current != family {
                if let current { finished.insert(current) }
                #expect(!finished.contains(family), "samples of \(family) are split")
                current = family
            }
        }
    }

    func value(_ doc: PrometheusText.Document, _ name: String, _ labels: [String: String] = [:]) -> UInt64 {
        guard let v = doc.value(name, labels) else {
            Issue.record("no sample \(name)\(labels)")
            return 0
        }
        return UInt64(v)
    }

    @Test func scrapeCountsWhatClientsDid() throws {
        let d = ScratchDirectory()
        let pool = d.file("p.pool"), sock = d.file("s.sock"), metricsPath = d.file("metrics.sock")
        let server = try ServerProcess(["serve", pool, "--create", "64M", "-U", sock, "--metrics", "unix:" + metricsPath])
        defer { _ = server.stop() }
        #expect(server.waitForSocket(metricsPath), "\(server.stderrText)")
        let address = MetricsAddress.unix(metricsPath)
        let (firstText, before) = try scrape(address)
        checkExpositionFormat(firstText)
        for command in ["read", "write", "flush", "trim", "write_zeroes", "block_status", "cache", "disc"] {
            #expect(value(before, "pmem_nbd_requests_total", ["command": command]) == 0)
        }
        #expect(value(before, "pmem_nbd_request_duration_seconds_count") == 0)
        #expect(value(before, "pmem_nbd_snapshots") == 0)
        #expect(value(before, "pmem_nbd_volumes") == 1)
        // serve --create 64M makes a 64 MiB export in a pool sized for its slack.
        let poolSize = try PoolEngine.poolSize(holding: 64 << 20)
        #expect(value(before, "pmem_nbd_pool_size_bytes") == poolSize)
        #expect(before.samples("pmem_nbd_export_requests_total").isEmpty, "no export has had a connection")

        // Strict mode off, so the read past the end reaches the server (which answers EINVAL).
        let c = try connectWhenReady(sock) { try $0.setStrictMode(0) }
        let size = try c.size
        for i in 0..<3 { try c.pwrite(pattern(4096, seed: UInt64(i)), offset: UInt64(i) * 4096) }
        try c.pwrite(pattern(512, seed: 9), offset: 1024)   // part of a written block: its old contents are copied
        _ = try c.pread(count: 8192, offset: 0)
        _ = try c.pread(count: 8192, offset: 4096)
        #expect(throws: LibNBDError.self) { _ = try c.pread(count: 4096, offset: size) }
        try c.flush()
        try c.trim(count: 8192, offset: 1 << 20)
        try c.zero(count: 4096, offset: 2 << 20, flags: LibNBDFlags.noHole)

        let (text, after) = try scrape(address)
        checkExpositionFormat(text)
        #expect(value(after, "pmem_nbd_requests_total", ["command": "write"]) == 4)
        #expect(value(after, "pmem_nbd_requests_total", ["command": "read"]) == 3)
        #expect(value(after, "pmem_nbd_requests_total", ["command": "flush"]) == 1)
        #expect(value(after, "pmem_nbd_requests_total", ["command": "trim"]) == 1)
        #expect(value(after, "pmem_nbd_requests_total", ["command": "write_zeroes"]) == 1)
        #expect(value(after, "pmem_nbd_request_errors_total", ["command": "read"]) == 1)
        #expect(value(after, "pmem_nbd_request_errors_total", ["command": "write"]) == 0)
        #expect(value(after, "pmem_nbd_read_bytes_total") == 16384)
        #expect(value(after, "pmem_nbd_written_bytes_total") == 3 * 4096 + 512)
        #expect(value(after, "pmem_nbd_trimmed_bytes_total") == 8192)
        #expect(value(after, "pmem_nbd_zeroed_bytes_total") == 4096)
        #expect(value(after, "pmem_nbd_cow_copies_total", ["kind": "partial_block"]) == 1)
        #expect(value(after, "pmem_nbd_open_connections") == 1)

        // The histogram: cumulative buckets ending in +Inf = count = every request so far.
        let buckets = after.samples("pmem_nbd_request_duration_seconds_bucket")
        #expect(buckets.count == RequestMetrics.latencyBoundsNanoseconds.count + 1)
        #expect(zip(buckets, buckets.dropFirst()).allSatisfy { $0.value <= $1.value }, "cumulative")
        #expect(buckets.last?.labels["le"] == "+Inf")
        let count = value(after, "pmem_nbd_request_duration_seconds_count")
        #expect(count == 10)
        #expect(UInt64(buckets.last?.value ?? 0) == count)
        let sum = after.value("pmem_nbd_request_duration_seconds_sum") ?? 0
        #expect(sum > 0 && sum < 60)

        // Pool space moved the right way.
        let used = value(after, "pmem_nbd_pool_used_bytes"), free = value(after, "pmem_nbd_pool_free_bytes")
        #expect(used > value(before, "pmem_nbd_pool_used_bytes"))
        #expect(used + free <= poolSize)

        // The same counts by export (the one connection used pmem0).
        #expect(value(after, "pmem_nbd_export_requests_total", ["export": "pmem0", "command": "write"]) == 4)
        #expect(value(after, "pmem_nbd_export_requests_total", ["export": "pmem0", "command": "read"]) == 3)
        #expect(value(after, "pmem_nbd_export_request_errors_total", ["export": "pmem0", "command": "read"]) == 1)
        #expect(value(after, "pmem_nbd_export_written_bytes_total", ["export": "pmem0"]) == 3 * 4096 + 512)
        #expect(value(after, "pmem_nbd_export_read_bytes_total", ["export": "pmem0"]) == 16384)
        #expect(value(after, "pmem_nbd_export_trimmed_bytes_total", ["export": "pmem0"]) == 8192)
        #expect(value(after, "pmem_nbd_export_zeroed_bytes_total", ["export": "pmem0"]) == 4096)

        // A snapshot, then a write into what it shares: the shared map node is copied.
        let snap = try run([pmemNBDBinary, "snapshot", "create", "--pool", pool, "pmem0@s1"])
        #expect(snap.status == 0, "\(snap.stderr)")
        try c.pwrite(pattern(4096, seed: 20), offset: 0)
        let (_, snapped) = try scrape(address)
        #expect(value(snapped, "pmem_nbd_snapshots") == 1)
        #expect(value(snapped, "pmem_nbd_cow_copies_total", ["kind": "map_node"]) >= 1)
        #expect(value(snapped, "pmem_nbd_requests_total", ["command": "write"]) == 5)

        // A feed subscriber holding a read lease.
        #expect(value(snapped, "pmem_nbd_feed_subscribers") == 0)
        let probe = try FeedProbe(pool + ".feed")
        try probe.c.listVolumes()
        let volumes = try FeedConnection.decodeVolumes(try probe.reply(.volumes))
        let volume = try #require(volumes.first { $0.name == "pmem0" })
        _ = try probe.lease(.read, volume: volume.id, first: 0, count: 16)
        let (_, leased) = try scrape(address)
        #expect(value(leased, "pmem_nbd_feed_subscribers") == 1)
        #expect(value(leased, "pmem_nbd_feed_leases", ["mode": "read"]) == 1)
        #expect(value(leased, "pmem_nbd_feed_leases", ["mode": "write"]) == 0)

        // A connection's counts outlive it; DISC is counted too.
        try c.shutdown()
        var ended = leased
        for _ in 0..<100 {
            ended = try scrape(address).doc
            if value(ended, "pmem_nbd_open_connections") == 0 { break }
            usleep(20_000)
        }
        #expect(value(ended, "pmem_nbd_open_connections") == 0)
        #expect(value(ended, "pmem_nbd_requests_total", ["command": "write"]) == 5)
        #expect(value(ended, "pmem_nbd_requests_total", ["command": "disc"]) == 1)
        #expect(value(ended, "pmem_nbd_connections_total") >= 1)
        // Per export too, and a second export counts apart.
        #expect(value(ended, "pmem_nbd_export_requests_total", ["export": "pmem0", "command": "write"]) == 5)
        #expect(value(ended, "pmem_nbd_export_requests_total", ["export": "pmem0", "command": "disc"]) == 1)
        let snapClient = try connectWhenReady(sock) { try $0.setExportName("pmem0@s1") }
        _ = try snapClient.pread(count: 4096, offset: 0)
        let (perExportText, perExport) = try scrape(address)
        checkExpositionFormat(perExportText)
        #expect(value(perExport, "pmem_nbd_export_read_bytes_total", ["export": "pmem0@s1"]) == 4096)
        #expect(value(perExport, "pmem_nbd_export_read_bytes_total", ["export": "pmem0"]) == 16384)
        #expect(value(perExport, "pmem_nbd_read_bytes_total") == 16384 + 4096)
        try snapClient.shutdown()

        // `pmem-nbd stats` says the same for a person.
        let stats = try run([pmemNBDBinary, "stats", "--metrics", "unix:" + metricsPath])
        #expect(stats.status == 0, "\(stats.stderr)")
        #expect(stats.stdout.contains("write 5"), "\(stats.stdout)")
        #expect(stats.stdout.contains("20 KiB read"), "\(stats.stdout)")   // 16 KiB by pmem0, 4 KiB by pmem0@s1
        #expect(stats.stdout.contains("1 volume, 1 snapshot"), "\(stats.stdout)")
        #expect(stats.stdout.contains("1 subscriber"), "\(stats.stdout)")
        let js = try run([pmemNBDBinary, "stats", "--metrics", "unix:" + metricsPath, "--json"])
        let summary = try JSONSerialization.jsonObject(with: Data(js.stdout.utf8)) as? [String: Any]
        #expect((summary?["requests"] as? [String: Any])?["write"] as? Int == 5, "\(js.stdout)")
        #expect((summary?["bytes"] as? [String: Any])?["read"] as? Int == 20 << 10)
        #expect(summary?["volumes"] as? Int == 1 && summary?["snapshots"] as? Int == 1)
        #expect((summary?["feed"] as? [String: Any])?["subscribers"] as? Int == 1)
        let raw = try run([pmemNBDBinary, "stats", "--metrics", "unix:" + metricsPath, "--raw"])
        #expect(raw.stdout.hasPrefix("# HELP pmem_nbd_requests_total"))

        // An independent parser, where installed (Debian's python3-prometheus-client).
        if FileManager.default.fileExists(atPath: "/usr/lib/python3/dist-packages/prometheus_client") {
            let script = """
            import sys
            from prometheus_client.parser import text_string_to_metric_families
            fams = {f.name: f for f in text_string_to_metric_families(sys.stdin.read())}
            w = [s.value for s in fams["pmem_nbd_requests"].samples if s.labels.get("command") == "write"]
            print(len(fams), int(w[0]), fams["pmem_nbd_request_duration_seconds"].type)
            """
            let py = try run(["/usr/bin/python3", "-c", script], stdin: Data(raw.stdout.utf8))
            #expect(py.status == 0, "\(py.stderr)")
            #expect(py.stdout.hasSuffix(" 5 histogram\n"), "\(py.stdout)")
        }
    }

    @Test func httpEndpointOverTCPAnswersOnlyGetAndHeadOfMetrics() throws {
        let d = ScratchDirectory()
        let pool = d.file("p.pool"), sock = d.file("s.sock")
        // A free port: bound, noted, released.
        let probe = try Socket.listenTCP(host: "127.0.0.1", port: 0)
        let port = try #require(Socket.boundPort(probe[0]))
        for s in probe { s.close() }
        let server = try ServerProcess(["serve", pool, "--create", "32M", "-U", sock, "--metrics", "127.0.0.1:\(port)", "--feed", "none"])
        defer { _ = server.stop() }
        #expect(server.waitForSocket(sock))
        var text: String?
        for _ in 0..<200 where text == nil {
            text = try? MetricsClient.fetch(.tcp(host: "127.0.0.1", port: port))
            if text == nil { usleep(20_000) }
        }
        let body = try #require(text, "\(server.stderrText)")
        checkExpositionFormat(body)
        // Without the feed there are no feed metrics.
        #expect(!body.contains("pmem_nbd_feed_"))

        func exchange(_ request: String) throws -> String {
            let fd = try Socket.connectTCP(host: "127.0.0.1", port: port)
            defer { fd.close() }
            try fd.writeAll(bytes: Array(request.utf8))
            var out: [UInt8] = []
            var chunk = [UInt8](repeating: 0, count: 65536)
            while true {
                let n = chunk.withUnsafeMutableBytes { read(fd.rawValue, $0.baseAddress, $0.count) }
                if n <= 0 { break }
                out += chunk[0..<n]
            }
            return String(decoding: out, as: UTF8.self)
        }
        let get = try exchange("GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        #expect(get.hasPrefix("HTTP/1.1 200 OK\r\n"))
        #expect(get.contains("Content-Type: text/plain; version=0.0.4"))
        let headEnd = try #require(get.range(of: "\r\n\r\n"))
        let length = get[..<headEnd.lowerBound].split(separator: "\r\n").first { $0.hasPrefix("Content-Length: ") }
            .flatMap { Int($0.dropFirst("Content-Length: ".count)) }
        #expect(length == get[headEnd.upperBound...].utf8.count)
        let head = try exchange("HEAD /metrics?x=1 HTTP/1.1\r\n\r\n")
        #expect(head.hasPrefix("HTTP/1.1 200 OK\r\n") && head.hasSuffix("\r\n\r\n"))
        #expect(try exchange("GET / HTTP/1.1\r\n\r\n").hasPrefix("HTTP/1.1 404 "))
        let post = try exchange("POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n")
        #expect(post.hasPrefix("HTTP/1.1 405 ") && post.contains("Allow: GET, HEAD"))
        #expect(try exchange("nonsense\r\n\r\n").hasPrefix("HTTP/1.1 400 "))
        // A client that never finishes its request does not block the next scrape for long.
        let stalled = try Socket.connectTCP(host: "127.0.0.1", port: port)
        defer { stalled.close() }
        try stalled.writeAll(bytes: Array("GET /metr".utf8))
        let started = Date()
        #expect(try exchange("GET /metrics HTTP/1.0\r\n\r\n").hasPrefix("HTTP/1.1 200 OK"))
        #expect(Date().timeIntervalSince(started) < 8)

        let stats = try run([pmemNBDBinary, "stats", "--metrics", "127.0.0.1:\(port)"])
        #expect(stats.status == 0 && stats.stdout.contains("feed            off"), "\(stats.stdout)\(stats.stderr)")
        let wrong = try run([pmemNBDBinary, "stats", "--metrics", "unix:" + d.file("nothing.sock")])
        #expect(wrong.status == 1 && wrong.stderr.contains("cannot connect"))
    }

    @Test func addressesAndTheTextFormat() throws {
        #expect(MetricsAddress("unix:/run/m.sock") == .unix("/run/m.sock"))
        #expect(MetricsAddress("0.0.0.0:9100") == .tcp(host: "0.0.0.0", port: 9100))
        #expect(MetricsAddress(":9100") == .tcp(host: "127.0.0.1", port: 9100))
        #expect(MetricsAddress("9100") == .tcp(host: "127.0.0.1", port: 9100))
        #expect(MetricsAddress("[::1]:9100") == .tcp(host: "::1", port: 9100))
        #expect(MetricsAddress("localhost:x") == nil && MetricsAddress("unix:") == nil && MetricsAddress("[::1]9100") == nil)

        var t = PrometheusText()
        t.family("a_total", "counter", "help with \\ and\nnewline")
        t.sample("a_total", [("k", "v\"q\\\n")], UInt64(3))
        let doc = try PrometheusText.parse(t.text)
        #expect(doc.value("a_total", ["k": "v\"q\\\n"]) == 3)
        #expect(doc.types["a_total"] == "counter")
        #expect(PrometheusText.seconds(nanoseconds: 2_000) == "0.000002")
        #expect(PrometheusText.seconds(nanoseconds: 1_500_000_000) == "1.5")
        for bad in ["1x 3", "a{k=\"v} 1", "a{k=v} 1", "a 1 2 3", "a notanumber", "# TYPE a sometype", "a{k=\"\\q\"} 1"] {
            #expect(throws: PrometheusText.ParseError.self, "\(bad)") { try PrometheusText.parse(bad + "\n") }
        }
    }
}
