import Foundation
import Glibc
import PmemSystem
import Testing

/// Result of running a program.
struct ToolResult {
    var status: Int32
    var stdout: String
    var stderr: String
}

/// The built `pmem-nbd` executable (next to the test bundle).
let pmemNBDBinary: String = {
    let exe = (try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/exe")) ?? ""
    var dir = (exe as NSString).deletingLastPathComponent
    if dir.hasSuffix(".xctest") { dir = (dir as NSString).deletingLastPathComponent }
    return dir + "/pmem-nbd"
}()

/// A PATH that prefers the system's programs (nbdsh needs Debian's python3 with the nbd module).
let systemPath = "/usr/sbin:/usr/bin:/sbin:/bin"

/// Whether a program is installed.
func haveTool(_ name: String) -> Bool {
    systemPath.split(separator: ":").contains { FileManager.default.isExecutableFile(atPath: "\($0)/\(name)") }
}

/// Resolves a program name against `systemPath` (an absolute path is kept).
func resolveTool(_ name: String) -> String {
    if name.hasPrefix("/") { return name }
    return systemPath.split(separator: ":").map { "\($0)/\(name)" }.first { FileManager.default.isExecutableFile(atPath: $0) } ?? name
}

/// Runs a program to completion with a hard deadline (`ChildProcess.run`): at `timeout` it is
/// sent SIGTERM, two seconds later its whole process group SIGKILL, and it is always reaped; a
/// grandchild holding its output open cannot keep this waiting. A timeout is recorded as an
/// issue of the running test.
@discardableResult
func run(_ argv: [String], environment: [String: String] = [:], stdin: Data? = nil, timeout: TimeInterval = 120) throws -> ToolResult {
    var env = environment
    env["PATH"] = env["PATH"] ?? systemPath
    let path = resolveTool(argv[0])
    let outcome: ChildProcess.Outcome
    do {
        outcome = try ChildProcess.run(
            executable: path, arguments: [path] + argv.dropFirst(), environment: env,
            input: stdin.map { [UInt8]($0) }, timeout: .milliseconds(Int(timeout * 1000)))
    } catch {
        throw POSIXError(POSIXErrorCode(rawValue: error.rawValue) ?? .EIO)
    }
    if outcome.timedOut {
        Issue.record("\(argv.joined(separator: " ")) did not finish within \(Int(timeout)) s; it was stopped")
    }
    if outcome.termination == nil {
        Issue.record("\(argv.joined(separator: " ")) survived SIGKILL (uninterruptible sleep?)")
    }
    return ToolResult(status: outcome.termination?.shellStatus ?? -1,
                      stdout: String(decoding: outcome.standardOutput, as: UTF8.self),
                      stderr: String(decoding: outcome.standardError, as: UTF8.self))
}

/// A unique file for a child's standard error (removed by the owner).
func temporaryLogFile(_ prefix: String) -> String {
    var template = Array("/tmp/\(prefix)-XXXXXX".utf8CString)
    let fd = template.withUnsafeMutableBufferPointer { mkstemp($0.baseAddress!) }
    if fd >= 0 { close(fd) }
    return String(decoding: template.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
}

/// A `pmem-nbd serve` process (through `ChildProcess`: its own process group, always reaped,
/// every wait bounded). Standard error goes to a file, so a chatty server never blocks on a full
/// pipe; it is stopped with SIGKILL when the object goes away.
final class ServerProcess {
    let process: ChildProcess
    let stderrPath: String
    private var stdoutBuffer: [UInt8] = []

    /// Runs `pmem-nbd ARGUMENTS`, or with `launcher` the program named by the first argument.
    /// With `captureStdout` its standard output can be read with `readLines`.
    init(_ arguments: [String], environment: [String: String] = [:], launcher: Bool = false, captureStdout: Bool = false) throws {
        let executable = launcher ? arguments[0] : pmemNBDBinary
        stderrPath = temporaryLogFile("pmem-nbd-test-stderr")
        do {
            process = try ChildProcess(
                executable: executable, arguments: [executable] + (launcher ? Array(arguments.dropFirst()) : arguments),
                environment: environment, standardOutput: captureStdout ? .pipe : .null, standardError: .file(stderrPath))
        } catch {
            unlink(stderrPath)
            throw POSIXError(POSIXErrorCode(rawValue: error.rawValue) ?? .EIO)
        }
    }

    var pid: Int32 { process.pid }
    var isRunning: Bool { process.isRunning }

    /// Reads `count` lines of standard output (fewer if it ends or `timeout` passes first).
    func readLines(_ count: Int, timeout: TimeInterval = 20) -> [String] {
        guard let fd = process.standardOutput else { return [] }
        return readLinesFrom(fd.rawValue, count: count, buffer: &stdoutBuffer, timeout: timeout)
    }

    /// Waits until a Unix socket file exists.
    func waitForSocket(_ path: String, timeout: TimeInterval = 20) -> Bool {
        let deadline = Date().addingTimeInterval(timeout)
        while Date() < deadline {
            var st = stat()
            if stat(path, &st) == 0 && (st.st_mode & S_IFMT) == S_IFSOCK { return true }
            if !process.isRunning { return false }
            usleep(20_000)
        }
        return false
    }

    /// Sends a signal and waits for exit, at most `timeout` before SIGKILL goes to the whole
    /// process group; returns the exit status (128 + the signal for a killed process), -1 if
    /// it survived SIGKILL too.
    func stop(signal: Int32 = SIGTERM, timeout: TimeInterval = 30) -> Int32 {
        process.stop(signal: signal, grace: .milliseconds(Int(timeout * 1000)))?.shellStatus ?? -1
    }

    var stderrText: String { (try? String(contentsOfFile: stderrPath, encoding: .utf8)) ?? "" }

    deinit {
        process.stop(signal: SIGKILL)
        unlink(stderrPath)
    }
}

/// CRC-32C as the pool header uses it.
func PersistentMemoryCRC(_ b: UnsafeRawBufferPointer) -> UInt32 { PersistentMemory.crc32c(b) }

/// Connects a libnbd client to a Unix socket, retrying while the server starts (a socket file
/// exists between bind and listen, and a stale one may be left by a killed server).
func connectWhenReady(_ path: String, timeout: TimeInterval = 20, configure: (NBDClient) throws -> Void = { _ in }) throws -> NBDClient {
    let deadline = Date().addingTimeInterval(timeout)
    while true {
        let c = try NBDClient()
        try configure(c)
        do {
            try c.connect(unix: path)
            return c
        } catch {
            if Date() > deadline { throw error }
            usleep(20_000)
        }
    }
}

/// Reads up to `count` newline-terminated lines from a descriptor, waiting at most `timeout`.
func readLinesFrom(_ fd: Int32, count: Int, buffer: inout [UInt8], timeout: TimeInterval) -> [String] {
    let deadline = Date().addingTimeInterval(timeout)
    while buffer.filter({ $0 == 10 }).count < count {
        let left = deadline.timeIntervalSinceNow
        if left <= 0 { break }
        var p = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
        if poll(&p, 1, Int32(min(left, 1) * 1000)) <= 0 { continue }
        var chunk = [UInt8](repeating: 0, count: 4096)
        let n = read(fd, &chunk, chunk.count)
        if n <= 0 { break }
        buffer += chunk[0..<n]
    }
    var lines: [String] = []
    while lines.count < count, let nl = buffer.firstIndex(of: 10) {
        lines.append(String(decoding: buffer[..<nl], as: UTF8.self))
        buffer.removeSubrange(...nl)
    }
    return lines
}

/// A process started the way systemd starts a socket-activated service: the given listening
/// sockets become descriptors 3, 4, … and LISTEN_PID is the process's own pid (set by a shell
/// that then execs the program, keeping its pid). Standard output goes to a pipe, standard
/// error to a file.
final class ActivatedProcess {
    let process: ChildProcess
    let stderrPath: String
    private var buffer: [UInt8] = []

    init(_ argv: [String], passing sockets: [Int32], environment: [String: String], stderrPath: String) throws {
        self.stderrPath = stderrPath
        var env = environment
        env["LISTEN_FDS"] = env["LISTEN_FDS"] ?? String(sockets.count)
        let shell = ["/bin/sh", "-c", "LISTEN_PID=$$; export LISTEN_PID; exec \"$@\"", "sh"] + argv
        do {
            process = try ChildProcess(
                executable: "/bin/sh", arguments: shell, environment: env,
                standardOutput: .pipe, standardError: .file(stderrPath),
                passing: sockets.map { FileDescriptor(rawValue: $0) })
        } catch {
            throw POSIXError(POSIXErrorCode(rawValue: error.rawValue) ?? .EIO)
        }
    }

    var pid: pid_t { process.pid }

    func readLines(_ count: Int, timeout: TimeInterval = 20) -> [String] {
        guard let fd = process.standardOutput else { return [] }
        return readLinesFrom(fd.rawValue, count: count, buffer: &buffer, timeout: timeout)
    }

    var stderrText: String { (try? String(contentsOfFile: stderrPath, encoding: .utf8)) ?? "" }

    /// Sends a signal and waits for the exit status (SIGKILL to the group after `timeout`).
    func stop(signal: Int32 = SIGTERM, timeout: TimeInterval = 30) -> Int32 {
        process.stop(signal: signal, grace: .milliseconds(Int(timeout * 1000)))?.shellStatus ?? -1
    }

    deinit { process.stop(signal: SIGKILL) }
}
