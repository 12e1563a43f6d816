import Glibc
import PmemSystem

/// systemd socket activation: listening descriptors 3… passed with LISTEN_PID/LISTEN_FDS.
public enum SocketActivation {
    public static let firstDescriptor: Int32 = 3

    /// The descriptors LISTEN_PID/LISTEN_FDS pass to process `pid` (none when they name
    /// another process).
    static func passedDescriptors(toPid pid: pid_t) -> [Int32] {
        guard let pidText = getenv("LISTEN_PID").map({ String(cString: $0) }), Int32(pidText) == pid,
              let fdsText = getenv("LISTEN_FDS").map({ String(cString: $0) }), let count = Int32(fdsText), count > 0 else { return [] }
        return Array(firstDescriptor..<(firstDescriptor + count))
    }

    /// The inherited listening sockets, or an empty list when none were passed to this process.
    /// The variables are removed from the environment so children do not inherit them.
    public static func inheritedSockets() -> [FileDescriptor] {
        guard let pidText = getenv("LISTEN_PID").map({ String(cString: $0) }),
              let fdsText = getenv("LISTEN_FDS").map({ String(cString: $0) }),
              let pid = Int32(pidText), pid == getpid(), let count = Int32(fdsText), count > 0 else { return [] }
        unsetenv("LISTEN_PID")
        unsetenv("LISTEN_FDS")
        unsetenv("LISTEN_FDNAMES")
        var fds: [FileDescriptor] = []
        for fd in firstDescriptor..<(firstDescriptor + count) {
            _ = fcntl(fd, F_SETFD, FD_CLOEXEC)
            let d = FileDescriptor(rawValue: fd)
            if Socket.isListening(d) {
                fds.append(d)
            } else {
                Log.warning("inherited descriptor \(fd) is not a listening socket; ignoring it")
            }
        }
        return fds
    }
}
