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

/// Parses a size the way qemu-img does: a number of bytes — decimal, with an optional fraction
/// (`1.5G`), or `0x` hexadecimal — with an optional suffix `B`, `K`, `M`, `G`, `T`, `P` or `E`
/// in either case, each a power of 1024; the IEC forms `KiB` … `EiB` are accepted too. A
/// fraction is truncated to whole bytes (`1.3K` is 1331). nil for anything else (`4GB`, `1e3`,
/// negative numbers, overflow).
public func parseSize(_ text: String) -> UInt64? {
    var t = Substring(text.trimmingCharacters(in: " \t"))
    guard !t.isEmpty else { return nil }
    let units: [Character: UInt64] = ["B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50, "E": 1 << 60]
    var mult: UInt64 = 1
    if t.count >= 3, t.suffix(2).lowercased() == "ib", let m = units[Character(t.dropLast(2).last!.uppercased())], m > 1 {
        mult = m
        t = t.dropLast(3)
    } else if let last = t.last, let m = units[Character(last.uppercased())] {
        mult = m
        t = t.dropLast()
    }
    if t.lowercased().hasPrefix("0x") {
        guard mult == 1, let v = UInt64(t.dropFirst(2), radix: 16) else { return nil }
        return v
    }
    let parts = t.split(separator: ".", maxSplits: 1, omittingEmptySubsequences: false)
    guard let whole = parts.first, !whole.isEmpty || parts.count == 2, whole.allSatisfy({ $0.isASCII && $0.isNumber }) else { return nil }
    let intPart = whole.isEmpty ? 0 : UInt64(whole)
    guard let intPart else { return nil }
    var (r, o) = intPart.multipliedReportingOverflow(by: mult)
    if o { return nil }
    if parts.count == 2 {
        let frac = parts[1]
        guard !frac.isEmpty || !whole.isEmpty, frac.allSatisfy({ $0.isASCII && $0.isNumber }) else { return nil }
        // As qemu does: the fraction times the multiplier, truncated to whole bytes.
        let value = (Double("0." + frac) ?? 0) * Double(mult)
        let extra = UInt64(value.rounded(.down))
        (r, o) = r.addingReportingOverflow(extra)
        if o { return nil }
    }
    return r
}

/// What sizes look like, for error messages.
public let sizeSyntax = "a number of bytes with an optional suffix K, M, G, T, P or E (powers of 1024; KiB, MiB… too), e.g. 4G, 1.5G, 4096M"

/// Why a size did not parse: the general rule, and a hint for decimal units (`4GB`).
public func sizeError(_ text: String) -> String {
    let t = text.trimmingCharacters(in: " ")
    if t.count >= 2, t.uppercased().hasSuffix("B"), "KMGTPE".contains(t.uppercased().dropLast().last ?? " ") {
        let unit = t.uppercased().dropLast().last!
        return "cannot parse size '\(text)': sizes are powers of 1024, write \(t.dropLast(2))\(unit) or \(t.dropLast(2))\(unit)iB"
    }
    return "cannot parse size '\(text)' (\(sizeSyntax))"
}

/// A block count's worth of bytes: `n` rounded up to the 4 KiB block size.
public func roundUpToBlock(_ n: UInt64) -> UInt64 { n > UInt64.max - 4095 ? n & ~UInt64(4095) : (n + 4095) & ~UInt64(4095) }

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
