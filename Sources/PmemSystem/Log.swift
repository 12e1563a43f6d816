import Glibc
import Synchronization

/// Leveled logging to standard error, one `write(2)` per line so lines from
/// different threads never interleave. Levels: error < warning < info < debug < trace.
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
    }

    private static let threshold = Atomic<Int>(Level.warning.rawValue)
    private static let programName = Locked<String>("pmem-nbd")

    /// Sets the most detailed level printed.
    public static func setLevel(_ level: Level) { threshold.store(level.rawValue, ordering: .relaxed) }

    public static func setProgramName(_ name: String) { programName.withLock { $0 = name } }

    @inline(__always)
    public static func enabled(_ level: Level) -> Bool { level.rawValue <= threshold.load(ordering: .relaxed) }

    public static func error(_ message: @autoclosure () -> String) { emit(.error, message) }
    public static func warning(_ message: @autoclosure () -> String) { emit(.warning, message) }
    public static func info(_ message: @autoclosure () -> String) { emit(.info, message) }
    public static func debug(_ message: @autoclosure () -> String) { emit(.debug, message) }
    public static func trace(_ message: @autoclosure () -> String) { emit(.trace, message) }

    private static func emit(_ level: Level, _ message: () -> String) {
        guard enabled(level) else { return }
        let line = "\(programName.withLock { $0 }): \(level.tag): \(message())\n"
        var bytes = Array(line.utf8)
        bytes.withUnsafeMutableBytes { _ = try? FileDescriptor.standardError.writeAll(UnsafeRawBufferPointer($0)) }
    }
}
