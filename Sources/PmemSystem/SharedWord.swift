import CPmemSupport

/// Atomic access to 64-bit words in raw memory that other threads (or, in a shared mapping,
/// other processes) access at the same time: pool metadata words, the feed's status page,
/// reader epoch slots. The C target does the access (`__atomic_*` builtins), so the compiler
/// neither tears nor reorders it.
public enum SharedWord {
    /// `__atomic_load_n(ACQUIRE)`.
    @inlinable @inline(__always)
    public static func load(_ word: UnsafePointer<UInt64>) -> UInt64 { pmem_atomic_load64(word) }

    /// `__atomic_store_n(RELEASE)`.
    @inlinable @inline(__always)
    public static func store(_ word: UnsafeMutablePointer<UInt64>, _ value: UInt64) { pmem_atomic_store64(word, value) }

    /// `__atomic_store_n(SEQ_CST)`: a store that later loads of this thread cannot pass.
    @inlinable @inline(__always)
    public static func storeSequentiallyConsistent(_ word: UnsafeMutablePointer<UInt64>, _ value: UInt64) {
        pmem_atomic_store64_seqcst(word, value)
    }
}
