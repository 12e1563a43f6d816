import CPmemSupport
import Glibc

/// Starts detached POSIX threads that run a closure. Connection readers use dedicated
/// threads (blocking I/O with deep queues) rather than a shared executor.
public enum OSThread {
    private final class Box {
        let body: () -> Void
        init(_ body: @escaping () -> Void) { self.body = body }
    }

    /// `pthread_create` + `pthread_detach`; `stackSize` in bytes.
    public static func spawn(name: String? = nil, stackSize: Int = 1 << 20, _ body: @escaping @Sendable () -> Void) {
        let box = Unmanaged.passRetained(Box(body)).toOpaque()
        var attr = pthread_attr_t()
        pthread_attr_init(&attr)
        pthread_attr_setstacksize(&attr, stackSize)
        pthread_attr_setdetachstate(&attr, Int32(PTHREAD_CREATE_DETACHED))
        var tid = pthread_t()
        let rc = pthread_create(&tid, &attr, { arg in
            let box = Unmanaged<Box>.fromOpaque(arg!).takeRetainedValue()
            box.body()
            return nil
        }, box)
        pthread_attr_destroy(&attr)
        if rc != 0 {
            Unmanaged<Box>.fromOpaque(box).release()
            fatalError("pthread_create failed: \(Errno(rawValue: rc))")
        }
        if let name { _ = pmem_set_thread_name(tid, String(name.prefix(15))) }
    }
}

/// A counter other threads can wait on reaching zero (used for draining connections).
public final class WaitGroup: @unchecked Sendable {
    private var count = 0
    private var mutex = pthread_mutex_t()
    private var cond = pthread_cond_t()

    public init() {
        pthread_mutex_init(&mutex, nil)
        pthread_cond_init(&cond, nil)
    }

    deinit {
        pthread_mutex_destroy(&mutex)
        pthread_cond_destroy(&cond)
    }

    public func enter() {
        pthread_mutex_lock(&mutex)
        count += 1
        pthread_mutex_unlock(&mutex)
    }

    public func leave() {
        pthread_mutex_lock(&mutex)
        count -= 1
        if count == 0 { pthread_cond_broadcast(&cond) }
        pthread_mutex_unlock(&mutex)
    }

    public var current: Int {
        pthread_mutex_lock(&mutex)
        defer { pthread_mutex_unlock(&mutex) }
        return count
    }

    /// Blocks until the count is zero or the timeout passes; returns whether it reached zero.
    @discardableResult
    public func wait(timeoutSeconds: Double = .infinity) -> Bool {
        pthread_mutex_lock(&mutex)
        defer { pthread_mutex_unlock(&mutex) }
        if timeoutSeconds.isInfinite {
            while count > 0 { pthread_cond_wait(&cond, &mutex) }
            return true
        }
        var now = timespec()
        clock_gettime(CLOCK_REALTIME, &now)
        let total = Double(now.tv_sec) + Double(now.tv_nsec) / 1e9 + timeoutSeconds
        var deadline = timespec(tv_sec: Int(total), tv_nsec: Int((total - Double(Int(total))) * 1e9))
        while count > 0 {
            if pthread_cond_timedwait(&cond, &mutex, &deadline) == ETIMEDOUT { return count == 0 }
        }
        return true
    }
}
