import Glibc

/// A stream of bytes that fills caller-provided memory: the payload of an NBD write, read
/// partly from a connection's receive buffer and the rest straight from the socket, so the
/// pool can receive data directly into its destination block.
public protocol ByteSource {
    /// Fills all of `destination` with the next bytes. With `nonTemporal`, copies the caller
    /// makes use streaming stores (the destination is persistent memory).
    mutating func fill(_ destination: UnsafeMutableRawBufferPointer, nonTemporal: Bool) throws(Errno)

    /// Fills every one of `vectors`, in order, with the next bytes (a payload scattered over
    /// blocks that do not follow each other). The vectors may be changed (advanced) meanwhile.
    mutating func fill(scatter vectors: UnsafeMutableBufferPointer<iovec>, nonTemporal: Bool) throws(Errno)
}

extension ByteSource {
    /// One `fill` per vector.
    public mutating func fill(scatter vectors: UnsafeMutableBufferPointer<iovec>, nonTemporal: Bool) throws(Errno) {
        for v in vectors where v.iov_len > 0 {
            try fill(UnsafeMutableRawBufferPointer(start: v.iov_base, count: v.iov_len), nonTemporal: nonTemporal)
        }
    }
}

/// A `ByteSource` over memory already in hand.
public struct BufferByteSource: ByteSource {
    public var remaining: UnsafeRawBufferPointer
    public init(_ buffer: UnsafeRawBufferPointer) { remaining = buffer }

    public mutating func fill(_ destination: UnsafeMutableRawBufferPointer, nonTemporal: Bool) throws(Errno) {
        guard destination.count <= remaining.count else { throw Errno.ioError }
        if nonTemporal {
            PersistentMemory.copyNonTemporal(to: destination.baseAddress!, from: remaining.baseAddress!, count: destination.count)
        } else if destination.count > 0 {
            destination.baseAddress!.copyMemory(from: remaining.baseAddress!, byteCount: destination.count)
        }
        remaining = UnsafeRawBufferPointer(rebasing: remaining[destination.count...])
    }
}
