import NBDWire

/// How a connection frames its replies, settled once at negotiation so the request loop
/// branches on one per-connection value.
enum ReplyStyle {
    /// Simple replies only (no structured replies negotiated).
    case simple
    /// Structured replies: 20-byte chunk headers; requests without data get simple replies.
    case structured
    /// Extended headers: every reply is a 32-byte-header chunk echoing the request's offset.
    case extended

    init(_ session: NegotiatedSession) {
        self = session.extendedHeaders ? .extended : session.structuredReplies ? .structured : .simple
    }

    /// Most descriptors in one block status chunk: both styles fill 32 KiB, well inside the
    /// reply arena (64 KiB); the client asks again for the rest.
    var maxExtentsPerReply: Int { self == .extended ? 2048 : 4096 }

    /// Longest extent one descriptor describes: 32-bit lengths kept a multiple of 4 KiB, or
    /// (extended) 64-bit ones.
    var maxExtentLength: UInt64 { self == .extended ? UInt64.max & ~4095 : 0xFFFF_F000 }

    /// A complete reply to a request without data, as bytes (replies built on a worker).
    func encoded(cookie: UInt64, offset: UInt64, error: NBDErrno?, message: String) -> [UInt8] {
        if let error, self != .simple {
            return self == .extended
                ? ExtendedReply.errorChunk(cookie: cookie, offset: offset, error: error, message: message)
                : Reply.errorChunk(cookie: cookie, error: error, message: message)
        }
        let size = self == .extended ? ExtendedReply.noneSize : Reply.simpleSize
        return [UInt8](unsafeUninitializedCapacity: size) { b, n in
            let p = UnsafeMutableRawPointer(b.baseAddress!)
            if self == .extended {
                n = ExtendedReply.none(cookie: cookie, offset: offset, into: p)
            } else {
                n = Reply.simple(error: error, cookie: cookie, into: p)
            }
        }
    }
}

extension ReplyWriter {
    /// Queues success for a request without data: a simple reply, or NONE with extended headers.
    @inline(__always)
    func success(_ style: ReplyStyle, cookie: UInt64, offset: UInt64) {
        if style == .extended {
            _ = ExtendedReply.none(cookie: cookie, offset: offset, into: header(ExtendedReply.noneSize))
        } else {
            _ = Reply.simple(error: nil, cookie: cookie, into: header(Reply.simpleSize))
        }
    }

    /// Queues an error: a simple reply without structured replies, else an ERROR chunk with
    /// the message for people.
    func error(_ style: ReplyStyle, cookie: UInt64, offset: UInt64, _ error: NBDErrno, _ message: String) {
        switch style {
        case .simple: _ = Reply.simple(error: error, cookie: cookie, into: header(Reply.simpleSize))
        case .structured: copy(Reply.errorChunk(cookie: cookie, error: error, message: message))
        case .extended: copy(ExtendedReply.errorChunk(cookie: cookie, offset: offset, error: error, message: message))
        }
    }

    /// Queues the header of a content chunk of `length` data bytes at `dataOffset`.
    @inline(__always)
    func dataHeader(_ style: ReplyStyle, cookie: UInt64, offset: UInt64, dataOffset: UInt64, length: Int, done: Bool) {
        if style == .extended {
            _ = ExtendedReply.offsetDataHeader(cookie: cookie, offset: offset, dataOffset: dataOffset, dataLength: UInt64(length),
                                               done: done, into: header(ExtendedReply.offsetDataHeaderSize))
        } else {
            _ = Reply.offsetDataHeader(cookie: cookie, offset: dataOffset, dataLength: UInt32(length), done: done,
                                       into: header(Reply.offsetDataHeaderSize))
        }
    }

    /// Queues an OFFSET_HOLE chunk.
    @inline(__always)
    func hole(_ style: ReplyStyle, cookie: UInt64, offset: UInt64, holeOffset: UInt64, length: Int, done: Bool) {
        if style == .extended {
            _ = ExtendedReply.offsetHole(cookie: cookie, offset: offset, holeOffset: holeOffset, length: UInt32(length),
                                         done: done, into: header(ExtendedReply.offsetHoleSize))
        } else {
            _ = Reply.offsetHole(cookie: cookie, offset: holeOffset, length: UInt32(length), done: done,
                                 into: header(Reply.offsetHoleSize))
        }
    }

    /// Queues NONE with DONE (a zero-length read's whole reply).
    @inline(__always)
    func none(_ style: ReplyStyle, cookie: UInt64, offset: UInt64) {
        if style == .extended {
            _ = ExtendedReply.none(cookie: cookie, offset: offset, into: header(ExtendedReply.noneSize))
        } else {
            _ = Reply.none(cookie: cookie, into: header(Reply.noneSize))
        }
    }

    /// Queues one block status chunk: BLOCK_STATUS (32-bit lengths) or BLOCK_STATUS_EXT.
    func blockStatus(_ style: ReplyStyle, cookie: UInt64, offset: UInt64, contextID: UInt32,
                     extents: [(length: UInt64, status: UInt32)], done: Bool) {
        if style == .extended {
            let p = header(ExtendedReply.blockStatusHeaderSize + ExtendedReply.extentSize * extents.count)
            var at = p + ExtendedReply.blockStatusHeader(cookie: cookie, offset: offset, contextID: contextID,
                                                         extentCount: extents.count, done: done, into: p)
            for e in extents { at += ExtendedReply.extent(length: e.length, status: UInt64(e.status), into: at) }
        } else {
            let p = header(Reply.blockStatusHeaderSize + 8 * extents.count)
            var at = p + Reply.blockStatusHeader(cookie: cookie, contextID: contextID, extentCount: extents.count, done: done, into: p)
            for e in extents { at += Reply.extent(length: UInt32(e.length), flags: e.status, into: at) }
        }
    }
}
