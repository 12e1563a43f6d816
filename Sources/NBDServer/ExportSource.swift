import NBDWire

/// Where the server finds exports: the handshake's catalog plus the volume behind each name.
public protocol ExportSource: ExportCatalog {
    /// The volume for an export the catalog returned (by canonical name).
    func volume(for export: ExportDescriptor) -> (any BlockVolume)?
}
