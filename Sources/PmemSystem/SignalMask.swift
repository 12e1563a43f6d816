import Glibc

/// The calling thread's signal mask.
public enum SignalMask {
    /// Unblocks every signal in the calling thread (`pthread_sigmask(SIG_SETMASK, ∅)`).
    ///
    /// A process inherits its parent's mask across `exec`; test runners and some supervisors
    /// spawn children with SIGTERM and SIGINT blocked, which would make `kill` a no-op. Call this
    /// first thing in `main`, before any thread exists, so every thread starts from an empty mask.
    public static func unblockAll() {
        var none = sigset_t()
        sigemptyset(&none)
        pthread_sigmask(SIG_SETMASK, &none, nil)
    }
}
