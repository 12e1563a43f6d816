/// `pmem-nbd stats`: a running server's metrics, fetched from its `--metrics` endpoint and
/// summarised for a person (or passed through with `--raw`).
public enum StatsReport {
    public static func run(address: MetricsAddress, raw: Bool, json: Bool = false) throws -> String {
        let text = try MetricsClient.fetch(address)
        if raw { return text }
        let doc: PrometheusText.Document
        do { doc = try PrometheusText.parse(text) } catch { throw ServeError("the metrics endpoint \(address) sent malformed text: \(error)") }
        return json ? VolumeRequests.encode(jsonSummary(doc)) : summary(doc, source: address.description)
    }

    /// The same figures as `summary`, as one JSON object (`pmem-nbd stats --json`).
    public static func jsonSummary(_ doc: PrometheusText.Document) -> [String: Any] {
        func v(_ name: String, _ labels: [String: String] = [:]) -> UInt64 { UInt64(max(0, doc.value(name, labels) ?? 0)) }
        var requests: [String: UInt64] = [:]
        for s in doc.samples("pmem_nbd_requests_total") { requests[s.labels["command"] ?? "?"] = UInt64(s.value) }
        let count = v("pmem_nbd_request_duration_seconds_count")
        var out: [String: Any] = [
            "connections": ["open": v("pmem_nbd_open_connections"), "total": v("pmem_nbd_connections_total")],
            "requests": requests,
            "request_errors": doc.samples("pmem_nbd_request_errors_total").reduce(0) { $0 + UInt64($1.value) },
            "bytes": ["read": v("pmem_nbd_read_bytes_total"), "written": v("pmem_nbd_written_bytes_total"),
                      "trimmed": v("pmem_nbd_trimmed_bytes_total"), "zeroed": v("pmem_nbd_zeroed_bytes_total")],
            "latency": ["count": count,
                        "mean_seconds": count > 0 ? (doc.value("pmem_nbd_request_duration_seconds_sum") ?? 0) / Double(count) : 0],
            "pool": ["size_bytes": v("pmem_nbd_pool_size_bytes"), "used_bytes": v("pmem_nbd_pool_used_bytes"),
                     "free_bytes": v("pmem_nbd_pool_free_bytes"), "held_bytes": v("pmem_nbd_pool_held_bytes")],
            "volumes": v("pmem_nbd_volumes"), "snapshots": v("pmem_nbd_snapshots"),
            "cow_copies": ["map_node": v("pmem_nbd_cow_copies_total", ["kind": "map_node"]),
                           "partial_block": v("pmem_nbd_cow_copies_total", ["kind": "partial_block"])],
        ]
        if doc.types["pmem_nbd_feed_subscribers"] != nil {
            out["feed"] = ["subscribers": v("pmem_nbd_feed_subscribers"), "fenced": v("pmem_nbd_feed_fenced_subscribers"),
                           "read_leases": v("pmem_nbd_feed_leases", ["mode": "read"]), "write_leases": v("pmem_nbd_feed_leases", ["mode": "write"]),
                           "pinned_blocks": v("pmem_nbd_feed_pinned_blocks"), "events": v("pmem_nbd_feed_events_total")]
        }
        return out
    }

    /// The human-readable summary of a scrape.
    public static func summary(_ doc: PrometheusText.Document, source: String) -> String {
        func v(_ name: String, _ labels: [String: String] = [:]) -> UInt64 { UInt64(max(0, doc.value(name, labels) ?? 0)) }
        var lines: [String] = ["metrics from \(source)"]
        func row(_ title: String, _ text: String) { lines.append(title.padding(16) + text) }

        row("connections", "\(v("pmem_nbd_open_connections")) open, \(v("pmem_nbd_connections_total")) since start")
        let byCommand = doc.samples("pmem_nbd_requests_total").map { ($0.labels["command"] ?? "?", UInt64($0.value)) }
        let total = byCommand.reduce(0) { $0 + $1.1 }
        let errors = doc.samples("pmem_nbd_request_errors_total").reduce(0) { $0 + UInt64($1.value) }
        let busy = byCommand.filter { $0.1 > 0 }.map { "\($0.0) \($0.1)" }
        row("requests", "\(total)" + (busy.isEmpty ? "" : " (" + busy.joined(separator: ", ") + ")") + ", \(errors) answered with an error")
        row("data", "\(formatBytes(v("pmem_nbd_read_bytes_total"))) read, \(formatBytes(v("pmem_nbd_written_bytes_total"))) written, "
            + "\(formatBytes(v("pmem_nbd_trimmed_bytes_total"))) trimmed, \(formatBytes(v("pmem_nbd_zeroed_bytes_total"))) zeroed")
        let count = v("pmem_nbd_request_duration_seconds_count")
        if count > 0 {
            let mean = (doc.value("pmem_nbd_request_duration_seconds_sum") ?? 0) / Double(count)
            let buckets = doc.samples("pmem_nbd_request_duration_seconds_bucket").compactMap { s -> (Double, Double)? in
                guard let le = s.labels["le"].flatMap(PrometheusText.parseValue) else { return nil }
                return (le, s.value)
            }.sorted { $0.0 < $1.0 }
            func quantile(_ q: Double) -> String {
                let target = q * Double(count)
                guard let b = buckets.first(where: { $0.1 >= target }) else { return "?" }
                return b.0.isInfinite ? "> \(duration(buckets.dropLast().last?.0 ?? 0))" : "≤ \(duration(b.0))"
            }
            row("latency", "mean \(duration(mean)), p50 \(quantile(0.5)), p99 \(quantile(0.99)) (over \(count) requests)")
        } else {
            row("latency", "no requests timed yet")
        }
        let size = v("pmem_nbd_pool_size_bytes"), used = v("pmem_nbd_pool_used_bytes"), free = v("pmem_nbd_pool_free_bytes")
        row("pool", "\(formatBytes(size)): \(formatBytes(used)) used, \(formatBytes(free)) free"
            + (v("pmem_nbd_pool_held_bytes") > 0 ? ", \(formatBytes(v("pmem_nbd_pool_held_bytes"))) waiting to be freed" : ""))
        let volumes = v("pmem_nbd_volumes"), snapshots = v("pmem_nbd_snapshots")
        row("volumes", "\(volumes) volume\(volumes == 1 ? "" : "s"), \(snapshots) snapshot\(snapshots == 1 ? "" : "s")")
        row("copy-on-write", "\(v("pmem_nbd_cow_copies_total", ["kind": "map_node"])) map nodes and "
            + "\(v("pmem_nbd_cow_copies_total", ["kind": "partial_block"])) partial blocks copied")
        if doc.types["pmem_nbd_feed_subscribers"] != nil {
            let r = v("pmem_nbd_feed_leases", ["mode": "read"]), w = v("pmem_nbd_feed_leases", ["mode": "write"])
            let subscribers = v("pmem_nbd_feed_subscribers")
            row("feed", "\(subscribers) subscriber\(subscribers == 1 ? "" : "s") (\(v("pmem_nbd_feed_fenced_subscribers")) fenced), "
                + "\(r) read and \(w) write leases, \(v("pmem_nbd_feed_pinned_blocks")) pinned blocks, \(v("pmem_nbd_feed_events_total")) events")
        } else {
            row("feed", "off")
        }
        return lines.joined(separator: "\n")
    }

    static func duration(_ seconds: Double) -> String {
        if seconds >= 1 { return String(format1: seconds) + " s" }
        if seconds >= 1e-3 { return String(format1: seconds * 1e3) + " ms" }
        return String(format1: seconds * 1e6) + " µs"
    }
}

extension String {
    fileprivate func padding(_ width: Int) -> String { count >= width ? self + " " : self + String(repeating: " ", count: width - count) }
}
