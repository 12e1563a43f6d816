// What the negotiation needs to know about exports; supplied by the server.

/// One export as the handshake describes it.
public struct ExportDescriptor: Sendable, Equatable {
    public var name: String
    public var description: String
    public var size: UInt64
    /// Transmission flags before negotiation-dependent ones (DF is added only with structured replies).
    public var flags: TransmissionFlags
    public var minimumBlock: UInt32
    public var preferredBlock: UInt32
    public var maximumPayload: UInt32
    /// Names of the meta contexts a client may select on this export, e.g. `base:allocation`.
    public var metaContexts: [String]

    public init(name: String, description: String = "", size: UInt64, flags: TransmissionFlags,
                minimumBlock: UInt32 = 1, preferredBlock: UInt32 = 4096,
                maximumPayload: UInt32 = NBDLimits.maxPayload, metaContexts: [String] = ["base:allocation"]) {
        self.name = name
        self.description = description
        self.size = size
        self.flags = flags
        self.minimumBlock = minimumBlock
        self.preferredBlock = preferredBlock
        self.maximumPayload = maximumPayload
        self.metaContexts = metaContexts
    }
}

/// Looks exports up by name. The empty name means the default export.
public protocol ExportCatalog: Sendable {
    func lookup(_ name: String) -> ExportDescriptor?
    func list() -> [ExportDescriptor]
}

/// A selected metadata context and the id it was given in NBD_REP_META_CONTEXT.
public struct MetaContext: Sendable, Equatable {
    public var id: UInt32
    public var name: String
    public init(id: UInt32, name: String) {
        self.id = id
        self.name = name
    }
}

/// What the handshake settled, handed to the transmission phase.
public struct NegotiatedSession: Sendable, Equatable {
    public var export: ExportDescriptor
    /// The flags actually sent to the client.
    public var flags: TransmissionFlags
    /// Whether replies are chunks (structured or, with extended headers, extended ones).
    public var structuredReplies: Bool
    /// Whether NBD_OPT_EXTENDED_HEADERS was acknowledged: 32-byte request headers with 64-bit
    /// lengths, and every reply an extended chunk. Implies `structuredReplies`.
    public var extendedHeaders: Bool
    public var metaContexts: [MetaContext]
    /// Whether the client asked for NBD_INFO_BLOCK_SIZE in NBD_OPT_GO (and so promised to obey it).
    public var clientHonoursBlockSize: Bool
    /// How the client entered transmission.
    public var viaExportName: Bool

    public init(export: ExportDescriptor, flags: TransmissionFlags, structuredReplies: Bool, metaContexts: [MetaContext],
                clientHonoursBlockSize: Bool, viaExportName: Bool, extendedHeaders: Bool = false) {
        self.export = export
        self.flags = flags
        self.structuredReplies = structuredReplies || extendedHeaders
        self.extendedHeaders = extendedHeaders
        self.metaContexts = metaContexts
        self.clientHonoursBlockSize = clientHonoursBlockSize
        self.viaExportName = viaExportName
    }

    /// The largest payload a READ or WRITE may carry on this connection: the advertised maximum
    /// for a client that asked for the block sizes (it promised to keep to them), else at least
    /// `NBDLimits.maxUnnegotiatedPayload` (the spec's default constraints are only a floor:
    /// "at least 2^25").
    public var maximumRequestPayload: UInt32 {
        clientHonoursBlockSize ? export.maximumPayload : max(export.maximumPayload, NBDLimits.maxUnnegotiatedPayload)
    }
}
