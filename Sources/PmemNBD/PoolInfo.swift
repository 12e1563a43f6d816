import PmemPool
import PmemSystem
import PmemVolumes

/// `pmem-nbd info`: what a pool is, how it would be persisted, its volumes and space.
public enum PoolInfo {
    public static func describe(path: String, persistence: PersistenceMode, json: Bool) throws -> String {
        // Read-only and unlocked, so it also works while a server has the pool open.
        let engine = try PoolEngine.open(path: path, readOnly: true, persistence: persistence, lock: false)
        let sb = engine.superblock
        let mode = engine.persistence.domain == .cacheline ? "cache-line" : "page"
        let flush = PersistentMemory.flushInstruction.description
        let all = engine.records()
        let volumes = all.filter { $0.kind == .volume || $0.kind == .snapshot }
        let names = volumes.map { Pool.exportName($0, in: all) ?? $0.name }
        let space = engine.space
        let backing = engine.media.file?.backing.rawValue ?? "memory"
        if json {
            let vols = zip(volumes, names).map { "{\"name\":\"\(jsonEscape($1))\",\"kind\":\"\($0.kind == .snapshot ? "snapshot" : "volume")\",\"size\":\($0.size)}" }.joined(separator: ",")
            return """
            {"path":"\(jsonEscape(path))","uuid":"\(sb.uuidString)","version":\(sb.version),"pool_size":\(sb.layout.poolSize),\
            "block_size":4096,"blocks":\(space.blocks),"allocated_blocks":\(space.allocated),"free_bytes":\(space.free << 12),\
            "backing":"\(backing)","persistence":"\(mode)","flush_instruction":"\(flush)",\
            "exports":[\(names.map { "\"\(jsonEscape($0))\"" }.joined(separator: ","))],"volumes":[\(vols)]}
            """
        }
        return """
        pool:         \(path)
        uuid:         \(sb.uuidString)
        format:       version \(sb.version)
        size:         \(sb.layout.poolSize) bytes (\(formatBytes(sb.layout.poolSize)))
        space:        \(formatBytes(space.allocated << 12)) used, \(formatBytes(space.free << 12)) free of \(formatBytes(space.blocks << 12))
        backing:      \(backing)
        persistence:  \(mode)\(mode == "cache-line" ? " (MAP_SYNC, \(flush) + sfence)" : " (msync)")
        exports:      \(zip(volumes, names).map { "\($1) (\(formatBytes($0.size)))" }.joined(separator: ", "))
        """
    }
}

public func jsonEscape(_ s: String) -> String {
    var out = ""
    for u in s.unicodeScalars {
        switch u {
        case "\"": out += "\\\""
        case "\\": out += "\\\\"
        case "\n": out += "\\n"
        case "\t": out += "\\t"
        default:
            if u.value < 0x20 { out += "\\u" + String(u.value, radix: 16).leftPad(4) } else { out.unicodeScalars.append(u) }
        }
    }
    return out
}

public func formatBytes(_ n: UInt64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"]
    var v = Double(n)
    var i = 0
    while v >= 1024 && i < units.count - 1 { v /= 1024; i += 1 }
    return i == 0 ? "\(n) B" : (v == v.rounded() ? "\(Int(v)) \(units[i])" : String(format1: v) + " \(units[i])")
}

/// Parses sizes such as 4G, 512M, 1T, 4096 (binary units).
public func parseSize(_ text: String) -> UInt64? {
    let t = text.trimmingCharacters(in: " ")
    guard let last = t.last else { return nil }
    let units: [Character: UInt64] = ["K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50]
    var body = t
    var mult: UInt64 = 1
    if let m = units[Character(last.uppercased())] {
        mult = m
        body.removeLast()
    } else if last.uppercased() == "B" {
        body.removeLast()
        if let l2 = body.last, let m = units[Character(l2.uppercased())] { mult = m; body.removeLast() }
    }
    if body.hasSuffix("i") || body.hasSuffix("I") { body.removeLast() }
    guard let v = UInt64(body) else { return nil }
    let (r, o) = v.multipliedReportingOverflow(by: mult)
    return o ? nil : r
}

extension String {
    init(format1 v: Double) {
        let scaled = Int((v * 10).rounded())
        self = "\(scaled / 10).\(scaled % 10)"
    }
    func leftPad(_ w: Int) -> String { count >= w ? self : String(repeating: "0", count: w - count) + self }
    func trimmingCharacters(in set: String) -> String {
        var s = Substring(self)
        while let f = s.first, set.contains(f) { s.removeFirst() }
        while let l = s.last, set.contains(l) { s.removeLast() }
        return String(s)
    }
}
