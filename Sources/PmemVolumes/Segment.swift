import PmemPool

/// A piece of a read: bytes in pool memory, or a range that reads as zeroes.
public enum Segment {
    /// Pool memory, valid until the reader's epoch ends (see `Volume.read`).
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

extension PoolError {
    /// FAST_ZERO asked for but not faster than writing.
    public static let notFast = PoolError(.notSupported, "zeroing this range is not faster than writing zeroes")
}
