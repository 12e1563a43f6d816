import NBDWire
import PmemSystem

// The server's storage interface: what an export must provide. The server knows nothing of
// pools; the application (PmemNBD's VolumeExport) adapts its volumes to this.

/// A piece of a read: bytes the storage keeps valid while the connection's `ReadGuard` is
/// entered, or a range that reads as zeroes.
public enum Segment {
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

/// Why storage failed a request: the NBD error that answers it and a message for the client.
public struct StorageError: Error, Sendable {
    /// The error the reply carries.
    public var code: NBDErrno
    public var message: String
    /// The write's payload source (the client's socket) failed: nothing is answered and the
    /// connection ends.
    public var sourceFailed: Bool

    public init(_ code: NBDErrno, _ message: String, sourceFailed: Bool = false) {
        self.code = code
        self.message = message
        self.sourceFailed = sourceFailed
    }
}

/// What a connection holds (entered) while replies point into memory `read` returned.
public protocol ReadGuard: AnyObject, Sendable {
    func enter()
    func exit()
    var isEntered: Bool { get }
}

/// A guard that protects nothing (storage whose read pointers stay valid): never entered.
public final class NoReadGuard: ReadGuard {
    public init() {}
    public func enter() {}
    public func exit() {}
    public var isEntered: Bool { false }
}

/// The narrow interface between the NBD server and storage: one export, addressed by byte
/// offsets. Implementations are thread-safe.
public protocol BlockVolume: AnyObject, Sendable {
    /// What `Server.disconnect(where:)` and `connectionCount(where:)` callers match on: an
    /// identifier the application gives the export's storage.
    var volumeID: UInt64 { get }
    var name: String { get }
    var size: UInt64 { get }
    var readOnly: Bool { get }

    /// Describes `[offset, offset+length)` as segments in order. Data pointers stay valid
    /// while the caller's read guard is entered.
    func read(offset: UInt64, length: Int, _ body: (Segment) -> Void) throws(StorageError)

    /// Writes `length` bytes taken from `source`. With `fua` they are durable on return.
    func write(offset: UInt64, length: Int, fua: Bool, from source: inout some ByteSource) throws(StorageError)

    /// Zeroes a range; with `mayTrim` it may deallocate it. `fast` fails with ENOTSUP unless
    /// it is quicker than writing zeroes.
    func writeZeroes(offset: UInt64, length: UInt64, mayTrim: Bool, fast: Bool, fua: Bool) throws(StorageError)

    /// Discards a range (a hint; contents afterwards are unspecified).
    func trim(offset: UInt64, length: UInt64, fua: Bool) throws(StorageError)

    /// Makes every completed write durable.
    func flush() throws(StorageError)

    /// Prefetch hint.
    func cache(offset: UInt64, length: UInt64) throws(StorageError)

    /// Whether `flush()` is cheap enough to run inline on a connection's thread rather than on
    /// a worker.
    var flushIsCheap: Bool { get }

    /// A guard a connection holds (entered) while it uses pointers `read` returned.
    func makeReadGuard() -> any ReadGuard

    /// Status flags of a metadata context from `offset`, extent by extent: calls
    /// `body(length, flags)` until it returns false or `length` bytes are described.
    func status(context: String, offset: UInt64, length: UInt64, _ body: (UInt64, UInt32) -> Bool) throws(StorageError)
}

extension BlockVolume {
    public func makeReadGuard() -> any ReadGuard { NoReadGuard() }
}
