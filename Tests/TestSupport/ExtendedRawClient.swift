import Glibc
import PmemSystem

/// Extended headers (NBD_OPT_EXTENDED_HEADERS) for the raw client: 32-byte requests with 64-bit
/// lengths and 32-byte reply chunks, built and parsed byte by byte (not with the server's codec).
/// Debian's libnbd (1.14) predates extended headers, so these tests speak them by hand.
extension RawClient {
    static let extendedRequestMagic: UInt32 = 0x21e4_1c71
    static let extendedReplyMagic: UInt32 = 0x6e8a_278c

    /// An extended request header (add the payload after it when `flags` has PAYLOAD_LEN, 0x20).
    static func extendedRequest(type: UInt16, flags: UInt16 = 0, cookie: UInt64, offset: UInt64, length: UInt64,
                                magic: UInt32 = extendedRequestMagic) -> [UInt8] {
        be(magic) + be(flags) + be(type) + be(cookie) + be(offset) + be(length)
    }

    /// One extended reply chunk.
    struct ExtendedChunk {
        var flags: UInt16
        var type: UInt16
        var cookie: UInt64
        /// The header's offset field (the spec: the request's offset).
        var offset: UInt64
        var payload: [UInt8]
        var done: Bool { flags & 1 != 0 }
        var isError: Bool { type & 0x8000 != 0 }
        var errorCode: UInt32? { isError && payload.count >= 4 ? RawClient.u32(payload, 0) : nil }
        var errorMessage: String? {
            guard isError, payload.count >= 6 else { return nil }
            let n = Int(UInt16(payload[4]) << 8 | UInt16(payload[5]))
            return String(decoding: payload.dropFirst(6).prefix(n), as: UTF8.self)
        }
    }

    /// A reply that is not an extended chunk where one was due.
    struct UnexpectedReply: Error, CustomStringConvertible {
        let description: String
    }

    static func u32(_ b: [UInt8], _ at: Int) -> UInt32 { b[at..<(at + 4)].reduce(UInt32(0)) { $0 << 8 | UInt32($1) } }
    static func u64(_ b: [UInt8], _ at: Int) -> UInt64 { b[at..<(at + 8)].reduce(UInt64(0)) { $0 << 8 | UInt64($1) } }

    /// Reads one extended chunk; nil when the server closed the connection first. A simple or
    /// structured reply (or anything else) throws.
    func extendedChunk() throws -> ExtendedChunk? {
        guard let h = try receive(32) else { return nil }
        let magic = RawClient.u32(h, 0)
        guard magic == RawClient.extendedReplyMagic else {
            throw UnexpectedReply(description: "reply magic 0x\(String(magic, radix: 16)) instead of the extended one")
        }
        let length = RawClient.u64(h, 24)
        // 64 MiB of data and the chunk's own fields (an OFFSET_DATA chunk of the largest READ).
        guard length <= (64 << 20) + 64 else { throw UnexpectedReply(description: "reply payload of \(length) bytes") }
        guard let payload = try receive(Int(length)) else { return nil }
        return ExtendedChunk(flags: UInt16(h[4]) << 8 | UInt16(h[5]), type: UInt16(h[6]) << 8 | UInt16(h[7]),
                             cookie: RawClient.u64(h, 8), offset: RawClient.u64(h, 16), payload: payload)
    }

    /// Reads the chunks of one reply up to the one with DONE (one request in flight); nil when
    /// the connection closed first.
    func extendedReply() throws -> [ExtendedChunk]? {
        var chunks: [ExtendedChunk] = []
        while let c = try extendedChunk() {
            chunks.append(c)
            if c.done { return chunks }
        }
        return nil
    }

    /// What GO settled after extended headers.
    struct ExtendedSession {
        var size: UInt64
        var flags: UInt16
        /// Meta context name to id, from SET_META_CONTEXT.
        var contexts: [String: UInt32]
    }

    /// Negotiates extended headers (after structured replies with `structuredFirst`), selects
    /// `metaContexts`, and sends GO asking for block sizes (unless `requestBlockSize` is false).
    func goExtended(name: String = "", structuredFirst: Bool = false, metaContexts: [String] = [],
                    requestBlockSize: Bool = true) throws -> ExtendedSession {
        if structuredFirst {
            try send(RawClient.option(8, []))
            guard let r = try optionReply(), r.type == 1 else { throw UnexpectedReply(description: "STRUCTURED_REPLY refused") }
        }
        try send(RawClient.option(11, []))
        guard let ack = try optionReply(), ack.option == 11, ack.type == 1 else {
            throw UnexpectedReply(description: "EXTENDED_HEADERS refused")
        }
        var contexts: [String: UInt32] = [:]
        if !metaContexts.isEmpty {
            var data = RawClient.be(UInt32(name.utf8.count)) + Array(name.utf8) + RawClient.be(UInt32(metaContexts.count))
            for m in metaContexts { data += RawClient.be(UInt32(m.utf8.count)) + Array(m.utf8) }
            try send(RawClient.option(10, data))
            while let r = try optionReply(), r.type != 1 {
                guard r.type == 4 else { throw UnexpectedReply(description: "SET_META_CONTEXT error \(r.type)") }
                contexts[String(decoding: r.data.dropFirst(4), as: UTF8.self)] = RawClient.u32(r.data, 0)
            }
        }
        // GO with NBD_INFO_BLOCK_SIZE requested (or no information request).
        let requests = requestBlockSize ? RawClient.be(UInt16(1)) + RawClient.be(UInt16(3)) : RawClient.be(UInt16(0))
        try send(RawClient.option(7, RawClient.be(UInt32(name.utf8.count)) + Array(name.utf8) + requests))
        var session = ExtendedSession(size: 0, flags: 0, contexts: contexts)
        while true {
            guard let r = try optionReply() else { throw Errno.connectionReset }
            if r.type == 3, r.data.count >= 12, r.data[0] == 0, r.data[1] == 0 {
                session.size = RawClient.u64(r.data, 2)
                session.flags = UInt16(r.data[10]) << 8 | UInt16(r.data[11])
            } else if r.type == 1 {
                return session
            } else if r.type & 0x8000_0000 != 0 {
                throw UnexpectedReply(description: "GO error \(r.type)")
            }
        }
    }
}
