import Foundation
import PmemPool
import PmemVolumes
import Testing

/// Crash consistency, tested not argued: crash states at every fence and sync of the write,
/// trim, write-zeroes, flush, commit and recovery paths, each recovered and checked.
/// `PMEM_NBD_CRASH_STATES=200000 scripts/test --filter CrashStateTests` runs a longer search.
@Suite(.serialized, .timeLimit(.minutes(15))) struct CrashStateTests {
    static var target: Int { Int(ProcessInfo.processInfo.environment["PMEM_NBD_CRASH_STATES"] ?? "") ?? 6000 }

    func explore(_ domain: Persistence.Domain, states: Int, firstSeed: UInt64, snapshots: Bool = false) throws -> (Int, Int, [String]) {
        var total = 0, points = 0
        var violations: [String] = []
        var seed = firstSeed
        while total < states {
            let h = CrashHarness(.init(domain: domain, seed: seed, snapshots: snapshots))
            try h.run(maxStates: states - total)
            total += h.distinct.count
            points += h.points
            if ProcessInfo.processInfo.environment["PMEM_NBD_CRASH_PHASES"] != nil { print("seed \(seed) phases: \(h.phases.sorted { $0.key < $1.key })") }
            violations += h.violations
            seed += 1
            if !violations.isEmpty { break }
        }
        return (total, points, violations)
    }

    @Test func cacheLinePersistence() throws {
        let (states, points, violations) = try explore(.cacheline, states: CrashStateTests.target, firstSeed: 1)
        print("cache-line crash states: \(states) distinct at \(points) crash points, \(violations.count) violations")
        #expect(violations.isEmpty, "\(violations.prefix(5))")
        #expect(states >= CrashStateTests.target)
    }

    /// Snapshot create and delete (with the background release of blocks), clone and rollback
    /// mixed into the workload: snapshots and clones keep their exact contents, deleted ones
    /// stay deleted, and a rollback is all or nothing.
    @Test func snapshotOperations() throws {
        let (states, points, violations) = try explore(.cacheline, states: CrashStateTests.target / 2, firstSeed: 2000, snapshots: true)
        print("snapshot crash states: \(states) distinct at \(points) crash points, \(violations.count) violations")
        #expect(violations.isEmpty, "\(violations.prefix(5))")
        #expect(states >= CrashStateTests.target / 2)
    }

    /// The harness is only worth something if it fails on a broken engine: each deliberate
    /// ordering bug must produce violations.
    @Test(arguments: [(Persistence.Domain.cacheline, PoolEngine.Faults.skipWriterFence),
                      (Persistence.Domain.page, PoolEngine.Faults.skipDataSync),
                      (Persistence.Domain.cacheline, PoolEngine.Faults.applyBeforeJournal)])
    func brokenOrderingIsCaught(domain: Persistence.Domain, fault: PoolEngine.Faults) throws {
        var found: [String] = []
        for seed in UInt64(1)...6 where found.isEmpty {
            let h = CrashHarness(.init(domain: domain, seed: 500 + seed, faults: fault))
            try h.run(maxStates: 4000)
            found = h.violations
        }
        print("fault \(fault.rawValue) in \(domain): \(found.first ?? "not caught")")
        #expect(!found.isEmpty, "the crash-state search did not notice fault \(fault.rawValue)")
    }

    @Test func pagePersistence() throws {
        let (states, points, violations) = try explore(.page, states: CrashStateTests.target, firstSeed: 1000)
        print("page crash states: \(states) distinct at \(points) crash points, \(violations.count) violations")
        #expect(violations.isEmpty, "\(violations.prefix(5))")
        #expect(states >= CrashStateTests.target)
    }
}
