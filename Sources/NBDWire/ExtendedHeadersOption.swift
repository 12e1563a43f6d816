// NBD_OPT_EXTENDED_HEADERS in the negotiation (extension-ext-header branch of doc/proto.md).
// Kept apart from Negotiation.swift, which only routes the option here and asks the two
// questions below.

extension Negotiator {
    /// Answers NBD_OPT_EXTENDED_HEADERS. Acknowledged once, whether or not structured replies
    /// came first; it implies them (chunked replies, meta contexts, DF). A repeat is
    /// ERR_INVALID and changes nothing, as data with the option is.
    mutating func extendedHeadersOption(_ payload: [UInt8]) -> Outcome {
        let code = OptionCode.extendedHeaders
        if !payload.isEmpty {
            return .reply(Self.optionReply(code, OptionReplyType.errInvalid, message: "EXTENDED_HEADERS takes no data"))
        }
        if extendedHeaders {
            return .reply(Self.optionReply(code, OptionReplyType.errInvalid, message: "extended headers already negotiated"))
        }
        extendedHeaders = true
        structuredReplies = true
        return .reply(Self.optionReply(code, OptionReplyType.ack))
    }

    /// NBD_OPT_STRUCTURED_REPLY after extended headers: the spec's answer is
    /// ERR_EXT_HEADER_REQD (there is no downgrade); extended headers stay in force.
    static func extendedHeadersTakePrecedence(_ code: UInt32) -> Outcome {
        .reply(optionReply(code, OptionReplyType.errExtendedHeaderRequired,
                           message: "extended headers are negotiated and take precedence"))
    }

    /// NBD_OPT_EXPORT_NAME after extended headers: the client MUST NOT send it, and it cannot
    /// be answered with an error, so the session ends (as for an export that cannot be served).
    static var exportNameAfterExtendedHeaders: Outcome {
        .close([], reason: "EXPORT_NAME after extended headers were negotiated")
    }
}
