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

    /// Runs `pmem-nbd ARGUMENTS`, or with `launcher` the program named by the first argument.
    init(_ arguments: [String], environment: [String: String] = [:], launcher: Bool = false) throws {
        process.executableURL = URL(fileURLWithPath: launcher ? arguments[0] : pmemNBDBinary)
        process.arguments = launcher ? Array(arguments.dropFirst()) : arguments
        var env = ProcessInfo.processInfo.environment
        for (k, v) in environment { env[k] = v }
        process.environment = env
        process.standardError = stderrPipe
        process.standardOutput = FileHandle.nullDevice
        try process.run()
    }

    var pid: Int32 { process.processIdentifier }

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
