import CPmemSupport
import Glibc

/// A block of 64-bit counters for metrics. Each counter is written either by a single thread
/// (`add`: a relaxed load and store, no locked instruction) or by several (`addShared`: an
/// atomic fetch-add); any thread may `load` them. Nothing here locks or allocates after `init`.
public final class CounterBlock: @unchecked Sendable {
    public let count: Int
    @usableFromInline let words: UnsafeMutablePointer<UInt64>

    /// `count` counters, all zero, on their own cache lines.
    public init(count: Int) {
        self.count = count
        let raw = UnsafeMutableRawPointer.allocate(byteCount: max(64, (count * 8 + 63) & ~63), alignment: 64)
        words = raw.bindMemory(to: UInt64.self, capacity: count)
        words.initialize(repeating: 0, count: count)
    }

    deinit { UnsafeMutableRawPointer(words).deallocate() }

    /// Adds `n` to counter `index`; only one thread may ever call this for a given block.
    @inlinable @inline(__always)
    public func add(_ index: Int, _ n: UInt64 = 1) { pmem_counter_add(words + index, n) }

    /// Adds `n` to counter `index` from any thread.
    @inlinable @inline(__always)
    public func addShared(_ index: Int, _ n: UInt64 = 1) { pmem_counter_add_shared(words + index, n) }

    /// The value of counter `index`.
    @inlinable
    public func load(_ index: Int) -> UInt64 { pmem_counter_load(words + index) }
}

/// The monotonic clock.
public enum MonotonicClock {
    /// `clock_gettime(CLOCK_MONOTONIC)` in nanoseconds (a vDSO call, no system call).
    @inlinable @inline(__always)
    public static func nanoseconds() -> UInt64 {
        var ts = timespec()
        clock_gettime(CLOCK_MONOTONIC, &ts)
        return UInt64(ts.tv_sec) &* 1_000_000_000 &+ UInt64(ts.tv_nsec)
    }

    /// The same clock in seconds (for deadlines and elapsed times that are not on a hot path).
    @inlinable
    public static func seconds() -> Double {
        var ts = timespec()
        clock_gettime(CLOCK_MONOTONIC, &ts)
        return Double(ts.tv_sec) + Double(ts.tv_nsec) / 1e9
    }
}
