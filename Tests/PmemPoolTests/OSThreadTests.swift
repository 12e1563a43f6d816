import Foundation
import Glibc
import PmemSystem
import Testing

/// `OSThread` (the one way threads start) and `Workers` (the pool offloaded FLUSHes run on).
@Suite(.timeLimit(.minutes(5))) struct OSThreadTests {
    /// The calling thread's name, as the kernel has it (/proc/thread-self/comm).
    static func currentName() -> String {
        guard let fd = try? FileDescriptor.open("/proc/thread-self/comm", O_RDONLY) else { return "?" }
        defer { fd.close() }
        let bytes = (try? fd.read(at: 0, count: 64)) ?? []
        return String(decoding: bytes.prefix { $0 != 10 }, as: UTF8.self)
    }

    /// A thread has its name before its body runs (it names itself; nothing is done with its
    /// `pthread_t` after `pthread_create`, when a detached thread may already be gone): checked
    /// on 2000 threads that end at once. Names are cut to 15 bytes on a character boundary.
    @Test(.timeLimit(.minutes(1))) func threadsAreNamedBeforeTheyRun() throws {
        let wrong = Locked<[String]>([])
        let done = WaitGroup()
        for i in 0..<2000 {
            done.enter()
            OSThread.spawn(name: "t-\(i)") {
                let name = OSThreadTests.currentName()
                if name != "t-\(i)" { wrong.withLock { $0.append(name) } }
                done.leave()
            }
        }
        #expect(done.wait(timeoutSeconds: 30))
        #expect(wrong.withLock { $0 }.isEmpty, "\(wrong.withLock { $0.prefix(5) })")
        let named = Locked<String>("")
        let one = WaitGroup()
        one.enter()
        OSThread.spawn(name: "pmem-ééééééééé") {
            named.withLock { $0 = OSThreadTests.currentName() }
            one.leave()
        }
        #expect(one.wait(timeoutSeconds: 10))
        #expect(named.withLock { $0 } == "pmem-ééééé", "15 bytes, whole characters")
    }

    /// Jobs run at once on separate threads up to the pool's maximum, then queue; idle threads end.
    @Test(.timeLimit(.minutes(1))) func workersRunJobsConcurrentlyUpToTheirMaximum() throws {
        let workers = Workers(name: "test-worker", maxThreads: 3, idleSeconds: 0.2)
        let running = Locked(0), peak = Locked(0)
        let done = WaitGroup()
        for _ in 0..<12 {
            done.enter()
            workers.run {
                let now = running.withLock { $0 += 1; return $0 }
                peak.withLock { $0 = max($0, now) }
                usleep(50_000)
                running.withLock { $0 -= 1 }
                done.leave()
            }
        }
        #expect(done.wait(timeoutSeconds: 20))
        #expect(peak.withLock { $0 } == 3, "three jobs at once, never more")
        let deadline = Date().addingTimeInterval(5)
        while workers.threadCount > 0 && Date() < deadline { usleep(20_000) }
        #expect(workers.threadCount == 0, "idle workers end")
        // And it starts threads again afterwards.
        done.enter()
        workers.run { done.leave() }
        #expect(done.wait(timeoutSeconds: 10))
    }
}
