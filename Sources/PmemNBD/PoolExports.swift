import NBDServer
import NBDWire
import PmemPool
import PmemVolumes

/// The exports of a pool, looked up afresh each time (snapshots come and go while serving):
/// each volume as `vol`, each snapshot as `vol@snap` (read-only). The empty name is the default
/// export: the first volume. `--export-name NAME` changes it: when NAME is a volume or
/// snapshot of the pool, that one is the default; otherwise the first volume is advertised as
/// NAME (and a volume created later under that name takes the name back).
public final class PoolExports: ExportSource, @unchecked Sendable {
    public let pool: Pool
    public let readOnly: Bool
    public let defaultName: String?

    public init(pool: Pool, readOnly: Bool, defaultName: String? = nil) {
        self.pool = pool
        self.readOnly = readOnly
        self.defaultName = defaultName
    }

    private func entries() -> [(name: String, volume: Volume)] {
        var list = pool.exportable()
        if let defaultName, !list.contains(where: { $0.name == defaultName }),
           let first = list.firstIndex(where: { $0.volume.kind == .volume }) {
            list[first].name = defaultName
        }
        return list
    }

    private func descriptor(_ name: String, _ v: Volume) -> ExportDescriptor {
        ExportDescriptor(name: name, description: v.summary, size: v.size,
                         flags: VolumeExport.transmissionFlags(for: v, readOnly: readOnly), metaContexts: VolumeExport.metaContexts(for: v))
    }

    public func lookup(_ name: String) -> ExportDescriptor? {
        let list = entries()
        let found = name.isEmpty
            ? (defaultName.flatMap { d in list.first { $0.name == d } } ?? list.first(where: { $0.volume.kind == .volume }))
            : list.first(where: { $0.name == name })
        return found.map { descriptor($0.name, $0.volume) }
    }

    public func list() -> [ExportDescriptor] { entries().map { descriptor($0.name, $0.volume) } }

    public func volume(for export: ExportDescriptor) -> (any BlockVolume)? {
        entries().first { $0.name == export.name }.map { VolumeExport($0.volume) }
    }
}
