import Foundation
import Glibc

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

/// Runs a program to completion, with a timeout after which it is killed.
@discardableResult
func run(_ argv: [String], environment: [String: String] = [:], stdin: Data? = nil, timeout: TimeInterval = 120) throws -> ToolResult {
    let p = Process()
    let path = argv[0].hasPrefix("/") ? argv[0] : (systemPath.split(separator: ":").map { "\($0)/\(argv[0])" }.first { FileManager.default.isExecutableFile(atPath: $0) } ?? argv[0])
    p.executableURL = URL(fileURLWithPath: path)
    p.arguments = Array(argv.dropFirst())
    var env = ProcessInfo.processInfo.environment
    env["PATH"] = systemPath
    for (k, v) in environment { env[k] = v }
    p.environment = env
    let out = Pipe(), err = Pipe()
    p.standardOutput = out
    p.standardError = err
    let input = Pipe()
    p.standardInput = input
    try p.run()
    if let stdin { input.fileHandleForWriting.write(stdin) }
    try? input.fileHandleForWriting.close()
    // Drain both pipes while waiting so a chatty tool cannot block.
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

/// A `pmem-nbd serve` process, stopped with SIGTERM at the end.
final class ServerProcess {
    let process = Process()
    let stderrPipe = Pipe()
    let stdoutPipe = Pipe()
    private var stdoutBuffer: [UInt8] = []

    /// Runs `pmem-nbd ARGUMENTS`, or with `launcher` the program named by the first argument.
    /// With `captureStdout` its standard output can be read with `readLines`.
    init(_ arguments: [String], environment: [String: String] = [:], launcher: Bool = false, captureStdout: Bool = false) throws {
        process.executableURL = URL(fileURLWithPath: launcher ? arguments[0] : pmemNBDBinary)
        process.arguments = launcher ? Array(arguments.dropFirst()) : arguments
        var env = ProcessInfo.processInfo.environment
        for (k, v) in environment { env[k] = v }
        process.environment = env
        process.standardError = stderrPipe
        process.standardOutput = captureStdout ? stdoutPipe : FileHandle.nullDevice
        try process.run()
    }

    var pid: Int32 { process.processIdentifier }

    /// Reads `count` lines of standard output (fewer if it ends or `timeout` passes first).
    func readLines(_ count: Int, timeout: TimeInterval = 20) -> [String] {
        readLinesFrom(stdoutPipe.fileHandleForReading.fileDescriptor, count: count, buffer: &stdoutBuffer, timeout: timeout)
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

    /// Sends a signal and waits for exit; returns the exit status.
    func stop(signal: Int32 = SIGTERM, timeout: TimeInterval = 30) -> Int32 {
        if process.isRunning { kill(pid, signal) }
        let deadline = Date().addingTimeInterval(timeout)
        while process.isRunning && Date() < deadline { usleep(10_000) }
        if process.isRunning {
            kill(pid, SIGKILL)
        }
        process.waitUntilExit()
        return process.terminationStatus
    }

    var stderrText: String {
        String(decoding: stderrPipe.fileHandleForReading.availableData, as: UTF8.self)
    }

    deinit { _ = stop(signal: SIGKILL, timeout: 5) }
}

import PmemSystem

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
    let pid: pid_t
    let stdoutRead: Int32
    let stderrPath: String
    private var buffer: [UInt8] = []
    private var status: Int32?

    init(_ argv: [String], passing sockets: [Int32], environment: [String: String], stderrPath: String) throws {
        self.stderrPath = stderrPath
        // Copies above any descriptor number the child uses, so the dup2s cannot clobber each other.
        let high = sockets.map { fcntl($0, F_DUPFD_CLOEXEC, 100) }
        defer { for fd in high { close(fd) } }
        var pipeFDs: [Int32] = [0, 0]
        guard pipe(&pipeFDs) == 0 else { throw POSIXError(.EIO) }
        for fd in pipeFDs { _ = fcntl(fd, F_SETFD, FD_CLOEXEC) }
        defer { close(pipeFDs[1]) }
        stdoutRead = pipeFDs[0]
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0)
        posix_spawn_file_actions_adddup2(&actions, pipeFDs[1], 1)
        posix_spawn_file_actions_addopen(&actions, 2, stderrPath, O_WRONLY | O_CREAT | O_TRUNC, 0o644)
        for (i, fd) in high.enumerated() { posix_spawn_file_actions_adddup2(&actions, fd, 3 + Int32(i)) }
        let shell = ["/bin/sh", "-c", "LISTEN_PID=$$; export LISTEN_PID; exec \"$@\"", "sh"] + argv
        var env = ProcessInfo.processInfo.environment
        env["LISTEN_FDS"] = String(sockets.count)
        for (k, v) in environment { env[k] = v }
        var cArgs = shell.map { strdup($0) } + [nil]
        var cEnv = env.map { strdup("\($0.key)=\($0.value)") } + [nil]
        defer { for p in cArgs + cEnv { free(p) } }
        var pid: pid_t = 0
        let rc = posix_spawn(&pid, "/bin/sh", &actions, nil, &cArgs, &cEnv)
        guard rc == 0 else { throw POSIXError(POSIXErrorCode(rawValue: rc) ?? .EIO) }
        self.pid = pid
    }

    func readLines(_ count: Int, timeout: TimeInterval = 20) -> [String] {
        readLinesFrom(stdoutRead, count: count, buffer: &buffer, timeout: timeout)
    }

    var stderrText: String { (try? String(contentsOfFile: stderrPath, encoding: .utf8)) ?? "" }

    /// Sends a signal and waits for the exit status (killing it after `timeout`).
    func stop(signal: Int32 = SIGTERM, timeout: TimeInterval = 30) -> Int32 {
        if let status { return status }
        kill(pid, signal)
        let deadline = Date().addingTimeInterval(timeout)
        var raw: Int32 = 0
        while waitpid(pid, &raw, WNOHANG) == 0 {
            if Date() > deadline { kill(pid, SIGKILL) }
            usleep(10_000)
        }
        let s = raw & 0x7F == 0 ? (raw >> 8) & 0xFF : 128 + (raw & 0x7F)
        status = s
        return s
    }

    deinit {
        _ = stop(signal: SIGKILL, timeout: 5)
        close(stdoutRead)
    }
}
