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

extension SignalMask {
    /// Blocks `signals` in the calling thread, and so in every thread it creates from now on:
    /// they stay pending until `waitOnThread` takes them. Call before any thread exists that
    /// should not see them (a signal is never lost or ignored in between).
    public static func block(_ signals: [Int32]) {
        var set = sigset_t()
        sigemptyset(&set)
        for s in signals { sigaddset(&set, s) }
        pthread_sigmask(SIG_BLOCK, &set, nil)
    }

    /// Takes `signals` (blocked with `block`) with `sigwait(3)` on a thread of its own and calls
    /// `handler` with each; a signal that arrived before the thread started is taken at once.
    public static func waitOnThread(for signals: [Int32], _ handler: @escaping @Sendable (Int32) -> Void) {
        OSThread.spawn(name: "pmem-signals") {
            var set = sigset_t()
            sigemptyset(&set)
            for s in signals { sigaddset(&set, s) }
            while true {
                var signal: Int32 = 0
                if sigwait(&set, &signal) == 0 { handler(signal) }
            }
        }
    }
}
