import CPmemSupport
import Glibc

/// A program started with `posix_spawn(3)` in a process group of its own, which is always
/// reaped and never waited for without a deadline.
///
/// The tests start servers and tools (nbdinfo, qemu-img, fio, …) through this type. Its rules:
/// - The child leads a new process group (its pgid is its pid); descriptors 3 and up other than
///   those passed explicitly are closed in it; its signal mask is empty and SIGPIPE, SIGTERM,
///   SIGINT, SIGHUP are at their default dispositions, whatever the test process does.
/// - Its end is noticed with `waitid(WNOWAIT)` polling; at that moment whatever is left of its
///   process group (grandchildren holding its pipes, say) is sent SIGKILL, and only then is the
///   child reaped, so the group id cannot have been reused.
/// - Every wait has a deadline. `stop` sends a signal to the child, waits `grace`, sends SIGKILL
///   to the whole group and waits at most `killWait` more; a process that survives SIGKILL
///   (uninterruptible sleep) is reported (`nil`), never waited for.
/// - Output is read with `poll(2)` against the same deadline: a descendant that escaped the group
///   (a new session) and still holds a pipe cannot keep a reader waiting.
public final class ChildProcess: @unchecked Sendable {
    /// Where a standard stream of the child goes.
    public enum Stream: Sendable {
        /// /dev/null.
        case null
        /// A pipe; the parent's end is `standardInput` / `standardOutput` / `standardError`.
        case pipe
        /// A file, created or truncated.
        case file(String)
        /// The parent's own descriptor.
        case inherit
    }

    public typealias Termination = ProcessControl.Termination

    public let pid: pid_t
    /// The parent's ends of the pipes, for the streams given as `.pipe` (closed by `deinit`;
    /// standard input also by `closeStandardInput` and `collect`).
    public private(set) var standardInput: FileDescriptor?
    public let standardOutput: FileDescriptor?
    public let standardError: FileDescriptor?

    private let lock = PosixMutex()
    private var ended: Termination?

    /// Starts `executable` (a path; no PATH search) with `arguments` as its argv (argv[0]
    /// included), the current environment with `environment` added over it, and `passing`
    /// descriptors as 3, 4, … in the child.
    public init(
        executable: String, arguments: [String], environment: [String: String] = [:],
        standardInput: Stream = .null, standardOutput: Stream = .null, standardError: Stream = .null,
        passing descriptors: [FileDescriptor] = []
    ) throws(Errno) {
        // Copies of the passed descriptors above anything the child's dup2s target.
        var high: [Int32] = []
        defer { for fd in high { _ = Glibc.close(fd) } }
        for fd in descriptors {
            let copy = fcntl(fd.rawValue, F_DUPFD_CLOEXEC, 3 + Int32(descriptors.count))
            if copy < 0 { throw Errno.current }
            high.append(copy)
        }
        // Pipes are created close-on-exec, so no other child started meanwhile inherits them.
        var parentEnds: [FileDescriptor?] = [nil, nil, nil]
        var childEnds: [FileDescriptor] = []
        defer { for fd in childEnds { fd.close() } }
        var closeParentEndsOnFailure = true
        defer { if closeParentEndsOnFailure { for fd in parentEnds { fd?.close() } } }

        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        for (target, stream) in [standardInput, standardOutput, standardError].enumerated() {
            let t = Int32(target)
            switch stream {
            case .null:
                posix_spawn_file_actions_addopen(&actions, t, "/dev/null", t == 0 ? O_RDONLY : O_WRONLY, 0)
            case .file(let path):
                posix_spawn_file_actions_addopen(&actions, t, path, t == 0 ? O_RDONLY : O_WRONLY | O_CREAT | O_TRUNC, 0o644)
            case .inherit:
                break
            case .pipe:
                let (r, w) = try ProcessControl.pipe()
                let (mine, theirs) = t == 0 ? (w, r) : (r, w)
                parentEnds[target] = mine
                childEnds.append(theirs)
                posix_spawn_file_actions_adddup2(&actions, theirs.rawValue, t)
            }
        }
        for (i, fd) in high.enumerated() { posix_spawn_file_actions_adddup2(&actions, fd, 3 + Int32(i)) }
        let closing = pmem_spawn_actions_closefrom(&actions, 3 + Int32(descriptors.count))
        if closing != 0 { throw Errno(rawValue: closing) }

        var attributes = posix_spawnattr_t()
        posix_spawnattr_init(&attributes)
        defer { posix_spawnattr_destroy(&attributes) }
        posix_spawnattr_setpgroup(&attributes, 0)
        var none = sigset_t()
        sigemptyset(&none)
        posix_spawnattr_setsigmask(&attributes, &none)
        var defaults = sigset_t()
        sigemptyset(&defaults)
        for s in [SIGPIPE, SIGTERM, SIGINT, SIGHUP, SIGQUIT, SIGCHLD] { sigaddset(&defaults, s) }
        posix_spawnattr_setsigdefault(&attributes, &defaults)
        posix_spawnattr_setflags(&attributes, Int16(POSIX_SPAWN_SETPGROUP | POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF))

        var env: [String: String] = [:]
        var order: [String] = []
        let current: UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>? = environ
        if var p = current {
            while let entry = p.pointee {
                let s = String(cString: entry)
                if let eq = s.firstIndex(of: "=") {
                    let key = String(s[..<eq])
                    if env[key] == nil { order.append(key) }
                    env[key] = String(s[s.index(after: eq)...])
                }
                p += 1
            }
        }
        for (k, v) in environment.sorted(by: { $0.key < $1.key }) {
            if env[k] == nil { order.append(k) }
            env[k] = v
        }
        var cArguments: [UnsafeMutablePointer<CChar>?] = arguments.map { strdup($0) } + [nil]
        var cEnvironment: [UnsafeMutablePointer<CChar>?] = order.map { strdup("\($0)=\(env[$0]!)") } + [nil]
        defer { for p in cArguments + cEnvironment { free(p) } }

        var child: pid_t = 0
        let rc = posix_spawn(&child, executable, &actions, &attributes, &cArguments, &cEnvironment)
        if rc != 0 { throw Errno(rawValue: rc) }
        pid = child
        self.standardInput = parentEnds[0]
        self.standardOutput = parentEnds[1]
        self.standardError = parentEnds[2]
        closeParentEndsOnFailure = false
    }

    deinit {
        if termination == nil { _ = stop(signal: SIGKILL, grace: .zero, killWait: .seconds(10)) }
        standardInput?.close()
        standardOutput?.close()
        standardError?.close()
    }

    /// Closes the parent's end of the standard input pipe: the child reads end of file.
    public func closeStandardInput() {
        standardInput?.close()
        standardInput = nil
    }

    /// How the child ended, or nil while it runs. When it has just ended, the rest of its process
    /// group is killed and it is reaped.
    public var termination: Termination? {
        lock.withLock {
            if let ended { return ended }
            var info = siginfo_t()
            // WNOWAIT: the child stays a zombie, so its pid (our group id) cannot be reused
            // while the group is killed.
            guard waitid(P_PID, id_t(pid), &info, WEXITED | WNOHANG | WNOWAIT) == 0, info.si_signo == SIGCHLD else {
                return nil
            }
            _ = kill(-pid, SIGKILL)
            var status: Int32 = 0
            while waitpid(pid, &status, 0) < 0 && errno == EINTR {}
            // WIFEXITED / WEXITSTATUS / WTERMSIG, which Swift does not import.
            let t: Termination = status & 0x7F == 0 ? .exited((status >> 8) & 0xFF) : .signaled(status & 0x7F)
            ended = t
            return t
        }
    }

    public var isRunning: Bool { termination == nil }

    /// Sends a signal to the child (not its group); false once it has ended.
    @discardableResult
    public func signal(_ sig: Int32) -> Bool {
        lock.withLock { ended == nil && kill(pid, sig) == 0 }
    }

    /// Sends a signal to the child's whole process group; false once the child has ended.
    @discardableResult
    public func signalGroup(_ sig: Int32) -> Bool {
        lock.withLock { ended == nil && kill(-pid, sig) == 0 }
    }

    /// Waits at most `timeout` for the child to end.
    public func wait(timeout: Duration) -> Termination? {
        let deadline = ContinuousClock.now + timeout
        var pause = 1_000  // µs, doubling to 20 ms
        while true {
            if let t = termination { return t }
            if ContinuousClock.now >= deadline { return nil }
            usleep(UInt32(pause))
            pause = min(pause * 2, 20_000)
        }
    }

    /// Sends `signal` to the child, waits `grace`, then sends SIGKILL to its whole group and
    /// waits at most `killWait`. Returns how it ended; nil only when it survived SIGKILL that
    /// long (a process in uninterruptible sleep), which the caller should report.
    @discardableResult
    public func stop(signal sig: Int32 = SIGTERM, grace: Duration = .seconds(10), killWait: Duration = .seconds(10)) -> Termination? {
        if let t = termination { return t }
        if sig != SIGKILL {
            signal(sig)
            if let t = wait(timeout: grace) { return t }
        }
        signalGroup(SIGKILL)
        return wait(timeout: killWait)
    }

    /// What `run` collected.
    public struct Outcome: Sendable {
        /// How the child ended; nil when it survived SIGKILL (see `stop`).
        public var termination: Termination?
        public var standardOutput: [UInt8]
        public var standardError: [UInt8]
        /// The deadline passed and the child was stopped.
        public var timedOut: Bool
        /// After the child ended, something outside its process group still held its output
        /// open and reading was abandoned.
        public var outputAbandoned: Bool
    }

    /// Runs a program to completion: writes `input` to its standard input, collects its output
    /// and error, and stops it (SIGTERM, then SIGKILL to the group after `killGrace`) if it has
    /// not ended `timeout` after starting. Returns within about `timeout + killGrace + 12 s`
    /// whatever the child and its descendants do.
    public static func run(
        executable: String, arguments: [String], environment: [String: String] = [:],
        input: [UInt8]? = nil, timeout: Duration, killGrace: Duration = .seconds(2)
    ) throws(Errno) -> Outcome {
        let child = try ChildProcess(
            executable: executable, arguments: arguments, environment: environment,
            standardInput: input == nil ? .null : .pipe, standardOutput: .pipe, standardError: .pipe)
        return child.collect(input: input ?? [], timeout: timeout, killGrace: killGrace)
    }

    /// Collects the output of a child started with both output streams as pipes (see `run`).
    public func collect(input: [UInt8] = [], timeout: Duration, killGrace: Duration = .seconds(2)) -> Outcome {
        // Writing to a pipe whose reader has gone must give EPIPE, not kill the test process.
        // (The child gets SIGPIPE back at its default, see `init`.)
        Glibc.signal(SIGPIPE, SIG_IGN)
        var out: [UInt8] = [], err: [UInt8] = []
        // This function owns the standard input pipe from here on.
        var inputFD = standardInput.map { $0.rawValue } ?? -1
        standardInput = nil
        var written = 0
        if inputFD >= 0 {
            _ = fcntl(inputFD, F_SETFL, fcntl(inputFD, F_GETFL) | O_NONBLOCK)
            if input.isEmpty { _ = Glibc.close(inputFD); inputFD = -1 }
        }
        var readFDs = [standardOutput?.rawValue ?? -1, standardError?.rawValue ?? -1]
        let start = ContinuousClock.now
        let deadline = start + timeout
        var timedOut = false
        var drainUntil: ContinuousClock.Instant?
        var buffer = [UInt8](repeating: 0, count: 65536)
        while true {
            if termination != nil {
                // The group is dead; the pipes end at once unless an escaped descendant holds them.
                if drainUntil == nil { drainUntil = ContinuousClock.now + .seconds(2) }
                if readFDs.allSatisfy({ $0 < 0 }) || ContinuousClock.now >= drainUntil! { break }
            } else if ContinuousClock.now >= deadline {
                timedOut = true
                if stop(signal: SIGTERM, grace: killGrace, killWait: .seconds(10)) == nil { break }
                continue
            }
            var polls: [pollfd] = []
            if inputFD >= 0 { polls.append(pollfd(fd: inputFD, events: Int16(POLLOUT), revents: 0)) }
            for fd in readFDs where fd >= 0 { polls.append(pollfd(fd: fd, events: Int16(POLLIN), revents: 0)) }
            if polls.isEmpty {
                // Nothing to read: only wait for the end.
                _ = wait(timeout: min(deadline - ContinuousClock.now, .milliseconds(20)))
                continue
            }
            let n = poll(&polls, nfds_t(polls.count), 20)
            if n <= 0 { continue }
            for p in polls where p.revents != 0 {
                if p.fd == inputFD {
                    let k = input.withUnsafeBytes { b in Glibc.write(inputFD, b.baseAddress! + written, b.count - written) }
                    if k > 0 { written += k }
                    if (k < 0 && errno != EAGAIN && errno != EINTR) || written == input.count {
                        _ = Glibc.close(inputFD)
                        inputFD = -1
                    }
                } else if let slot = readFDs.firstIndex(of: p.fd) {
                    let k = buffer.withUnsafeMutableBytes { Glibc.read(p.fd, $0.baseAddress, $0.count) }
                    if k > 0 {
                        if slot == 0 { out += buffer[0..<k] } else { err += buffer[0..<k] }
                    } else if k == 0 || (errno != EAGAIN && errno != EINTR) {
                        readFDs[slot] = -1  // the parent's end is closed by deinit
                    }
                }
            }
        }
        if inputFD >= 0 { _ = Glibc.close(inputFD) }
        return Outcome(
            termination: termination, standardOutput: out, standardError: err, timedOut: timedOut,
            outputAbandoned: readFDs.contains { $0 >= 0 })
    }
}

extension ChildProcess {
    /// Gives a process that another component started and will reap (libnbd's
    /// `nbd_connect_command` child, which `nbd_close` waits for without a limit) a deadline: if
    /// it has not ended `timeout` from now it is sent SIGTERM, and SIGKILL `killGrace` later.
    /// The process is watched through a pidfd, so a reaped and reused pid is never signalled.
    /// Returns false when the process could not be watched (already gone).
    @discardableResult
    public static func enforceDeadline(pid: pid_t, timeout: Duration, killGrace: Duration = .seconds(5)) -> Bool {
        let fd = pmem_pidfd_open(pid)
        if fd < 0 { return false }
        let first = ChildProcess.milliseconds(timeout), second = ChildProcess.milliseconds(killGrace)
        OSThread.spawn {
            defer { _ = Glibc.close(fd) }
            func ended(within ms: Int32) -> Bool {
                var p = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
                let deadline = ContinuousClock.now + .milliseconds(Int(ms))
                while true {
                    let left = deadline - ContinuousClock.now
                    let n = poll(&p, 1, max(0, ChildProcess.milliseconds(left)))
                    if n > 0 { return true }
                    if n == 0 { return false }
                    if errno != EINTR { return true }
                }
            }
            if ended(within: first) { return }
            _ = pmem_pidfd_send_signal(fd, SIGTERM)
            if ended(within: second) { return }
            _ = pmem_pidfd_send_signal(fd, SIGKILL)
        }
        return true
    }

    fileprivate static func milliseconds(_ d: Duration) -> Int32 {
        Int32(clamping: d.components.seconds * 1000 + d.components.attoseconds / 1_000_000_000_000_000)
    }
}
