import Glibc

/// A private directory for sockets (`serve -U -`, the CLI's import server): made with
/// `mkdtemp(3)` under `$TMPDIR` (or /tmp), mode 0700, removed with what is in it.
public struct TemporaryDirectory: Sendable {
    public let path: String

    /// Makes `$TMPDIR/PREFIX-XXXXXX`.
    public init(prefix: String) throws(Errno) {
        var base = "/tmp"
        if let t = getenv("TMPDIR"), t.pointee != 0 { base = String(cString: t) }
        var template = Array("\(base)/\(prefix)-XXXXXX".utf8CString)
        let made: String? = template.withUnsafeMutableBufferPointer { b in
            guard let p = mkdtemp(b.baseAddress!) else { return nil }
            return String(cString: p)
        }
        guard let made else { throw Errno.current }
        path = made
    }

    /// A path inside the directory.
    public func file(_ name: String) -> String { path + "/" + name }

    /// Removes the files directly inside the directory, then the directory.
    public func remove() {
        if let dir = opendir(path) {
            while let entry = readdir(dir) {
                let name = withUnsafeBytes(of: entry.pointee.d_name) { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) }
                if name != "." && name != ".." { unlink(file(name)) }
            }
            closedir(dir)
        }
        rmdir(path)
    }
}

extension TemporaryDirectory {
    /// `mkfifo(3)` in the directory (mode 0600); returns its path.
    public func makeFIFO(_ name: String) throws(Errno) -> String {
        let path = file(name)
        if mkfifo(path, 0o600) != 0 { throw Errno.current }
        return path
    }
}
