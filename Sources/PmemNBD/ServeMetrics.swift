import Glibc
import NBDServer
import PmemFeed
import PmemPool
import PmemSystem
import PmemVolumes

/// What `--metrics` exposes, gathered when scraped: the server's request counters (merged
/// from every connection), the pool's space, volumes and copy-on-write work, and the feed.
public final class ServeMetrics: @unchecked Sendable {
    let server: Server
    let pool: Pool
    let hub: FeedHub?
    let startTime: Double

    public init(server: Server, pool: Pool, hub: FeedHub?) {
        self.server = server
        self.pool = pool
        self.hub = hub
        var ts = timespec()
        clock_gettime(CLOCK_REALTIME, &ts)
        startTime = Double(ts.tv_sec) + Double(ts.tv_nsec) / 1e9
    }

    /// The exposition text.
    public func render() -> String {
        var t = PrometheusText()
        let m = server.requestMetrics()

        t.family("pmem_nbd_requests_total", "counter", "NBD requests received, by command (rejected ones included).")
        for slot in RequestMetrics.knownSlots + [RequestMetrics.commandSlots - 1] where slot < RequestMetrics.commandSlots - 1 || m.requests[slot] > 0 {
            t.sample("pmem_nbd_requests_total", [("command", RequestMetrics.commandName(slot: slot))], m.requests[slot])
        }
        t.family("pmem_nbd_request_errors_total", "counter", "NBD requests answered with an error, by command.")
        for slot in RequestMetrics.knownSlots + [RequestMetrics.commandSlots - 1] where slot < RequestMetrics.commandSlots - 1 || m.errors[slot] > 0 {
            t.sample("pmem_nbd_request_errors_total", [("command", RequestMetrics.commandName(slot: slot))], m.errors[slot])
        }
        let replication = ReplicationStatus.shared.all()
        if !replication.isEmpty {
            let now = ReplicationStatus.now()
            t.family("pmem_nbd_replication_runs_total", "counter", "pmem-nbd replicate runs reported, by volume and target.")
            for (v, e) in replication { t.sample("pmem_nbd_replication_runs_total", [("volume", v), ("target", e.target)], e.runs) }
            t.family("pmem_nbd_replication_failures_total", "counter", "pmem-nbd replicate runs that failed, by volume and target.")
            for (v, e) in replication { t.sample("pmem_nbd_replication_failures_total", [("volume", v), ("target", e.target)], e.failures) }
            t.family("pmem_nbd_replication_sent_bytes_total", "counter", "Bytes of RBD diff sent by successful replicate runs.")
            for (v, e) in replication { t.sample("pmem_nbd_replication_sent_bytes_total", [("volume", v), ("target", e.target)], e.bytesSent) }
            t.family("pmem_nbd_replication_last_success_timestamp_seconds", "gauge", "Unix time of the last successful replicate run.")
            for (v, e) in replication { if let s = e.lastSuccess { t.sample("pmem_nbd_replication_last_success_timestamp_seconds", [("volume", v), ("target", e.target)], s) } }
            t.family("pmem_nbd_replication_lag_seconds", "gauge", "Age of the newest snapshot the RBD image has (how far behind the replica is).")
            for (v, e) in replication { if let c = e.snapshotCreated { t.sample("pmem_nbd_replication_lag_seconds", [("volume", v), ("target", e.target)], max(0, now - c)) } }
        }
        t.family("pmem_nbd_read_bytes_total", "counter", "Bytes returned by successful READ requests.")
        t.sample("pmem_nbd_read_bytes_total", m.bytesRead)
        t.family("pmem_nbd_written_bytes_total", "counter", "Bytes stored by successful WRITE requests.")
        t.sample("pmem_nbd_written_bytes_total", m.bytesWritten)
        t.family("pmem_nbd_trimmed_bytes_total", "counter", "Bytes covered by successful TRIM requests.")
        t.sample("pmem_nbd_trimmed_bytes_total", m.bytesTrimmed)
        t.family("pmem_nbd_zeroed_bytes_total", "counter", "Bytes covered by successful WRITE_ZEROES requests.")
        t.sample("pmem_nbd_zeroed_bytes_total", m.bytesZeroed)

        // The same by export (the name each client connected to: a volume, `vol@snap`, or the
        // --export-name alias), for exports that had a connection. Summed at scrape time from
        // the per-connection counters, so the request path pays nothing more.
        let byExport = server.requestMetricsByExport().sorted { $0.key < $1.key }
        let slots = RequestMetrics.knownSlots + [RequestMetrics.commandSlots - 1]
        t.family("pmem_nbd_export_requests_total", "counter", "NBD requests received, by export and command (commands seen).")
        for (export, e) in byExport {
            for slot in slots where e.requests[slot] > 0 {
                t.sample("pmem_nbd_export_requests_total", [("export", export), ("command", RequestMetrics.commandName(slot: slot))], e.requests[slot])
            }
        }
        t.family("pmem_nbd_export_request_errors_total", "counter", "NBD requests answered with an error, by export and command (commands seen).")
        for (export, e) in byExport {
            for slot in slots where e.errors[slot] > 0 {
                t.sample("pmem_nbd_export_request_errors_total", [("export", export), ("command", RequestMetrics.commandName(slot: slot))], e.errors[slot])
            }
        }
        for (name, help, value) in [("read", "returned by successful READ requests", \RequestMetrics.bytesRead),
                                    ("written", "stored by successful WRITE requests", \RequestMetrics.bytesWritten),
                                    ("trimmed", "covered by successful TRIM requests", \RequestMetrics.bytesTrimmed),
                                    ("zeroed", "covered by successful WRITE_ZEROES requests", \RequestMetrics.bytesZeroed)] {
            t.family("pmem_nbd_export_\(name)_bytes_total", "counter", "Bytes \(help), by export.")
            for (export, e) in byExport { t.sample("pmem_nbd_export_\(name)_bytes_total", [("export", export)], e[keyPath: value]) }
        }

        t.family("pmem_nbd_request_duration_seconds", "histogram",
                 "Time the server spent on a request: from taking it from the receive buffer to queueing its reply (FLUSH: to the end of the sync).")
        var cumulative: UInt64 = 0
        for (i, bound) in RequestMetrics.latencyBoundsNanoseconds.enumerated() {
            cumulative += m.latencyBuckets[i]
            t.sample("pmem_nbd_request_duration_seconds_bucket", [("le", PrometheusText.seconds(nanoseconds: bound))], cumulative)
        }
        cumulative += m.latencyBuckets[RequestMetrics.latencyBoundsNanoseconds.count]
        t.sample("pmem_nbd_request_duration_seconds_bucket", [("le", "+Inf")], cumulative)
        t.sample("pmem_nbd_request_duration_seconds_sum", Double(m.latencySumNanoseconds) / 1e9)
        t.sample("pmem_nbd_request_duration_seconds_count", m.latencyCount)

        t.family("pmem_nbd_open_connections", "gauge", "NBD connections open now.")
        t.sample("pmem_nbd_open_connections", m.connectionsOpen)
        t.family("pmem_nbd_connections_total", "counter", "NBD connections accepted since start.")
        t.sample("pmem_nbd_connections_total", m.connectionsTotal)

        let engine = pool.engine
        let space = engine.space
        t.family("pmem_nbd_pool_size_bytes", "gauge", "Size of the pool file or device.")
        t.sample("pmem_nbd_pool_size_bytes", engine.layout.poolSize)
        t.family("pmem_nbd_pool_used_bytes", "gauge", "Pool data and map blocks in use.")
        t.sample("pmem_nbd_pool_used_bytes", space.allocated << 12)
        t.family("pmem_nbd_pool_free_bytes", "gauge", "Pool blocks free for new data.")
        t.sample("pmem_nbd_pool_free_bytes", space.free << 12)
        t.family("pmem_nbd_pool_held_bytes", "gauge", "Freed blocks waiting for a commit or for readers before reuse.")
        t.sample("pmem_nbd_pool_held_bytes", space.held << 12)
        let records = pool.records()
        t.family("pmem_nbd_volumes", "gauge", "Volumes in the pool (clones included).")
        t.sample("pmem_nbd_volumes", records.filter { $0.kind == .volume }.count)
        t.family("pmem_nbd_snapshots", "gauge", "Snapshots in the pool.")
        t.sample("pmem_nbd_snapshots", records.filter { $0.kind == .snapshot }.count)
        t.family("pmem_nbd_cow_copies_total", "counter",
                 "Copy-on-write copies: map nodes shared with a snapshot or clone, and old blocks under partial-block writes.")
        t.sample("pmem_nbd_cow_copies_total", [("kind", "map_node")], engine.copyCounters.load(CopyCounter.mapNodes))
        t.sample("pmem_nbd_cow_copies_total", [("kind", "partial_block")], engine.copyCounters.load(CopyCounter.partialBlocks))

        if let hub {
            let c = hub.counts
            t.family("pmem_nbd_feed_subscribers", "gauge", "Clients connected to the mapping-change feed.")
            t.sample("pmem_nbd_feed_subscribers", c.subscribers)
            t.family("pmem_nbd_feed_fenced_subscribers", "gauge", "Feed clients fenced for missing a deadline.")
            t.sample("pmem_nbd_feed_fenced_subscribers", c.fencedSubscribers)
            t.family("pmem_nbd_feed_leases", "gauge", "Leases held by feed clients, by mode.")
            t.sample("pmem_nbd_feed_leases", [("mode", "read")], c.readLeases)
            t.sample("pmem_nbd_feed_leases", [("mode", "write")], c.writeLeases)
            t.family("pmem_nbd_feed_pinned_blocks", "gauge", "Old blocks kept from reuse until a read-lease holder acknowledges.")
            t.sample("pmem_nbd_feed_pinned_blocks", c.pinnedBlocks)
            t.family("pmem_nbd_feed_events_total", "counter", "Mapping-change events published.")
            t.sample("pmem_nbd_feed_events_total", c.sequence)
        }
        t.family("pmem_nbd_start_time_seconds", "gauge", "When the server started, in seconds since the Unix epoch.")
        t.sample("pmem_nbd_start_time_seconds", startTime)
        return t.text
    }
}
