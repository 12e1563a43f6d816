import Glibc
import PmemSystem

/// A progress bar on standard error for long operations (create --prefault, check, export-diff,
/// offline volume and snapshot deletion), drawn only when standard error is a terminal: quiet
/// in scripts, logs and CI.
public final class ProgressMeter {
    let label: String
    let unit: UInt64
    let enabled: Bool
    private var lastDraw: UInt64 = 0
    private var drawn = false

    /// `unit` is the size of one counted item in bytes (4096 for blocks), for the byte figures.
    public init(_ label: String, unit: UInt64 = 4096, enabled: Bool? = nil) {
        self.label = label
        self.unit = unit
        self.enabled = enabled ?? (isatty(STDERR_FILENO) == 1 && getenv("TERM").map { String(cString: $0) != "dumb" } ?? false)
    }

    /// Redraws (at most ten times a second) with `done` of `total` items.
    public func update(_ done: UInt64, of total: UInt64) {
        guard enabled, total > 0 else { return }
        let now = MonotonicClock.nanoseconds()
        if done < total && now - lastDraw < 100_000_000 { return }
        lastDraw = now
        draw(Self.line(label: label, done: done, total: total, unit: unit))
    }

    /// Clears the bar (the command then prints its result).
    public func finish() {
        guard enabled, drawn else { return }
        draw("")
        drawn = false
    }

    private func draw(_ text: String) {
        let bytes = Array(("\r\u{1B}[K" + text).utf8)
        try? FileDescriptor.standardError.writeAll(bytes: bytes)
        drawn = true
    }

    /// `check [########............]  40%  1.6 GiB of 4.0 GiB`
    public static func line(label: String, done: UInt64, total: UInt64, unit: UInt64, width: Int = 24) -> String {
        let fraction = total == 0 ? 1 : min(1, Double(done) / Double(total))
        let filled = Int(fraction * Double(width))
        let bar = String(repeating: "#", count: filled) + String(repeating: ".", count: width - filled)
        let percent = String(Int(fraction * 100))
        return "\(label) [\(bar)] \(String(repeating: " ", count: 3 - percent.count))\(percent)%  "
            + "\(formatBytes(done * unit)) of \(formatBytes(total * unit))"
    }
}
