import NBDWire
import PmemPool
import PmemVolumes

/// Where the server finds exports: the handshake's catalog plus the volume behind each name.
public protocol ExportSource: ExportCatalog {
    /// The volume for an export the catalog returned (by canonical name).
    func volume(for export: ExportDescriptor) -> (any BlockVolume)?
}

/// Transmission flags an export of `volume` advertises.
public func transmissionFlags(for volume: any BlockVolume, readOnly: Bool) -> TransmissionFlags {
    var flags: TransmissionFlags = [.hasFlags, .sendFlush, .sendFUA, .sendCache, .canMultiConn]
    if readOnly || volume.readOnly {
        flags.insert(.readOnly)
    } else {
        flags.formUnion([.sendTrim, .sendWriteZeroes, .sendFastZero])
    }
    return flags
}
