import Foundation
import Glibc
import PmemSystem

/// The repository's root (for Docs/, scripts/, Sources/); this file is Tests/TestSupport/Common.swift.
let repositoryRoot: String = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent().path

/// A scratch directory removed when the value goes away.
final class ScratchDirectory {
    let path: String

    init() {
        var template = Array("/tmp/pmem-nbd-test-XXXXXX".utf8CString)
        guard mkdtemp(&template) != nil else { fatalError("mkdtemp: \(Errno.current)") }
        path = String(decoding: template.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }

    func file(_ name: String) -> String { path + "/" + name }

    deinit { try? FileManager.default.removeItem(atPath: path) }
}

/// Deterministic test data.
func pattern(_ count: Int, seed: UInt64) -> [UInt8] {
    var x = seed &* 0x9E37_79B9_7F4A_7C15 | 1
    return (0..<count).map { _ in
        x ^= x << 13
        x ^= x >> 7
        x ^= x << 17
        return UInt8(truncatingIfNeeded: x)
    }
}

/// Overwrites bytes of a file in place (damaging a pool on purpose).
func patch(_ path: String, at offset: Int, _ bytes: [UInt8]) throws {
    let h = try FileHandle(forUpdating: URL(fileURLWithPath: path))
    try h.seek(toOffset: UInt64(offset))
    h.write(Data(bytes))
    try h.close()
}

/// A small, fast, seeded generator (reproducible workloads).
struct SplitMix64: RandomNumberGenerator {
    var state: UInt64
    init(seed: UInt64) { state = seed }
    mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
}
