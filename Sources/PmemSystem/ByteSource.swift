/// A stream of bytes that fills caller-provided memory: the payload of an NBD write, read
/// partly from a connection's receive buffer and the rest straight from the socket, so the
/// pool can receive data directly into its destination block.
public protocol ByteSource {
    /// Fills all of `destination` with the next bytes. With `nonTemporal`, copies the caller
    /// makes use streaming stores (the destination is persistent memory).
    mutating func fill(_ destination: UnsafeMutableRawBufferPointer, nonTemporal: Bool) throws(Errno)
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
