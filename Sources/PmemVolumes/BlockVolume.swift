import PmemPool
import PmemSystem

/// A piece of a read: bytes in pool memory, or a range that reads as zeroes.
public enum Segment {
    /// Pool memory, valid until the reader's epoch ends (see `BlockVolume.read`).
    case data(UnsafeRawPointer, Int)
    case hole(Int)
}

/// `base:allocation`-style status of an extent.
public struct ExtentStatus: OptionSet, Sendable {
    public let rawValue: UInt32
    public init(rawValue: UInt32) { self.rawValue = rawValue }
    public static let hole = ExtentStatus(rawValue: 1)
    public static let zero = ExtentStatus(rawValue: 2)
}

/// The narrow interface between the NBD server and storage: one volume of a pool, addressed
/// by byte offsets. Implementations are thread-safe.
public protocol BlockVolume: AnyObject, Sendable {
    var name: String { get }
    var summary: String { get }
    var size: UInt64 { get }
    var readOnly: Bool { get }
    /// Whether `writeZeroes` without `noHole` is faster than writing zeroes.
    var fastZero: Bool { get }

    /// Describes `[offset, offset+length)` as segments in order. Data pointers stay valid
    /// until the caller's read epoch ends.
    func read(offset: UInt64, length: Int, _ body: (Segment) -> Void) throws(PoolError)

    /// Writes `length` bytes taken from `source`. With `fua` they are durable on return.
    func write(offset: UInt64, length: Int, fua: Bool, from source: inout some ByteSource) throws(PoolError)

    /// Zeroes a range; with `mayTrim` it may deallocate it. `fast` fails with `.notFast`
    /// (ENOTSUP) unless it is quicker than writing zeroes.
    func writeZeroes(offset: UInt64, length: UInt64, mayTrim: Bool, fast: Bool, fua: Bool) throws(PoolError)

    /// Discards a range (a hint; contents afterwards are unspecified but read as zero here).
    func trim(offset: UInt64, length: UInt64, fua: Bool) throws(PoolError)

    /// Makes every completed write durable.
    func flush() throws(PoolError)

    /// Prefetch hint.
    func cache(offset: UInt64, length: UInt64) throws(PoolError)

    /// Allocation status from `offset`: calls `body(length, status)` per extent until it returns
    /// false or `length` bytes are described.
    func allocation(offset: UInt64, length: UInt64, _ body: (UInt64, ExtentStatus) -> Bool) throws(PoolError)

    /// Whether `flush()` is cheap enough to run inline on a connection's thread (cache-line
    /// persistence) rather than on a worker (msync/fdatasync).
    var flushIsCheap: Bool { get }

    /// Names of the NBD metadata contexts this volume answers (`base:allocation` and more).
    var metaContexts: [String] { get }

    /// A guard a connection holds (entered) while it uses pointers `read` returned.
    func makeReadGuard() -> ReadGuard

    /// Status flags of a metadata context from `offset`, extent by extent, as `allocation` does.
    func status(context: String, offset: UInt64, length: UInt64, _ body: (UInt64, UInt32) -> Bool) throws(PoolError)
}

extension BlockVolume {
    public var metaContexts: [String] { ["base:allocation"] }
    public func makeReadGuard() -> ReadGuard { .none() }

    public func status(context: String, offset: UInt64, length: UInt64, _ body: (UInt64, UInt32) -> Bool) throws(PoolError) {
        guard context == "base:allocation" else { throw PoolError(.invalid, "unknown meta context \(context)") }
        try allocation(offset: offset, length: length) { n, s in body(n, s.rawValue) }
    }
}

extension PoolError {
    /// FAST_ZERO asked for but not faster than writing.
    public static let notFast = PoolError(.invalid, "zeroing this range is not faster than writing zeroes")
    public var isNotFast: Bool { kind == .invalid && message == PoolError.notFast.message }
}
