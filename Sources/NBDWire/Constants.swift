// Constants of the NBD protocol (NetworkBlockDevice/nbd doc/proto.md).

/// Magic numbers.
public enum NBDMagic {
    /// "NBDMAGIC", the first 8 bytes the server sends.
    public static let initPassword: UInt64 = 0x4e42_444d_4147_4943
    /// "IHAVEOPT", newstyle negotiation and every option header.
    public static let haveOption: UInt64 = 0x4948_4156_454F_5054
    /// Option reply magic.
    public static let optionReply: UInt64 = 0x0003_e889_0455_65a9
    public static let request: UInt32 = 0x2560_9513
    public static let extendedRequest: UInt32 = 0x21e4_1c71
    public static let simpleReply: UInt32 = 0x6744_6698
    public static let structuredReply: UInt32 = 0x668e_33ef
    public static let extendedReply: UInt32 = 0x6e8a_278c
}

/// Handshake flags (server, 16 bits).
public struct HandshakeFlags: OptionSet, Sendable {
    public let rawValue: UInt16
    public init(rawValue: UInt16) { self.rawValue = rawValue }
    public static let fixedNewstyle = HandshakeFlags(rawValue: 1 << 0)
    public static let noZeroes = HandshakeFlags(rawValue: 1 << 1)
}

/// Client flags (32 bits).
public struct ClientFlags: OptionSet, Sendable {
    public let rawValue: UInt32
    public init(rawValue: UInt32) { self.rawValue = rawValue }
    public static let fixedNewstyle = ClientFlags(rawValue: 1 << 0)
    public static let noZeroes = ClientFlags(rawValue: 1 << 1)
    public static let known: ClientFlags = [.fixedNewstyle, .noZeroes]
}

/// Transmission flags (16 bits), sent with the export size.
public struct TransmissionFlags: OptionSet, Sendable, Hashable {
    public let rawValue: UInt16
    public init(rawValue: UInt16) { self.rawValue = rawValue }
    public static let hasFlags = TransmissionFlags(rawValue: 1 << 0)
    public static let readOnly = TransmissionFlags(rawValue: 1 << 1)
    public static let sendFlush = TransmissionFlags(rawValue: 1 << 2)
    public static let sendFUA = TransmissionFlags(rawValue: 1 << 3)
    public static let rotational = TransmissionFlags(rawValue: 1 << 4)
    public static let sendTrim = TransmissionFlags(rawValue: 1 << 5)
    public static let sendWriteZeroes = TransmissionFlags(rawValue: 1 << 6)
    public static let sendDF = TransmissionFlags(rawValue: 1 << 7)
    public static let canMultiConn = TransmissionFlags(rawValue: 1 << 8)
    public static let sendResize = TransmissionFlags(rawValue: 1 << 9)
    public static let sendCache = TransmissionFlags(rawValue: 1 << 10)
    public static let sendFastZero = TransmissionFlags(rawValue: 1 << 11)
    public static let blockStatusPayload = TransmissionFlags(rawValue: 1 << 12)
}

/// Option codes (`NBD_OPT_*`).
public enum OptionCode {
    public static let exportName: UInt32 = 1
    public static let abort: UInt32 = 2
    public static let list: UInt32 = 3
    public static let peekExport: UInt32 = 4
    public static let startTLS: UInt32 = 5
    public static let info: UInt32 = 6
    public static let go: UInt32 = 7
    public static let structuredReply: UInt32 = 8
    public static let listMetaContext: UInt32 = 9
    public static let setMetaContext: UInt32 = 10
    public static let extendedHeaders: UInt32 = 11

    public static func name(_ code: UInt32) -> String {
        switch code {
        case exportName: "EXPORT_NAME"
        case abort: "ABORT"
        case list: "LIST"
        case peekExport: "PEEK_EXPORT"
        case startTLS: "STARTTLS"
        case info: "INFO"
        case go: "GO"
        case structuredReply: "STRUCTURED_REPLY"
        case listMetaContext: "LIST_META_CONTEXT"
        case setMetaContext: "SET_META_CONTEXT"
        case extendedHeaders: "EXTENDED_HEADERS"
        default: "option \(code)"
        }
    }
}

/// Option reply types (`NBD_REP_*`); errors have bit 31 set.
public enum OptionReplyType {
    public static let ack: UInt32 = 1
    public static let server: UInt32 = 2
    public static let info: UInt32 = 3
    public static let metaContext: UInt32 = 4
    public static let errUnsupported: UInt32 = 0x8000_0001
    public static let errPolicy: UInt32 = 0x8000_0002
    public static let errInvalid: UInt32 = 0x8000_0003
    public static let errPlatform: UInt32 = 0x8000_0004
    public static let errTLSRequired: UInt32 = 0x8000_0005
    public static let errUnknown: UInt32 = 0x8000_0006
    public static let errShutdown: UInt32 = 0x8000_0007
    public static let errBlockSizeRequired: UInt32 = 0x8000_0008
    public static let errTooBig: UInt32 = 0x8000_0009
    public static let errExtendedHeaderRequired: UInt32 = 0x8000_000a
}

/// `NBD_INFO_*` information types inside `NBD_REP_INFO`.
public enum InfoType {
    public static let export: UInt16 = 0
    public static let name: UInt16 = 1
    public static let description: UInt16 = 2
    public static let blockSize: UInt16 = 3
}

/// Command types (`NBD_CMD_*`).
public enum CommandType: UInt16, Sendable {
    case read = 0
    case write = 1
    case disconnect = 2
    case flush = 3
    case trim = 4
    case cache = 5
    case writeZeroes = 6
    case blockStatus = 7
    case resize = 8

    public var name: String {
        switch self {
        case .read: "READ"
        case .write: "WRITE"
        case .disconnect: "DISC"
        case .flush: "FLUSH"
        case .trim: "TRIM"
        case .cache: "CACHE"
        case .writeZeroes: "WRITE_ZEROES"
        case .blockStatus: "BLOCK_STATUS"
        case .resize: "RESIZE"
        }
    }
}

/// Command flags (16 bits).
public struct CommandFlags: OptionSet, Sendable {
    public let rawValue: UInt16
    public init(rawValue: UInt16) { self.rawValue = rawValue }
    public static let fua = CommandFlags(rawValue: 1 << 0)
    public static let noHole = CommandFlags(rawValue: 1 << 1)
    public static let dontFragment = CommandFlags(rawValue: 1 << 2)
    public static let requestOne = CommandFlags(rawValue: 1 << 3)
    public static let fastZero = CommandFlags(rawValue: 1 << 4)
    public static let payloadLength = CommandFlags(rawValue: 1 << 5)
}

/// Structured reply chunk types.
public enum ChunkType {
    public static let none: UInt16 = 0
    public static let offsetData: UInt16 = 1
    public static let offsetHole: UInt16 = 2
    public static let blockStatus: UInt16 = 5
    public static let blockStatusExtended: UInt16 = 6
    public static let error: UInt16 = 0x8001
    public static let errorOffset: UInt16 = 0x8002
}

/// Structured reply flags.
public enum ChunkFlags {
    public static let done: UInt16 = 1
}

/// Error values carried in replies (`NBD_E*`).
public struct NBDErrno: RawRepresentable, Equatable, Sendable, CustomStringConvertible {
    public let rawValue: UInt32
    public init(rawValue: UInt32) { self.rawValue = rawValue }
    public static let permission = NBDErrno(rawValue: 1)
    public static let io = NBDErrno(rawValue: 5)
    public static let noMemory = NBDErrno(rawValue: 12)
    public static let invalid = NBDErrno(rawValue: 22)
    public static let noSpace = NBDErrno(rawValue: 28)
    public static let overflow = NBDErrno(rawValue: 75)
    public static let notSupported = NBDErrno(rawValue: 95)
    public static let shutdown = NBDErrno(rawValue: 108)

    public var description: String {
        switch rawValue {
        case 1: "EPERM"
        case 5: "EIO"
        case 12: "ENOMEM"
        case 22: "EINVAL"
        case 28: "ENOSPC"
        case 75: "EOVERFLOW"
        case 95: "ENOTSUP"
        case 108: "ESHUTDOWN"
        default: "error \(rawValue)"
        }
    }
}

/// `base:allocation` status bits.
public enum AllocationState {
    public static let hole: UInt32 = 1 << 0
    public static let zero: UInt32 = 1 << 1
}

/// Limits this implementation applies during negotiation and transmission.
public enum NBDLimits {
    /// Longest string the spec allows (export names, descriptions, messages).
    public static let maxString = 4096
    /// Option payloads up to this size are parsed.
    public static let maxOptionPayload = 64 * 1024
    /// Option payloads above maxOptionPayload and up to this are skipped with ERR_TOO_BIG;
    /// larger ones are treated as a denial of service (hard disconnect).
    public static let maxSkippableOptionPayload = 16 * 1024 * 1024
    /// Options accepted in one handshake before the server treats the client as hostile.
    public static let maxOptionsPerHandshake = 4096
    /// Maximum payload advertised in NBD_INFO_BLOCK_SIZE (2^25, the spec's portable maximum).
    public static let maxPayload: UInt32 = 32 * 1024 * 1024
    /// The largest READ or WRITE accepted from a client that did not ask for the block sizes
    /// (and so did not promise to keep to the advertised maximum): 64 MiB, nbdkit's limit
    /// (nbd-server's `integrityhuge` test sends 42 MB requests). Reads are zero-copy and writes
    /// land in the pool, so this costs no buffer.
    public static let maxUnnegotiatedPayload: UInt32 = 64 * 1024 * 1024
    /// Meta contexts one SET_META_CONTEXT may select.
    public static let maxMetaContexts = 64
    /// Extents in one BLOCK_STATUS chunk.
    public static let maxExtentsPerChunk = 1 << 20
}
