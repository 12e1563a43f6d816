import PmemPool
import PmemSystem

/// The program's version, as `pmem-nbd --version` (or `-V`) prints it.
public enum PmemNBDVersion {
    public static let number = "0.9.0"
    /// `pmem-nbd 0.9.0 (pool format 3)`.
    public static var text: String { "pmem-nbd \(number) (pool format \(Superblock.currentVersion))" }
}

/// Size arguments of the CLI: parsed with qemu-img's rules (`parseSize`), at least one block,
/// rounded up to the 4 KiB block size with a note saying so.
public enum SizeArgument {
    public static func blocks(_ text: String, _ what: String) throws -> UInt64 {
        guard let n = parseSize(text) else { throw ServeError("\(what): \(sizeError(text))") }
        guard n > 0 else { throw ServeError("\(what) must be at least 4 KiB, not '\(text)'") }
        let rounded = roundUpToBlock(n)
        if rounded != n {
            Log.notice("\(what) \(text) (\(n) bytes) rounded up to \(rounded) bytes (\(formatBytes(rounded))), a whole number of 4 KiB blocks")
        }
        return rounded
    }
}
