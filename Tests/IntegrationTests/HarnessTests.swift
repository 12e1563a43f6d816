import Dispatch
import Foundation
import Glibc
import PmemSystem
@testable import TestSupport
import Testing

/// The test harness cannot hang: every process a test starts (`ChildProcess`, `run`,
/// `ServerProcess`, libnbd's command children) ends by a deadline and is reaped, whatever it
/// does — ignore SIGTERM, never exit, leave a grandchild holding its output open.
///
/// Negative control: the Foundation `Process`-based `run` these tests used before (kept below as
/// `foundationRun`, verbatim) is shown to hang on the same children, with the child already a
/// zombie — the state a whole `swift test` run once stayed in for 9 minutes.
@Suite(.timeLimit(.minutes(3))) struct HarnessTests {
    /// Runs `body` on a thread of its own and waits at most `limit` for it; whether it returned.
    /// This is the checker: a helper that blocks shows up as `false` instead of hanging the test.
    static func returns(within limit: Duration, _ body: @escaping @Sendable () -> Void) -> Bool {
        let done = DispatchSemaphore(value: 0)
        OSThread.spawn {
            body()
            done.signal()
        }
        return done.wait(timeout: .now() + .milliseconds(Int(limit.components.seconds * 1000))) == .success
    }

    /// The state letter of a process from /proc (R, S, D, Z, …), nil when it is gone.
    static func state(_ pid: pid_t) -> Character? {
        guard let stat = try? String(contentsOfFile: "/proc/\(pid)/stat", encoding: .utf8),
              let close = stat.lastIndex(of: ")") else { return nil }
        return stat[stat.index(close, offsetBy: 2)]
    }

    /// Whether a process has ended (gone, or a zombie) within `limit`: a process sent SIGKILL
    /// closes its descriptors a moment before it becomes a zombie.
    static func ended(_ pid: pid_t, within limit: Duration = .seconds(5)) -> Bool {
        let deadline = ContinuousClock.now + limit
        while ContinuousClock.now < deadline {
            if (state(pid).map { $0 == "Z" } ?? true) { return true }
            usleep(10_000)
        }
        return false
    }

    /// Whether no member of a process group runs any more within `limit`.
    static func groupEnded(_ pgid: pid_t, within limit: Duration = .seconds(5)) -> Bool {
        let deadline = ContinuousClock.now + limit
        while ContinuousClock.now < deadline {
            if liveMembers(ofGroup: pgid).isEmpty { return true }
            usleep(10_000)
        }
        return false
    }

    /// The parent pid of a process, nil when it is gone.
    static func parent(_ pid: pid_t) -> pid_t? {
        guard let stat = try? String(contentsOfFile: "/proc/\(pid)/stat", encoding: .utf8),
              let close = stat.lastIndex(of: ")") else { return nil }
        return pid_t(stat[stat.index(close, offsetBy: 2)...].split(separator: " ")[1])
    }

    /// Members of a process group that are still running (not zombies).
    static func liveMembers(ofGroup pgid: pid_t) -> [pid_t] {
        let entries = (try? FileManager.default.contentsOfDirectory(atPath: "/proc")) ?? []
        return entries.compactMap { pid_t($0) }.filter { pid in
            guard let stat = try? String(contentsOfFile: "/proc/\(pid)/stat", encoding: .utf8),
                  let close = stat.lastIndex(of: ")") else { return false }
            let fields = stat[stat.index(close, offsetBy: 2)...].split(separator: " ")
            return fields.count > 2 && pid_t(fields[2]) == pgid && fields[0] != "Z"
        }
    }

    /// The child was reaped by us: waitpid knows no such child, and it is no zombie of ours.
    static func reaped(_ pid: pid_t) -> Bool {
        var status: Int32 = 0
        let r = waitpid(pid, &status, WNOHANG)
        return r < 0 && errno == ECHILD && !(state(pid) == "Z" && parent(pid) == getpid())
    }

    static let sh = "/bin/sh"

    @Test func childThatIgnoresSIGTERMIsKilledAndReaped() throws {
        let child = try ChildProcess(executable: Self.sh, arguments: [Self.sh, "-c", "trap '' TERM; echo ready; while :; do sleep 1; done"],
                                     standardOutput: .pipe)
        var buffer: [UInt8] = []
        #expect(readLinesFrom(child.standardOutput!.rawValue, count: 1, buffer: &buffer, timeout: 10) == ["ready"])
        let start = ContinuousClock.now
        let ended = child.stop(signal: SIGTERM, grace: .seconds(1))
        let took = ContinuousClock.now - start
        #expect(ended == .signaled(SIGKILL))
        #expect(took < .seconds(5), "stop took \(took)")
        #expect(Self.reaped(child.pid))
        #expect(Self.groupEnded(child.pid), "the sleeping grandchild survived")
    }

    @Test func childThatNeverExitsIsStoppedAtTheDeadline() throws {
        let start = ContinuousClock.now
        let plain = try ChildProcess.run(executable: Self.sh, arguments: [Self.sh, "-c", "echo started; exec sleep 1000"], timeout: .seconds(2))
        #expect(plain.timedOut && plain.termination == .signaled(SIGTERM))
        #expect(String(decoding: plain.standardOutput, as: UTF8.self) == "started\n")
        // Ignoring SIGTERM only earns it SIGKILL `killGrace` later.
        let stubborn = try ChildProcess.run(executable: Self.sh, arguments: [Self.sh, "-c", "trap '' TERM; while :; do :; done"],
                                            timeout: .seconds(2), killGrace: .seconds(1))
        #expect(stubborn.timedOut && stubborn.termination == .signaled(SIGKILL))
        #expect(ContinuousClock.now - start < .seconds(12))
    }

    @Test func grandchildHoldingTheOutputPipeDoesNotKeepTheCallerWaiting() throws {
        // The shell exits at once; the sleep it left behind holds standard output and error.
        let start = ContinuousClock.now
        let r = try ChildProcess.run(executable: Self.sh, arguments: [Self.sh, "-c", "sleep 1000 & echo $!; exit 3"], timeout: .seconds(60))
        let took = ContinuousClock.now - start
        #expect(!r.timedOut && r.termination == .exited(3) && !r.outputAbandoned)
        #expect(took < .seconds(5), "took \(took)")
        let grandchild = try #require(pid_t(String(decoding: r.standardOutput, as: UTF8.self).trimmingCharacters(in: .whitespacesAndNewlines)))
        // It was in the child's process group, which is killed when the child ends.
        let ended = Self.ended(grandchild)
        #expect(ended, "the grandchild \(grandchild) still runs")
        if !ended { kill(grandchild, SIGKILL) }
    }

    @Test func grandchildThatLeftTheGroupCostsAtMostTheDrainTime() throws {
        // setsid: a new session, out of reach of the group kill, still holding the pipes.
        let start = ContinuousClock.now
        let r = try ChildProcess.run(executable: Self.sh, arguments: [Self.sh, "-c", "setsid sleep 1000 & sleep 1; echo $!; exit 0"], timeout: .seconds(60))
        let took = ContinuousClock.now - start
        defer { if let g = pid_t(String(decoding: r.standardOutput, as: UTF8.self).trimmingCharacters(in: .whitespacesAndNewlines)) { kill(g, SIGKILL) } }
        #expect(!r.timedOut && r.termination == .exited(0))
        #expect(r.outputAbandoned)
        #expect(took < .seconds(6), "took \(took)")
    }

    @Test func runReapsAndKillsLeftoversWhenTheChildEnds() throws {
        // Through the tests' `run`: a tool that leaves a background job behind.
        let d = ScratchDirectory()
        let pidFile = d.file("grandchild.pid")
        let r = try run([Self.sh, "-c", "sleep 1000 & echo $! > \(pidFile); echo done"], timeout: 30)
        #expect(r.status == 0 && r.stdout == "done\n")
        let grandchild = try #require(pid_t((try String(contentsOfFile: pidFile, encoding: .utf8)).trimmingCharacters(in: .whitespacesAndNewlines)))
        let ended = Self.ended(grandchild)
        #expect(ended, "the grandchild \(grandchild) still runs")
        if !ended { kill(grandchild, SIGKILL) }
    }

    @Test func serverProcessStopIsBoundedForAServerThatIgnoresSignals() throws {
        let server = try ServerProcess([Self.sh, "-c", "trap '' TERM INT; echo ready; while :; do sleep 1; done"], launcher: true, captureStdout: true)
        #expect(server.readLines(1) == ["ready"])
        let pid = server.pid
        let start = ContinuousClock.now
        #expect(server.stop(signal: SIGTERM, timeout: 1) == 128 + SIGKILL)
        #expect(ContinuousClock.now - start < .seconds(5))
        #expect(Self.reaped(pid) && Self.groupEnded(pid))
    }

    @Test func deadlineForAChildSomeoneElseReaps() throws {
        // `enforceDeadline` is what NBDClient gives libnbd's command children: this one ignores
        // SIGTERM and is killed after timeout + killGrace, through a pidfd.
        let child = try ChildProcess(executable: Self.sh, arguments: [Self.sh, "-c", "trap '' TERM; echo ready; while :; do sleep 1; done"],
                                     standardOutput: .pipe)
        var buffer: [UInt8] = []
        #expect(readLinesFrom(child.standardOutput!.rawValue, count: 1, buffer: &buffer, timeout: 10) == ["ready"])
        #expect(ChildProcess.enforceDeadline(pid: child.pid, timeout: .milliseconds(500), killGrace: .milliseconds(500)))
        #expect(child.wait(timeout: .seconds(10)) == .signaled(SIGKILL))
    }

    @Test(.enabled(if: haveTool("nbdkit")))
    func libnbdCommandChildThatOutlivesTheConnectionIsKilled() throws {
        // nbdkit serves over stdin/stdout and exits when the client closes; the shell around it
        // then sleeps, ignoring SIGTERM. nbd_close waits for it: without the deadline, forever.
        let start = ContinuousClock.now
        let closed = Self.returns(within: .seconds(60)) {
            guard let c = try? NBDClient() else { return }
            c.commandDeadline = .seconds(2)
            guard (try? c.connect(command: [Self.sh, "-c", "trap '' TERM; nbdkit -s memory 1M; exec sleep 1000"])) != nil else { return }
            _ = try? c.pread(count: 512, offset: 0)
        }
        #expect(closed)
        #expect(ContinuousClock.now - start < .seconds(30))
    }

    @Test func libnbdCommandThatNeverAnswersTheHandshakeIsStopped() throws {
        // nbd_connect_command would wait for the greeting forever.
        let start = ContinuousClock.now
        final class Box: @unchecked Sendable { var error = "" }
        let box = Box()
        let failed = Self.returns(within: .seconds(60)) {
            guard let c = try? NBDClient() else { return }
            c.commandDeadline = .seconds(1)
            do {
                try c.connect(command: [Self.sh, "-c", "trap '' TERM; exec sleep 1000"], timeout: .seconds(2))
                box.error = "connected to a command that says nothing"
            } catch {
                box.error = "\(error)"
            }
        }
        #expect(box.error.contains("did not complete the handshake"), "\(box.error)")
        #expect(failed)
        #expect(ContinuousClock.now - start < .seconds(30))
    }

    // MARK: negative control

    /// What Tools.swift's `run` was before this harness (Foundation `Process`, unbounded
    /// `waitUntilExit` and pipe reads), with a hook that reports the pid.
    static func foundationRun(_ argv: [String], timeout: TimeInterval, started: (Int32) -> Void) throws -> ToolResult {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: argv[0])
        p.arguments = Array(argv.dropFirst())
        let out = Pipe(), err = Pipe()
        p.standardOutput = out
        p.standardError = err
        let input = Pipe()
        p.standardInput = input
        try p.run()
        started(p.processIdentifier)
        try? input.fileHandleForWriting.close()
        final class Sink: @unchecked Sendable { var data = Data() }
        let o = Sink(), e = Sink()
        let group = DispatchGroup()
        group.enter()
        DispatchQueue.global().async { o.data = out.fileHandleForReading.readDataToEndOfFile(); group.leave() }
        group.enter()
        DispatchQueue.global().async { e.data = err.fileHandleForReading.readDataToEndOfFile(); group.leave() }
        let deadline = Date().addingTimeInterval(timeout)
        while p.isRunning && Date() < deadline { usleep(10_000) }
        if p.isRunning {
            kill(p.processIdentifier, SIGKILL)
            p.waitUntilExit()
        }
        group.wait()
        return ToolResult(status: p.terminationStatus, stdout: String(decoding: o.data, as: UTF8.self), stderr: String(decoding: e.data, as: UTF8.self))
    }

    @Test func negativeControlTheFoundationHarnessHangsOnTheSameChild() throws {
        let d = ScratchDirectory()
        @Sendable func argv(_ pidFile: String) -> [String] { [Self.sh, "-c", "sleep 1000 & echo $! > \(pidFile); exit 0"] }
        let oldPIDFile = d.file("old.pid")
        final class Box: @unchecked Sendable { var child: Int32 = 0 }
        let box = Box()
        let done = DispatchSemaphore(value: 0)
        OSThread.spawn {
            _ = try? Self.foundationRun(argv(oldPIDFile), timeout: 2, started: { box.child = $0 })
            done.signal()
        }
        // Its own 2 s timeout has long passed (SIGKILL sent, waitUntilExit entered); it has not
        // returned, and the shell it waits for is a zombie nobody reaps.
        let returned = done.wait(timeout: .now() + .seconds(8)) == .success
        #expect(!returned, "the old harness returned: the negative control no longer shows the hang")
        if !returned { #expect(Self.state(box.child) == "Z", "the child is \(Self.state(box.child).map(String.init) ?? "gone")") }
        // The same child through ChildProcess: back at once.
        let start = ContinuousClock.now
        let r = try ChildProcess.run(executable: Self.sh, arguments: argv(d.file("new.pid")), timeout: .seconds(2))
        #expect(r.termination == .exited(0) && !r.timedOut && ContinuousClock.now - start < .seconds(5))
        // Release the old harness: it returns once the grandchild holding its pipes is gone.
        if let text = try? String(contentsOfFile: oldPIDFile, encoding: .utf8), let pid = pid_t(text.trimmingCharacters(in: .whitespacesAndNewlines)) {
            kill(pid, SIGKILL)
        }
        #expect(done.wait(timeout: .now() + .seconds(30)) == .success, "the old harness did not return even after its grandchild was killed")
    }

    // MARK: every test has a time limit

    /// Every `@Suite` in the test sources carries `.timeLimit`, and every `@Test` is inside one
    /// (or carries its own), so Swift Testing reports a stuck test by name; `scripts/test`'s
    /// watchdog then ends the run.
    @Test func everySuiteHasATimeLimit() throws {
        let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
        var missing: [String] = []
        let files = FileManager.default.enumerator(atPath: root.path)?.compactMap { $0 as? String }.filter { $0.hasSuffix(".swift") } ?? []
        #expect(files.count > 20)
        for file in files {
            let text = try String(contentsOfFile: root.path + "/" + file, encoding: .utf8)
            let lines = text.split(separator: "\n", omittingEmptySubsequences: false)
            var inLimitedSuite = false
            for (i, line) in lines.enumerated() {
                let code = line.trimmingCharacters(in: .whitespaces)
                if code.hasPrefix("@Suite") {
                    inLimitedSuite = code.contains(".timeLimit(")
                    if !inLimitedSuite { missing.append("\(file):\(i + 1): \(code)") }
                } else if code.hasPrefix("@Test") && !code.contains(".timeLimit(") && !inLimitedSuite {
                    missing.append("\(file):\(i + 1): \(code)")
                }
            }
        }
        #expect(missing.isEmpty, "without a time limit:\n\(missing.joined(separator: "\n"))")
    }
}
