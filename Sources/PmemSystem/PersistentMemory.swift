import CPmemSupport

/// The CPU's persistence instructions, chosen by CPUID at run time (CLWB, else CLFLUSHOPT,
/// else CLFLUSH) in the C target.
public enum PersistentMemory {
    public enum FlushInstruction: Int32, Sendable, CustomStringConvertible {
        case none = 0, clflush = 1, clflushopt = 2, clwb = 3
        public var description: String {
            switch self {
            case .none: "none"
            case .clflush: "clflush"
            case .clflushopt: "clflushopt"
            case .clwb: "clwb"
            }
        }
    }

    /// The instruction `flush` uses.
    public static var flushInstruction: FlushInstruction {
        FlushInstruction(rawValue: pmem_flush_current()) ?? .none
    }

    /// Forces a specific instruction (tests); returns what is in effect.
    @discardableResult
    public static func selectFlush(_ forced: FlushInstruction?) -> FlushInstruction {
        FlushInstruction(rawValue: pmem_flush_select(forced?.rawValue ?? 0)) ?? .none
    }

    /// Writes back the cache lines covering a range (no ordering; follow with `drain`).
    @inline(__always)
    public static func flush(_ p: UnsafeRawPointer, count: Int) { pmem_flush(p, count) }

    /// SFENCE.
    @inline(__always)
    public static func drain() { pmem_drain() }

    @inline(__always)
    public static func copyNonTemporal(to dst: UnsafeMutableRawPointer, from src: UnsafeRawPointer, count: Int) {
        pmem_memcpy_nt(dst, src, count)
    }

    @inline(__always)
    public static func zeroNonTemporal(_ dst: UnsafeMutableRawPointer, count: Int) { pmem_memzero_nt(dst, count) }

    /// CRC-32C over a buffer.
    @inline(__always)
    public static func crc32c(_ p: UnsafeRawPointer, count: Int, seed: UInt32 = 0) -> UInt32 { pmem_crc32c(seed, p, count) }

    public static func crc32c(_ bytes: UnsafeRawBufferPointer, seed: UInt32 = 0) -> UInt32 {
        pmem_crc32c(seed, bytes.baseAddress, bytes.count)
    }
}
