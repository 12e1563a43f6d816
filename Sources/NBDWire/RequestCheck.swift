// Validation of transmission requests against what was negotiated. Pure; the server
// answers rejected requests with the error given here and carries on.

public enum RequestCheck {
    public enum Verdict: Equatable, Sendable {
        case accept
        case reject(NBDErrno, String)
    }

    /// Flags a command may carry, given the negotiated transmission flags. (PAYLOAD_LEN is
    /// framing, not a command flag: `check` takes it off an extended WRITE, the one command that
    /// has it here; on any other command it stays an invalid flag.)
    public static func allowedFlags(for type: CommandType, _ flags: TransmissionFlags) -> CommandFlags {
        var allowed: CommandFlags = flags.contains(.sendFUA) ? .fua : []
        switch type {
        case .read:
            if flags.contains(.sendDF) { allowed.insert(.dontFragment) }
        case .writeZeroes:
            allowed.insert(.noHole)
            if flags.contains(.sendFastZero) { allowed.insert(.fastZero) }
        case .blockStatus:
            allowed.insert(.requestOne)
        default:
            break
        }
        return allowed
    }

    /// How many payload bytes follow this request's header. With compact headers only WRITE
    /// carries one (its length); with extended headers every request flagged PAYLOAD_LEN does,
    /// and nothing else (a WRITE without the flag has none). The payload is read, or skipped,
    /// even when the request is rejected, so the next header is found where the client put it.
    @inline(__always)
    public static func payloadLength(of r: Request, extended: Bool = false) -> UInt64 {
        if extended { return r.flags.contains(.payloadLength) ? r.length : 0 }
        return r.typeCode == CommandType.write.rawValue ? r.length : 0
    }

    /// Whether the server hangs up instead of skipping the payload: with extended headers a
    /// PAYLOAD_LEN beyond the maximum payload of the connection (`maximumRequestPayload`; spec:
    /// the server SHOULD initiate a hard disconnect). Compact WRITE payloads (at most 4 GiB)
    /// are always skipped. Every request this is true for is also rejected by `check`.
    public static func payloadForcesDisconnect(_ r: Request, session: NegotiatedSession) -> Bool {
        session.extendedHeaders && r.flags.contains(.payloadLength) && r.length > UInt64(session.maximumRequestPayload)
    }

    /// The verdict on a request. With extended headers a WRITE must carry PAYLOAD_LEN, which
    /// is then taken off and the request judged as a compact one would be; the compact path
    /// pays one branch on the session for this.
    public static func check(_ r: Request, session: NegotiatedSession) -> Verdict {
        if session.extendedHeaders { return checkExtended(r, session: session) }
        return checkCompact(r, session: session)
    }

    private static func checkExtended(_ r: Request, session: NegotiatedSession) -> Verdict {
        guard r.typeCode == CommandType.write.rawValue else { return checkCompact(r, session: session) }
        guard r.flags.contains(.payloadLength) else { return .reject(.invalid, "WRITE without PAYLOAD_LEN under extended headers") }
        var write = r
        write.flags.remove(.payloadLength)
        return checkCompact(write, session: session)
    }

    @inline(__always)
    private static func checkCompact(_ r: Request, session: NegotiatedSession) -> Verdict {
        guard let type = r.type else { return .reject(.invalid, "unknown command \(r.typeCode)") }
        let flags = session.flags
        let export = session.export
        let extra = r.flags.subtracting(allowedFlags(for: type, flags))
        if !extra.isEmpty {
            return .reject(.invalid, "flags 0x\(String(extra.rawValue, radix: 16)) not valid for \(type.name)")
        }
        let isWrite = type == .write || type == .writeZeroes || type == .trim
        if isWrite && flags.contains(.readOnly) { return .reject(.permission, "export is read-only") }
        switch type {
        case .disconnect:
            return .accept
        case .flush:
            if r.offset != 0 || r.length != 0 { return .reject(.invalid, "FLUSH offset and length must be zero") }
            return .accept
        case .resize:
            return .reject(.invalid, "RESIZE is not supported")
        case .trim where !flags.contains(.sendTrim):
            return .reject(.invalid, "TRIM was not negotiated")
        case .writeZeroes where !flags.contains(.sendWriteZeroes):
            return .reject(.invalid, "WRITE_ZEROES was not negotiated")
        case .blockStatus:
            if !session.structuredReplies || session.metaContexts.isEmpty {
                return .reject(.invalid, "no meta context was negotiated")
            }
        default:
            break
        }
        let (end, overflow) = r.offset.addingReportingOverflow(r.length)
        if overflow || end > export.size {
            if type == .write || type == .writeZeroes {
                return .reject(.noSpace, "request ends at \(overflow ? "overflow" : String(end)) beyond the export size \(export.size)")
            }
            return .reject(.invalid, "request beyond the export size \(export.size)")
        }
        let maximum = session.maximumRequestPayload
        if type == .write && r.length > UInt64(maximum) {
            return .reject(.invalid, "write of \(r.length) bytes exceeds the maximum payload \(maximum)")
        }
        if type == .read && r.length > UInt64(maximum) {
            return .reject(session.structuredReplies ? .overflow : .invalid,
                           "read of \(r.length) bytes exceeds the maximum payload \(maximum)")
        }
        if session.clientHonoursBlockSize && export.minimumBlock > 1 && type != .blockStatus {
            let m = UInt64(export.minimumBlock)
            if r.offset % m != 0 || r.length % m != 0 {
                return .reject(.invalid, "request not aligned to the minimum block size \(m)")
            }
        }
        return .accept
    }
}
