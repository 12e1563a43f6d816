import PmemSystem

/// Why a pool operation failed, with a message that says what to do next.
public struct PoolError: Error, CustomStringConvertible, Sendable {
    public enum Kind: Sendable, Equatable {
        /// The file is not a usable pool (foreign, truncated, corrupt, wrong version).
        case badPool
        /// The caller asked for something invalid (range, size, name).
        case invalid
        /// A valid request this pool does not do (FAST_ZERO that would not be fast).
        case notSupported
        /// No free space in the pool.
        case noSpace
        /// The export or pool is read-only.
        case readOnly
        /// A system call failed.
        case system(Errno)
        /// The payload source failed (the client went away mid-write).
        case source(Errno)
        /// Media or I/O error.
        case io
        /// Something with that name already exists / is busy.
        case exists
        case notFound
    }

    public var kind: Kind
    public var message: String

    public init(_ kind: Kind, _ message: String) {
        self.kind = kind
        self.message = message
    }

    public var description: String { message }

    /// The error with `path` in front of its message, unless the message names it already.
    public func naming(_ path: String) -> PoolError {
        let named = message.hasPrefix(path) || message.contains(" \(path):") || message.contains(" \(path) ")
            || message.contains(" \(path),") || message.contains(" \(path);") || message.hasSuffix(" \(path)")
        return named ? self : PoolError(kind, "\(path): \(message)")
    }

    static func system(_ e: Errno, _ what: String) -> PoolError { PoolError(.system(e), "\(what): \(e)") }
}
