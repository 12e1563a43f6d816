import CPmemSupport
import Glibc

/// Starts detached POSIX threads that run a closure: the one way this project starts a thread
/// (connection readers use dedicated threads — blocking I/O with deep queues — rather than a
/// shared executor; short jobs go to `Workers`, whose threads come from here too).
///
/// The `pthread_t` never leaves this function: a detached thread may have run to its end, and
/// its `pthread_t` been reused, by the time `pthread_create` returns, so nothing is done with it
/// afterwards. The new thread names itself (`pthread_self()`) before it runs the body.
public enum OSThread {
    private final class Box {
        let body: () -> Void
        /// The thread's name as a C string (at most 15 bytes and the NUL), or empty.
        let name: [CChar]
        init(_ body: @escaping () -> Void, name: String?) {
            self.body = body
            // Whole characters only (a multi-byte one that does not fit is left out).
            var bytes: [CChar] = []
            for scalar in (name ?? "").unicodeScalars {
                let utf8 = Array(String(scalar).utf8)
                guard bytes.count + utf8.count <= 15 else { break }
                bytes += utf8.map { CChar(bitPattern: $0) }
            }
            self.name = bytes + [0]
        }
    }

    /// `pthread_create` of a detached thread; `stackSize` in bytes.
    public static func spawn(name: String? = nil, stackSize: Int = 1 << 20, _ body: @escaping @Sendable () -> Void) {
        // The retained box is the new thread's to release; if the thread is never made, ours.
        let box = Unmanaged.passRetained(Box(body, name: name)).toOpaque()
        var attr = pthread_attr_t()
        pthread_attr_init(&attr)
        pthread_attr_setstacksize(&attr, stackSize)
        pthread_attr_setdetachstate(&attr, Int32(PTHREAD_CREATE_DETACHED))
        var tid = pthread_t()
        let rc = pthread_create(&tid, &attr, { arg in
            let box = Unmanaged<Box>.fromOpaque(arg!).takeRetainedValue()
            if box.name.count > 1 { box.name.withUnsafeBufferPointer { _ = pmem_set_thread_name(pthread_self(), $0.baseAddress!) } }
            box.body()
            return nil
        }, box)
        pthread_attr_destroy(&attr)
        if rc != 0 {
            Unmanaged<Box>.fromOpaque(box).release()
            fatalError("pthread_create failed: \(Errno(rawValue: rc))")
        }
    }
}

extension OSThread {
    /// The kernel's id of the calling thread (`gettid(2)`).
    public static var currentID: Int32 { pmem_gettid() }
}

/// A pool of worker threads (started with `OSThread`) for short jobs that may block, such as
/// a FLUSH's sync: a job runs on an idle worker, or on a new one while fewer than `maxThreads`
/// exist; beyond that it waits in a queue. Workers idle for `idleSeconds` end.
public final class Workers: @unchecked Sendable {
    private let condition = PosixCondition()
    private var queue: [() -> Void] = []
    private var head = 0
    private var threads = 0
    private var idle = 0
    private let maxThreads: Int
    private let idleSeconds: Double
    private let name: String

    /// The process-wide pool connections offload to.
    public static let shared = Workers(name: "pmem-worker", maxThreads: 64)

    public init(name: String, maxThreads: Int, idleSeconds: Double = 10) {
        self.name = name
        self.maxThreads = maxThreads
        self.idleSeconds = idleSeconds
    }

    /// Runs `job` on a worker thread.
    public func run(_ job: @escaping @Sendable () -> Void) {
        condition.lock()
        queue.append(job)
        // Each idle worker takes one queued job; more jobs than that start a thread.
        let start = queue.count - head > idle && threads < maxThreads
        if start { threads += 1 } else { condition.signal() }
        condition.unlock()
        if start { OSThread.spawn(name: name) { [self] in work() } }
    }

    /// Worker threads that exist now (for tests).
    public var threadCount: Int { condition.withLock { threads } }

    private func work() {
        condition.lock()
        while true {
            if head < queue.count {
                let job = queue[head]
                head += 1
                if head == queue.count { queue.removeAll(keepingCapacity: true); head = 0 }
                condition.unlock()
                job()
                condition.lock()
                continue
            }
            idle += 1
            let woken = condition.wait(seconds: idleSeconds)
            idle -= 1
            if !woken && head == queue.count { break }
        }
        threads -= 1
        condition.unlock()
    }
}

/// A counter other threads can wait on reaching zero (used for draining connections).
public final class WaitGroup: @unchecked Sendable {
    private var count = 0
    private let condition = PosixCondition()

    public init() {}

    public func enter() {
        condition.withLock { count += 1 }
    }

    public func leave() {
        condition.withLock {
            count -= 1
            if count == 0 { condition.broadcast() }
        }
    }

    public var current: Int { condition.withLock { count } }

    /// Blocks until the count is zero or the timeout passes; returns whether it reached zero.
    @discardableResult
    public func wait(timeoutSeconds: Double = .infinity) -> Bool {
        condition.lock()
        defer { condition.unlock() }
        if timeoutSeconds.isInfinite {
            while count > 0 { condition.wait() }
            return true
        }
        let deadline = MonotonicClock.nanoseconds() &+ UInt64(max(0, timeoutSeconds) * 1e9)
        while count > 0 {
            let now = MonotonicClock.nanoseconds()
            if now >= deadline { return false }
            _ = condition.wait(seconds: Double(deadline - now) / 1e9)
        }
        return true
    }
}
