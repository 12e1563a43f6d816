// Framing without I/O: what follows an option header or a request header on the wire, and
// whether the connection reads it, skips it or is dropped. The server's handshake and
// transmission loops and the nbd-fuzz target both frame the stream through these, so the
// fuzzer plays exactly the server's framing.

/// What the handshake does after an option header (IHAVEOPT, option, length).
public enum OptionFrame: Equatable, Sendable {
    /// Read `length` bytes of payload (at most `NBDLimits.maxOptionPayload`) and hand them to
    /// `Negotiator.handle(code:payload:)`.
    case read(code: UInt32, length: Int)
    /// Discard `length` bytes (more than `maxOptionPayload`, up to
    /// `maxSkippableOptionPayload`) and answer with `Negotiator.optionTooBig(code:)`.
    case skip(code: UInt32, length: Int)
    /// Drop the connection without a reply: a bad magic, or a payload too long to skip (a
    /// client sending one is treated as hostile).
    case drop(reason: String)

    /// Frames the `Negotiator.optionHeaderSize` bytes of an option header.
    public static func decode(_ header: [UInt8]) -> OptionFrame {
        guard case .option(let code, let length) = Negotiator.decodeOptionHeader(header) else {
            return .drop(reason: "bad option magic")
        }
        if Int(length) <= NBDLimits.maxOptionPayload { return .read(code: code, length: Int(length)) }
        if Int(length) <= NBDLimits.maxSkippableOptionPayload { return .skip(code: code, length: Int(length)) }
        return .drop(reason: "option of \(length) bytes")
    }
}

/// What follows a request's header that the connection must deal with before the next header.
public enum RequestPayload: Equatable, Sendable {
    /// This many payload bytes follow (zero for most commands); a rejected request's are read
    /// and thrown away, so the next header is found where the client put it.
    case consume(UInt64)
    /// The payload is too long to skip: hang up (only ever for a request `check` rejects).
    case disconnect
}

extension Request {
    /// Size of a request header: 28 bytes compact, 32 with extended headers.
    @inline(__always)
    public static func headerSize(extended: Bool) -> Int { extended ? extendedSize : compactSize }
}

extension RequestCheck {
    /// The payload after `r`'s header on a connection with `session`: `payloadLength`, or
    /// `.disconnect` where `payloadForcesDisconnect`.
    @inline(__always)
    public static func payload(of r: Request, session: NegotiatedSession) -> RequestPayload {
        if payloadForcesDisconnect(r, session: session) { return .disconnect }
        return .consume(payloadLength(of: r, extended: session.extendedHeaders))
    }
}
