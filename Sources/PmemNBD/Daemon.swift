import Glibc
import PmemSystem

/// `pmem-nbd serve --fork`: the process forks before anything else happens — before any
/// thread exists, since `fork(2)` copies only the calling thread and a multi-threaded Swift
/// process (Dispatch, the runtime's locks) is unsafe in the child. The child opens the pool,
/// listens, writes the pid file, and then reports readiness over a pipe; the parent, which has
/// waited on that pipe, exits 0 only then, so `pmem-nbd serve --fork … && nbdinfo …` has no
/// race. If the child fails first, the parent exits with the child's status.
public final class Daemon {
    private var notify: FileDescriptor?

    private init(notify: FileDescriptor) { self.notify = notify }

    /// Forks. In the parent this never returns; in the child (a new session leader) it returns
    /// the handle to call `ready` on.
    public static func forkIntoBackground() throws -> Daemon {
        guard let threads = ProcessControl.threadCount(), threads == 1 else {
            throw ServeError("--fork: the process already runs \(ProcessControl.threadCount().map(String.init) ?? "several") threads; refusing to fork")
        }
        fflush(nil)  // stdio buffers would otherwise be written twice, by parent and child
        let (readEnd, writeEnd) = try ProcessControl.pipe()
        let pid = try ProcessControl.fork()
        if pid > 0 {
            writeEnd.close()
            var byte: UInt8 = 0
            let n = (try? withUnsafeMutableBytes(of: &byte) { (b) throws(Errno) in try readEnd.read(into: b) }) ?? 0
            if n == 1 { ProcessControl.exitImmediately(0) }
            // The child ended (or closed the pipe) without being ready: its status is ours.
            let status = (try? ProcessControl.wait(for: pid))?.shellStatus ?? 1
            ProcessControl.exitImmediately(status == 0 ? 1 : status)
        }
        readEnd.close()
        try ProcessControl.newSession()
        // Hold nothing of whoever started us (a supervisor may be waiting for its descriptors
        // to close), except sockets passed for activation, which are now this process's.
        var keep: Set<Int32> = [writeEnd.rawValue]
        let activated = SocketActivation.passedDescriptors(toPid: getppid())
        keep.formUnion(activated)
        if !activated.isEmpty { setenv("LISTEN_PID", String(getpid()), 1) }
        ProcessControl.closeDescriptors(keeping: keep)
        return Daemon(notify: writeEnd)
    }

    /// Tells the waiting parent the server is serving (it exits 0), after pointing standard
    /// input and output — and standard error unless `keepStandardError` — at /dev/null, so
    /// whoever started the command is not held by the daemon's copies of them.
    public func ready(keepStandardError: Bool) {
        guard let fd = notify else { return }
        do { try ProcessControl.detachStandardStreams(includingError: !keepStandardError) } catch {
            Log.warning("--fork: cannot detach standard streams: \(error)")
        }
        var byte: UInt8 = 1
        _ = try? withUnsafeBytes(of: &byte) { (b) throws(Errno) in try fd.write(b) }
        fd.close()
        notify = nil
    }
}
