import CLibNBD
import Foundation
import Glibc
import PmemPool
import PmemSystem
@testable import TestSupport
import Testing

/// SIGKILL in the middle of a write workload that uses FUA and FLUSH; after a restart on the
/// same pool every acknowledged-durable write is there, every block holds one whole version,
/// and `check` is clean.
@Suite(.timeLimit(.minutes(5))) struct ProcessCrashTests {
    struct Model {
        var versions: [[UInt32]]
        var durable: [Int]
        /// Versions whose write completed, per block (index of the latest completed one).
        var completed: [Int]
        init(blocks: Int) {
            let zero = [UInt8](repeating: 0, count: 4096).withUnsafeBytes { PersistentMemory.crc32c($0) }
            versions = Array(repeating: [zero], count: blocks)
            durable = Array(repeating: 0, count: blocks)
            completed = Array(repeating: 0, count: blocks)
        }
    }

    /// Page mode twice: on a disk file system (/tmp here: written with pwrite) and on tmpfs
    /// (written through the mapping); cache-line mode on tmpfs.
    @Test(arguments: [("page", "/tmp"), ("page", "/dev/shm"), ("cacheline", "/dev/shm")])
    func sigkillLosesNothingAcknowledged(persistence: String, directory: String) throws {
        guard FileManager.default.fileExists(atPath: directory) else { return }
        let (lost, torn, unclean) = try killRounds(persistence: persistence, directory: directory, rounds: 3)
        #expect(lost == 0 && torn == 0 && unclean == 0)
    }

    /// Negative control: a server whose FLUSH and FUA return without committing
    /// (`PMEM_NBD_TEST_FAULTS`, `syncWithoutCommit`) loses acknowledged writes when killed,
    /// and this test's model must see it, in each mode.
    @Test(arguments: [("page", "/tmp"), ("page", "/dev/shm"), ("cacheline", "/dev/shm")])
    func sigkillCatchesAFlushThatDoesNotCommit(persistence: String, directory: String) throws {
        guard FileManager.default.fileExists(atPath: directory) else { return }
        var lost = 0
        for attempt in 0..<3 where lost == 0 {
            lost += try killRounds(persistence: persistence, directory: directory, rounds: 1, seed: UInt64(100 + attempt),
                                   environment: ["PMEM_NBD_TEST_FAULTS": "\(PoolEngine.Faults.syncWithoutCommit.rawValue)"]).lost
        }
        #expect(lost > 0, "SIGKILL of a server that acknowledges FLUSH without committing lost nothing the test saw")
    }

    /// Runs `rounds` rounds of: serve, write with FUA and FLUSH, SIGKILL, check, restart and
    /// read back. Returns the blocks that lost an acknowledged version, the torn ones, and
    /// the rounds whose pool `check` did not pass.
    func killRounds(persistence: String, directory: String, rounds: Int, seed: UInt64? = nil,
                    environment: [String: String] = [:]) throws -> (lost: Int, torn: Int, unclean: Int) {
        var totalLost = 0, totalTorn = 0, unclean = 0
        let blocks = 2048
        let scratch = ScratchDirectory()
        var rng = SplitMix64(seed: seed ?? UInt64(persistence.count + directory.count))
        for round in 0..<rounds {
            let pool = "\(directory)/pmem-nbd-kill-\(getpid())-\(persistence)-\(round)-\(rng.next() % 1_000_000).pool"
            defer { unlink(pool) }
            let sock = scratch.file("k\(round).sock")
            let args = ["serve", pool, "--create", "64M", "-U", sock, "--persistence", persistence]
            let server = try ServerProcess(args, environment: environment)
            #expect(server.waitForSocket(sock))
            var model = Model(blocks: blocks)
            let killAfter = 0.15 + Double(rng.next() % 500) / 1000
            let h = try connectWhenReady(sock)
            let pid = server.pid
            OSThread.spawn(name: "killer") {
                usleep(UInt32(killAfter * 1e6))
                kill(pid, SIGKILL)
            }
            let started = Date()
            var inFlight: [Int64: (block: Int, version: Int, fua: Bool)] = [:]
            var busy = Set<Int>()
            var flushes: [Int64: [Int]] = [:]
            var buffers: [Int64: UnsafeMutableRawBufferPointer] = [:]
            var acknowledged = 0
            workload: while true {
                if Date().timeIntervalSince(started) > killAfter + 20 {
                    Issue.record("the server was not killed in time")
                    break
                }
                while inFlight.count < 16 {
                    var b = Int(rng.next() % UInt64(blocks))
                    while busy.contains(b) { b = Int(rng.next() % UInt64(blocks)) }
                    let buf = UnsafeMutableRawBufferPointer.allocate(byteCount: 4096, alignment: 8)
                    let data = pattern(4096, seed: rng.next())
                    data.withUnsafeBytes { buf.copyMemory(from: $0) }
                    let fua = rng.next() % 4 == 0
                    model.versions[b].append(PersistentMemory.crc32c(UnsafeRawBufferPointer(buf)))
                    guard let cookie = try? h.aioPwrite(UnsafeRawBufferPointer(buf), offset: UInt64(b) << 12, flags: fua ? LibNBDFlags.fua : 0) else {
                        buf.deallocate()
                        break workload
                    }
                    inFlight[cookie] = (b, model.versions[b].count - 1, fua)
                    buffers[cookie] = buf
                    busy.insert(b)
                }
                if acknowledged % 32 == 31 && flushes.isEmpty {
                    // Everything completed so far must be durable when this FLUSH is acknowledged.
                    guard let cookie = try? h.aioFlush() else { break }
                    flushes[cookie] = model.completed
                }
                if (try? h.poll(timeoutMilliseconds: 1000)) == nil { break }
                for (cookie, w) in inFlight {
                    guard let done = try? h.completed(cookie) else { break workload }
                    if done {
                        inFlight[cookie] = nil
                        buffers.removeValue(forKey: cookie)?.deallocate()
                        busy.remove(w.block)
                        model.completed[w.block] = max(model.completed[w.block], w.version)
                        if w.fua { model.durable[w.block] = max(model.durable[w.block], w.version) }
                        acknowledged += 1
                    }
                }
                for (cookie, snapshot) in flushes {
                    guard let done = try? h.completed(cookie) else { break workload }
                    if done {
                        flushes[cookie] = nil
                        for b in 0..<blocks { model.durable[b] = max(model.durable[b], snapshot[b]) }
                    }
                }
            }
            for (_, buf) in buffers { buf.deallocate() }
            #expect(server.stop(signal: SIGKILL) != 0)
            #expect(acknowledged > 0)
            let check = try run([pmemNBDBinary, "check", pool])
            if check.status != 0 { unclean += 1 }
            #expect(environment.isEmpty ? check.status == 0 : true, "check after SIGKILL: \(check.stdout)")
            // Restart and verify.
            let again = try ServerProcess(["serve", pool, "-U", sock, "--persistence", persistence], environment: environment)
            #expect(again.waitForSocket(sock))
            let r = try connectWhenReady(sock)
            var lost = 0, torn = 0
            for b in 0..<blocks {
                let data = try r.pread(count: 4096, offset: UInt64(b) << 12)
                let crc = data.withUnsafeBytes { PersistentMemory.crc32c($0) }
                if !model.versions[b][model.durable[b]...].contains(crc) {
                    if model.versions[b][..<model.durable[b]].contains(crc) { lost += 1 } else { torn += 1 }
                }
            }
            print("\(persistence) in \(directory)\(environment.isEmpty ? "" : " \(environment)") round \(round): killed after \(Int(killAfter * 1000)) ms, \(acknowledged) writes acknowledged, \(lost) lost, \(torn) torn")
            totalLost += lost
            totalTorn += torn
            #expect(again.stop() == 0)
        }
        return (totalLost, totalTorn, unclean)
    }
}
