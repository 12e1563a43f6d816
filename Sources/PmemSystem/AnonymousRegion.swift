import Glibc

/// Private anonymous memory of its own `mmap`, unmapped when the last reference goes: for a
/// connection's large buffers, so that its pages go back to the kernel when it ends.
///
/// Why not `malloc`: glibc raises its mmap threshold to the size of the first large block
/// freed, so from the second connection on a 256 KiB buffer comes from a malloc heap. A
/// thousand connections at once leave a thousand such blocks free in the heaps when they end,
/// and free heap memory is not given back (only the top of a heap is trimmed); the pages each
/// round of connections touches there — chunk headers, a buffer's first bytes — stay resident,
/// and they are different pages from round to round, so the process grew by about 12 KiB per
/// concurrent connection per round (Docs/RELIABILITY.md, "The long run").
public final class AnonymousRegion: @unchecked Sendable {
    /// Page-aligned; `length` bytes, zero until written.
    public let base: UnsafeMutableRawPointer
    /// Bytes asked for, rounded up to whole pages.
    public let length: Int
    /// Whether `base` came from `malloc` because `mmap` failed (ENOMEM, too many mappings).
    private let fallback: Bool

    /// Maps `byteCount` bytes (rounded up to pages). If the kernel refuses, the memory comes
    /// from the heap instead: a connection is better served than refused over this.
    public init(byteCount: Int) {
        let page = Int(sysconf(Int32(_SC_PAGESIZE)))
        length = max(page, (byteCount + page - 1) / page * page)
        if let p = mmap(nil, length, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0), p != MAP_FAILED {
            base = p
            fallback = false
        } else {
            base = UnsafeMutableRawPointer.allocate(byteCount: length, alignment: page)
            base.initializeMemory(as: UInt8.self, repeating: 0, count: length)
            fallback = true
        }
    }

    deinit {
        if fallback { base.deallocate() } else { munmap(base, length) }
    }
}

/// Zeroed memory for a structure that grows and shrinks (the journal's word tables, a batch's
/// buffer): a block of its own mapping (with `mapped`, or when large), so that releasing it
/// gives its pages back to the kernel — see `AnonymousRegion` for why the heap does not — else
/// from the heap. The owner keeps the `Block` and releases it once.
public enum AnonymousMemory {
    /// Blocks of at least this many bytes get their own mapping.
    public static let mappingThreshold = 64 << 10

    public struct Block {
        public let base: UnsafeMutableRawPointer
        public let byteCount: Int
        let mapped: Bool
    }

    /// `byteCount` zeroed bytes, 64-byte aligned (page-aligned when mapped). `mapped`: a mapping
    /// whatever the size (memory allocated by one thread and freed by another, which in the
    /// heap fragments the allocating thread's arena).
    public static func allocate(byteCount: Int, mapped: Bool = false) -> Block {
        if byteCount >= mappingThreshold || mapped,
           let p = mmap(nil, byteCount, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0), p != MAP_FAILED {
            return Block(base: p, byteCount: byteCount, mapped: true)
        }
        let p = UnsafeMutableRawPointer.allocate(byteCount: byteCount, alignment: 64)
        p.initializeMemory(as: UInt8.self, repeating: 0, count: byteCount)
        return Block(base: p, byteCount: byteCount, mapped: false)
    }

    public static func release(_ block: Block) {
        if block.mapped { munmap(block.base, block.byteCount) } else { block.base.deallocate() }
    }
}
