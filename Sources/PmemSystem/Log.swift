import CPmemSupport
import Glibc
import Synchronization

/// Leveled logging to standard error (or syslog), one `write(2)` per line so lines from
/// different threads never interleave. Levels: error < warning < info < debug < trace.
/// Notices (`notice`) are what a person running the server wants to see by default — where
/// it serves, what it created — and print at the default level without a level tag.
public enum Log {
    public enum Level: Int, Sendable, Comparable {
        case error = 0, warning, info, debug, trace
        public static func < (a: Level, b: Level) -> Bool { a.rawValue < b.rawValue }
        var tag: String {
            switch self {
            case .error: "error"
            case .warning: "warning"
            case .info: "info"
            case .debug: "debug"
            case .trace: "trace"
            }
        }
        var syslogPriority: Int32 {
            switch self {
            case .error: LOG_ERR
            case .warning: LOG_WARNING
            case .info: LOG_INFO
            case .debug, .trace: LOG_DEBUG
            }
        }
    }

    /// Where lines go.
    public enum Destination: String, Sendable, CaseIterable {
        /// Standard error (the default).
        case standardError = "stderr"
        /// syslog(3), facility daemon, with the pid (journald picks it up too).
        case syslog
        /// Nowhere.
        case null
    }

    private static let threshold = Atomic<Int>(Level.warning.rawValue)
    private static let programName = Locked<String>("pmem-nbd")
    private static let destination = Atomic<Int>(0)
    private static let timestamps = Atomic<Bool>(false)

    /// Sets the most detailed level printed.
    public static func setLevel(_ level: Level) { threshold.store(level.rawValue, ordering: .relaxed) }

    public static func setProgramName(_ name: String) { programName.withLock { $0 = name } }

    /// Sends lines to `destination`; with `timestamps`, standard error lines start with the time
    /// (UTC, RFC 3339 with milliseconds). syslog adds its own.
    public static func configure(destination d: Destination, timestamps t: Bool) {
        if d == .syslog {
            // openlog keeps the pointer: the identity string lives for the rest of the process.
            let ident = strdup(programName.withLock { $0 })
            openlog(ident, LOG_PID | LOG_NDELAY, LOG_DAEMON)
        }
        destination.store(Destination.allCases.firstIndex(of: d) ?? 0, ordering: .relaxed)
        timestamps.store(t, ordering: .relaxed)
    }

    @inline(__always)
    public static func enabled(_ level: Level) -> Bool { level.rawValue <= threshold.load(ordering: .relaxed) }

    public static func error(_ message: @autoclosure () -> String) { emit(.error, message) }
    public static func warning(_ message: @autoclosure () -> String) { emit(.warning, message) }
    public static func info(_ message: @autoclosure () -> String) { emit(.info, message) }
    public static func debug(_ message: @autoclosure () -> String) { emit(.debug, message) }
    public static func trace(_ message: @autoclosure () -> String) { emit(.trace, message) }

    /// A line printed at the default level, without a level tag (`pmem-nbd: serving …`).
    public static func notice(_ message: @autoclosure () -> String) {
        guard enabled(.warning) else { return }
        write(message(), tag: nil, priority: LOG_NOTICE)
    }

    private static func emit(_ level: Level, _ message: () -> String) {
        guard enabled(level) else { return }
        write(message(), tag: level.tag, priority: level.syslogPriority)
    }

    private static func write(_ message: String, tag: String?, priority: Int32) {
        switch Destination.allCases[destination.load(ordering: .relaxed)] {
        case .null:
            return
        case .syslog:
            let text = tag.map { "\($0): \(message)" } ?? message
            pmem_syslog(priority, text)
        case .standardError:
            var line = "\(programName.withLock { $0 }): \(tag.map { "\($0): " } ?? "")\(message)\n"
            if timestamps.load(ordering: .relaxed) { line = timestamp() + " " + line }
            var bytes = Array(line.utf8)
            bytes.withUnsafeMutableBytes { _ = try? FileDescriptor.standardError.writeAll(UnsafeRawBufferPointer($0)) }
        }
    }

    /// The wall-clock time as `2026-01-02T03:04:05.678Z`.
    public static func timestamp() -> String {
        var ts = timespec()
        clock_gettime(CLOCK_REALTIME, &ts)
        var t = ts.tv_sec
        var parts = tm()
        gmtime_r(&t, &parts)
        func two(_ n: Int32) -> String { n < 10 ? "0\(n)" : "\(n)" }
        let ms = Int(ts.tv_nsec / 1_000_000)
        let msText = ms < 10 ? "00\(ms)" : ms < 100 ? "0\(ms)" : "\(ms)"
        return "\(parts.tm_year + 1900)-\(two(parts.tm_mon + 1))-\(two(parts.tm_mday))T\(two(parts.tm_hour)):\(two(parts.tm_min)):\(two(parts.tm_sec)).\(msText)Z"
    }
}
