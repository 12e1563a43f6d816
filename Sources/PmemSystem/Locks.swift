import CPmemSupport
import Glibc

/// A pthread mutex in stable heap memory (never moved), for hot paths that must not allocate.
public final class PosixMutex: @unchecked Sendable {
    private let m: UnsafeMutablePointer<pthread_mutex_t>

    public init() {
        m = .allocate(capacity: 1)
        m.initialize(to: pthread_mutex_t())
        pthread_mutex_init(m, nil)
    }

    deinit {
        pthread_mutex_destroy(m)
        m.deallocate()
    }

    @inline(__always) public func lock() { pthread_mutex_lock(m) }
    @inline(__always) public func unlock() { pthread_mutex_unlock(m) }

    @inline(__always)
    public func withLock<T, E: Error>(_ body: () throws(E) -> T) throws(E) -> T {
        pthread_mutex_lock(m)
        defer { pthread_mutex_unlock(m) }
        return try body()
    }
}

/// A fixed number of pthread mutexes in one allocation that never moves (a lock striped by
/// hash, such as the journal's shards): no object per lock, no reference counting to reach one.
public struct PosixMutexes: ~Copyable, @unchecked Sendable {
    private let m: UnsafeMutablePointer<pthread_mutex_t>
    public let count: Int

    public init(count: Int) {
        precondition(count > 0)
        self.count = count
        m = .allocate(capacity: count)
        for i in 0..<count {
            (m + i).initialize(to: pthread_mutex_t())
            pthread_mutex_init(m + i, nil)
        }
    }

    deinit {
        for i in 0..<count { pthread_mutex_destroy(m + i) }
        m.deallocate()
    }

    @inline(__always) public func lock(_ i: Int) { pthread_mutex_lock(m + i) }
    @inline(__always) public func unlock(_ i: Int) { pthread_mutex_unlock(m + i) }

    @inline(__always)
    public func withLock<T, E: Error>(_ i: Int, _ body: () throws(E) -> T) throws(E) -> T {
        pthread_mutex_lock(m + i)
        defer { pthread_mutex_unlock(m + i) }
        return try body()
    }
}

/// A condition variable paired with a `PosixMutex`-like lock of its own.
public final class PosixCondition: @unchecked Sendable {
    private let m: UnsafeMutablePointer<pthread_mutex_t>
    private let c: UnsafeMutablePointer<pthread_cond_t>

    public init() {
        m = .allocate(capacity: 1)
        m.initialize(to: pthread_mutex_t())
        pthread_mutex_init(m, nil)
        c = .allocate(capacity: 1)
        c.initialize(to: pthread_cond_t())
        pthread_cond_init(c, nil)
    }

    deinit {
        pthread_cond_destroy(c)
        pthread_mutex_destroy(m)
        c.deallocate()
        m.deallocate()
    }

    @inline(__always) public func lock() { pthread_mutex_lock(m) }
    @inline(__always) public func unlock() { pthread_mutex_unlock(m) }
    public func broadcast() { pthread_cond_broadcast(c) }
    public func signal() { pthread_cond_signal(c) }
    /// Waits (the lock must be held).
    public func wait() { pthread_cond_wait(c, m) }

    /// Waits up to `seconds` (the lock must be held); false on timeout.
    public func wait(seconds: Double) -> Bool {
        var now = timespec()
        clock_gettime(CLOCK_REALTIME, &now)
        let total = Double(now.tv_sec) + Double(now.tv_nsec) / 1e9 + seconds
        var deadline = timespec(tv_sec: Int(total), tv_nsec: Int((total - Double(Int(total))) * 1e9))
        return pthread_cond_timedwait(c, m, &deadline) != ETIMEDOUT
    }

    @inline(__always)
    public func withLock<T, E: Error>(_ body: () throws(E) -> T) throws(E) -> T {
        pthread_mutex_lock(m)
        defer { pthread_mutex_unlock(m) }
        return try body()
    }
}

/// A writer-preferring reader/writer lock.
public final class ReadWriteLock: @unchecked Sendable {
    private let l: UnsafeMutablePointer<pthread_rwlock_t>

    public init() {
        l = .allocate(capacity: 1)
        l.initialize(to: pthread_rwlock_t())
        pmem_rwlock_init_writer_preferring(l)
    }

    deinit {
        pthread_rwlock_destroy(l)
        l.deallocate()
    }

    @inline(__always) public func readLock() { pthread_rwlock_rdlock(l) }
    @inline(__always) public func writeLock() { pthread_rwlock_wrlock(l) }
    @inline(__always) public func unlock() { pthread_rwlock_unlock(l) }
}

/// A value guarded by a pthread mutex (like `Synchronization.Mutex`, but a lock that
/// ThreadSanitizer understands, so sanitizer runs see the exclusion it provides).
public final class Locked<Value>: @unchecked Sendable {
    private let m = PosixMutex()
    private var value: Value

    public init(_ value: Value) { self.value = value }

    @inline(__always)
    public func withLock<T, E: Error>(_ body: (inout Value) throws(E) -> T) throws(E) -> T {
        m.lock()
        defer { m.unlock() }
        return try body(&value)
    }
}
