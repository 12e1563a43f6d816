import NBDServer
import NBDWire
import PmemPool

/// The exports of an open pool: each volume by name; the empty name means the default
/// (first) volume.
public final class PoolExports: ExportSource, @unchecked Sendable {
    public let volumes: [any BlockVolume]
    public let readOnly: Bool
    /// Name under which the default volume is advertised (`--export-name`), if not its own.
    public let defaultName: String?

    public init(volumes: [any BlockVolume], readOnly: Bool, defaultName: String? = nil) {
        self.volumes = volumes
        self.readOnly = readOnly
        self.defaultName = defaultName
    }

    private func advertisedName(_ index: Int) -> String {
        index == 0 ? (defaultName ?? volumes[0].name) : volumes[index].name
    }

    private func descriptor(_ index: Int) -> ExportDescriptor {
        let v = volumes[index]
        return ExportDescriptor(name: advertisedName(index), description: v.summary, size: v.size,
                                flags: transmissionFlags(for: v, readOnly: readOnly), metaContexts: v.metaContexts)
    }

    public func lookup(_ name: String) -> ExportDescriptor? {
        if name.isEmpty { return volumes.isEmpty ? nil : descriptor(0) }
        guard let i = volumes.indices.first(where: { advertisedName($0) == name }) else { return nil }
        return descriptor(i)
    }

    public func list() -> [ExportDescriptor] { volumes.indices.map(descriptor) }

    public func volume(for export: ExportDescriptor) -> (any BlockVolume)? {
        volumes.indices.first(where: { advertisedName($0) == export.name }).map { volumes[$0] }
    }
}
