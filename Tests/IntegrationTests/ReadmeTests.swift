import Foundation
import Glibc
@testable import TestSupport
import Testing

/// README.md's commands run as written on a fresh machine: every command line of its code
/// blocks that can run here (no root, kernel module, fixed TCP port or minutes of work) runs,
/// in order, as one shell script in an empty directory with the built `pmem-nbd` and
/// `pmem-dax-read` first on the PATH. A line ending in `&` runs in the background (the script
/// waits for the sockets it names); everything it started is killed at the end.
@Suite(.timeLimit(.minutes(6))) struct ReadmeTests {
    /// Why a README line is not run here, or nil when it runs.
    static func skipReason(_ line: String) -> String? {
        let first = line.split(separator: " ").first.map(String.init) ?? ""
        if ["swift", "scripts/test", "Tests/VM/run", "modprobe", "nbd-client", "mkfs.ext4", "mount", "install", "systemctl",
            "certtool", "export"].contains(first) { return "needs root, a kernel module or a build" }
        if first == "fio" { return "takes minutes (the fio tests run it)" }
        for path in ["/etc/", "/var/", "/dev/", "/mnt/", "/run/"] where line.contains(path) { return "system path \(path)" }
        if line.contains("nbd://localhost") || line.contains(":10809") || line.contains(":10810") || line.contains("0.0.0.0") {
            return "fixed TCP port"
        }
        if line.contains("--follow") { return "runs until the server stops" }
        if first == "pmem-nbd", line.contains(" serve"), !(line.contains("-U ") || line.contains("--unix ") || line.contains("--run ")) {
            return "listens on the fixed port 10809"
        }
        if first.hasPrefix("pmem-nbd:") || first.hasPrefix("#") { return "output, not a command" }
        return nil
    }

    /// The command lines of the README's indented code blocks (continuation lines joined,
    /// trailing comments removed), each with whether it runs.
    static func commandLines(_ readme: String) -> [(line: String, skip: String?)] {
        var out: [(String, String?)] = []
        var pending = ""
        var previousBlank = true
        var inBlock = false
        for raw in readme.components(separatedBy: "\n") {
            let isCode = raw.hasPrefix("    ") && (inBlock || previousBlank)
            previousBlank = raw.trimmingCharacters(in: .whitespaces).isEmpty
            if !isCode { inBlock = false; if !previousBlank { pending = "" }; continue }
            inBlock = true
            var text = String(raw.dropFirst(4))
            if let hash = text.range(of: "   #") ?? text.range(of: "  #") { text = String(text[..<hash.lowerBound]) }
            text = text.trimmingCharacters(in: .whitespaces)
            if text.hasSuffix("\\") {
                pending += text.dropLast().trimmingCharacters(in: .whitespaces) + " "
                continue
            }
            let line = pending + text
            pending = ""
            if line.isEmpty || line.hasPrefix("#") || line.hasPrefix("|") { continue }
            out.append((line, skipReason(line)))
        }
        return out
    }

    /// Unix sockets a line creates (`-U X`, `--unix X`, `--metrics unix:X`).
    static func socketsCreated(_ line: String) -> [String] {
        let words = line.split(separator: " ").map(String.init)
        var out: [String] = []
        for (i, w) in words.enumerated() where i + 1 < words.count {
            if w == "-U" || w == "--unix" { out.append(words[i + 1]) }
            if w == "--metrics", words[i + 1].hasPrefix("unix:") { out.append(String(words[i + 1].dropFirst(5))) }
        }
        return out
    }

    @Test func readmeCommandsRunAsWritten() throws {
        let readme = try String(contentsOfFile: repositoryRoot + "/README.md", encoding: .utf8)
        let lines = Self.commandLines(readme)
        let runnable = lines.filter { $0.skip == nil }.map(\.line)
        // The README's walk-through is here (a change that drops it would otherwise pass).
        for expected in ["pmem-nbd create pmem-nbd.pool --size 16G --volume-size 4G", "pmem-nbd serve pmem-nbd.pool --unix pmem.sock &",
                         "pmem-nbd volume create vm1 --from disk.qcow2", "pmem-nbd snapshot rollback db@before-migration",
                         "pmem-nbd connections"] {
            #expect(runnable.contains(expected), "README no longer runs: \(expected)")
        }
        #expect(runnable.filter { $0.hasPrefix("pmem-dax-read") }.count >= 2)
        #expect(runnable.count >= 35, "\(runnable.count) runnable lines")
        // The first command builds pmem-dax-read too (the README uses it).
        #expect(lines.first?.line.hasPrefix("swift build -c release") == true)

        let d = ScratchDirectory()
        let bin = (pmemNBDBinary as NSString).deletingLastPathComponent
        var script = """
        set -e
        cd '\(d.path)'
        export PATH='\(bin)':/usr/sbin:/usr/bin:/sbin:/bin
        trap 'echo "README line failed: $BASH_COMMAND" >&2' ERR
        waitsock() { for i in $(seq 200); do [ -S "$1" ] && return 0; sleep 0.05; done; echo "no socket $1" >&2; return 1; }

        """
        for line in runnable {
            script += "echo '+ \(line.replacingOccurrences(of: "'", with: "'\\''"))' >&2\n"
            script += line + "\n"
            if line.hasSuffix("&") { for s in Self.socketsCreated(line) { script += "waitsock '\(s)'\n" } }
        }
        // The servers it left running stop cleanly on SIGTERM.
        script += "kill $(jobs -p); wait\necho README-DONE\n"
        let r = try runScript(script, in: d.path, timeout: 300)
        #expect(r.status == 0 && r.stdout.contains("README-DONE"), "exit \(r.status)\n--- stderr:\n\(r.stderr.suffix(6000))\n--- stdout:\n\(r.stdout.suffix(3000))")
        // What the README says happened did.
        #expect(r.stderr.contains("pmem-nbd: serving pmem0 (4 GiB) at nbd+unix:///pmem0?socket=pmem.sock"), "\(r.stderr.suffix(3000))")
        #expect(!r.stderr.contains("overcommitted"), "the walk-through stays within the pool")
        #expect(r.stdout.contains("pmem_nbd_export_requests_total"), "curl through the metrics socket")
        #expect(FileManager.default.fileExists(atPath: d.file("db.diff")) && FileManager.default.fileExists(atPath: d.file("vm1.qcow2")))
    }

    /// The extraction itself: continuation lines, comments, backgrounding, what is skipped.
    @Test func extraction() {
        let text = """
        Some prose.

            pmem-nbd create pool --size 4G      # a comment
            fio --name=t \\
                --size=1G
            nbd-client -unix s /dev/nbd0

        More prose.
            not code: follows prose without a blank line
        """
        let lines = Self.commandLines(text)
        #expect(lines.map(\.line) == ["pmem-nbd create pool --size 4G", "fio --name=t --size=1G", "nbd-client -unix s /dev/nbd0"])
        #expect(lines.map { $0.skip == nil } == [true, false, false])
        #expect(Self.socketsCreated("pmem-nbd serve p -U a.sock --metrics unix:m.sock &") == ["a.sock", "m.sock"])
    }
}

/// Runs a bash script with a hard deadline, then kills every process still running in its
/// directory (servers it left in the background), so nothing outlives the test.
/// Its output goes to files, not pipes: a server it leaves running would hold a pipe open.
func runScript(_ script: String, in directory: String, timeout: TimeInterval, reap: Bool = true) throws -> ToolResult {
    defer { if reap { killProcesses(inDirectory: directory) } }
    let out = directory + "/.script-stdout", err = directory + "/.script-stderr"
    let r = try run(["/bin/bash", "-c", "exec >'\(out)' 2>'\(err)' </dev/null\n" + script], timeout: timeout)
    func text(_ path: String) -> String { (try? String(contentsOfFile: path, encoding: .utf8)) ?? "" }
    return ToolResult(status: r.status, stdout: text(out), stderr: text(err) + r.stderr)
}

/// SIGKILLs every process whose working directory is `directory` (or below it), and waits
/// briefly for them to go.
func killProcesses(inDirectory directory: String) {
    let me = getpid()
    for _ in 0..<50 {
        var found: [pid_t] = []
        for entry in (try? FileManager.default.contentsOfDirectory(atPath: "/proc")) ?? [] {
            guard let pid = pid_t(entry), pid != me,
                  let cwd = try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/\(entry)/cwd"),
                  cwd == directory || cwd.hasPrefix(directory + "/") else { continue }
            found.append(pid)
        }
        if found.isEmpty { return }
        for pid in found { kill(pid, SIGKILL) }
        usleep(100_000)
    }
}
