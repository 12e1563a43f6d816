import CPmemSupport
import Glibc

/// Process-level system calls for daemonizing and spawning: fork, pipes, sessions, waiting,
/// standard streams.
public enum ProcessControl {
    /// `fork(2)`: 0 in the child, the child's process id in the parent. Only safe while the
    /// process has a single thread (see `threadCount`).
    public static func fork() throws(Errno) -> pid_t {
        let pid = Glibc.fork()
        if pid < 0 { throw Errno.current }
        return pid
    }

    /// `pipe2(O_CLOEXEC)`: (read end, write end).
    public static func pipe() throws(Errno) -> (read: FileDescriptor, write: FileDescriptor) {
        var fds: (Int32, Int32) = (-1, -1)
        _ = try withUnsafeMutableBytes(of: &fds) { (p) throws(Errno) in
            try retryOnInterrupt { pmem_pipe_cloexec(p.baseAddress!.assumingMemoryBound(to: Int32.self)) }
        }
        return (FileDescriptor(rawValue: fds.0), FileDescriptor(rawValue: fds.1))
    }

    /// `setsid(2)`: makes the caller the leader of a new session, without a controlling terminal.
    public static func newSession() throws(Errno) {
        if setsid() < 0 { throw Errno.current }
    }

    /// How a child process ended.
    public enum Termination: Equatable, Sendable {
        case exited(Int32)
        case signaled(Int32)

        /// The shell's convention: the exit status, or 128 + the signal number.
        public var shellStatus: Int32 {
            switch self {
            case .exited(let s): s
            case .signaled(let sig): 128 + sig
            }
        }
    }

    /// `waitpid(2)` for one child, blocking until it ends.
    public static func wait(for pid: pid_t) throws(Errno) -> Termination {
        var status: Int32 = 0
        _ = try retryOnInterrupt { waitpid(pid, &status, 0) }
        // WIFEXITED / WEXITSTATUS / WTERMSIG, which Swift does not import.
        if status & 0x7F == 0 { return .exited((status >> 8) & 0xFF) }
        return .signaled(status & 0x7F)
    }

    /// `prctl(PR_SET_PDEATHSIG)`: the kernel sends `signal` to this process when its parent
    /// exits (`--exit-with-parent`). If the parent is already gone (`getppid()` is no longer
    /// `parent`), the signal is raised at once, since the kernel would never send it.
    public static func signalWhenParentExits(_ signal: Int32, parent: pid_t) throws(Errno) {
        if pmem_set_parent_death_signal(signal) != 0 { throw Errno.current }
        if getppid() != parent { kill(getpid(), signal) }
    }

    /// Runs `/bin/sh -c command` with `environment` added to this process's, standard streams
    /// inherited, every signal at its default disposition and none blocked (the server ignores
    /// SIGPIPE and catches SIGTERM; the command must not inherit that). Returns its pid.
    public static func spawnShell(_ command: String, environment: [String: String]) throws(Errno) -> pid_t {
        var env: [String: String] = [:]
        var p = environ
        while let entry = p.pointee {
            let text = String(cString: entry)
            if let eq = text.firstIndex(of: "=") { env[String(text[..<eq])] = String(text[text.index(after: eq)...]) }
            p += 1
        }
        for (k, v) in environment { env[k] = v }
        var attributes = posix_spawnattr_t()
        posix_spawnattr_init(&attributes)
        defer { posix_spawnattr_destroy(&attributes) }
        var all = sigset_t(), none = sigset_t()
        sigfillset(&all)
        sigemptyset(&none)
        posix_spawnattr_setsigdefault(&attributes, &all)
        posix_spawnattr_setsigmask(&attributes, &none)
        posix_spawnattr_setflags(&attributes, Int16(POSIX_SPAWN_SETSIGDEF | POSIX_SPAWN_SETSIGMASK))
        let argv = ["/bin/sh", "-c", command]
        var cArgs = argv.map { strdup($0) } + [nil]
        var cEnv = env.map { strdup("\($0.key)=\($0.value)") } + [nil]
        defer { for q in cArgs + cEnv { free(q) } }
        var pid: pid_t = 0
        let rc = posix_spawn(&pid, "/bin/sh", nil, &attributes, &cArgs, &cEnv)
        if rc != 0 { throw Errno(rawValue: rc) }
        return pid
    }

    /// `_exit(2)`: ends the process at once, without atexit handlers or stdio flushing (a
    /// forked parent must not flush buffers its child also holds).
    /// Makes heap blocks of `bytes` or more mappings of their own, always: freeing one gives its
    /// pages back to the kernel. glibc starts at 128 KiB but raises the threshold to the size
    /// of each larger mapped block freed (up to 32 MiB), so after a server's first large
    /// commit its transient buffers of 0.1 to 4 MiB (a batch's records, the runs of blocks it
    /// wrote, the blocks it freed) came from the threads' heaps, where freed memory stays
    /// resident unless it is at a heap's top: the server's memory crept up for as long as it
    /// ran (Docs/RELIABILITY.md, "Load and soak"). Setting the threshold turns the adjustment
    /// off. Call before starting threads. False if the allocator refused (a sanitizer's).
    @discardableResult
    public static func keepLargeAllocationsMapped(threshold bytes: Int = 128 << 10) -> Bool {
        pmem_set_mmap_threshold(bytes) == 1
    }

    public static func exitImmediately(_ status: Int32) -> Never { _exit(status) }

    /// Points standard input and output (and error, when `includingError`) at /dev/null with
    /// `open(2)` and `dup2(2)`, as a daemon does once it no longer talks to whoever started it.
    public static func detachStandardStreams(includingError: Bool) throws(Errno) {
        let null = try FileDescriptor.open("/dev/null", O_RDWR)
        defer { null.close() }
        var targets: [Int32] = [STDIN_FILENO, STDOUT_FILENO]
        if includingError { targets.append(STDERR_FILENO) }
        for t in targets { _ = try retryOnInterrupt { dup2(null.rawValue, t) } }
    }

    /// Closes every open descriptor from 3 up except those in `keeping` (the numbers are read
    /// from /proc/self/fd with `opendir(3)`, then closed with `close(2)`): what a daemon does so
    /// it holds nothing of whoever started it.
    public static func closeDescriptors(keeping: Set<Int32>) {
        guard let dir = opendir("/proc/self/fd") else { return }
        let own = dirfd(dir)
        var open: [Int32] = []
        while let entry = readdir(dir) {
            let name = withUnsafeBytes(of: entry.pointee.d_name) { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) }
            if let fd = Int32(name), fd > 2, fd != own, !keeping.contains(fd) { open.append(fd) }
        }
        closedir(dir)
        for fd in open { _ = Glibc.close(fd) }
    }

    /// The number of threads in this process (the `Threads:` line of /proc/self/status), or
    /// nil when it cannot be read.
    public static func threadCount() -> Int? {
        guard let fd = try? FileDescriptor.open("/proc/self/status", O_RDONLY) else { return nil }
        defer { fd.close() }
        guard let bytes = try? fd.read(at: 0, count: 16384) else { return nil }
        for line in String(decoding: bytes, as: UTF8.self).split(separator: "\n") where line.hasPrefix("Threads:") {
            return Int(line.dropFirst("Threads:".count).trimmingCharacters(in: " \t"))
        }
        return nil
    }
}

extension Substring {
    fileprivate func trimmingCharacters(in set: String) -> String {
        String(drop { set.contains($0) }.reversed().drop { set.contains($0) }.reversed())
    }
}
