import Glibc

/// Where a server of a pool offers its mapping-change feed unless told otherwise.
public enum FeedPaths {
    public static func defaultPath(forPool pool: String) -> String {
        var st = stat()
        if stat(pool, &st) == 0 && (st.st_mode & S_IFMT) != S_IFREG {
            let base = pool.split(separator: "/").last.map(String.init) ?? "pool"
            return "/tmp/pmem-nbd-\(base).feed"
        }
        return pool + ".feed"
    }
}
