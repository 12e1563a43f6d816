import Foundation
@testable import TestSupport
import Testing

/// Docs/pmem-nbd.1 agrees with `--help`: every command — found by walking the SUBCOMMANDS of
/// `--help` recursively, so a new command cannot be missed — has a section, and every option
/// any command prints is in the page; so are pmem-dax-read's.
@Suite(.timeLimit(.minutes(3))) struct ManPageTests {
    /// `--long-option` names in a help text.
    func longOptions(_ help: String) -> Set<String> {
        let regex = try! NSRegularExpression(pattern: "(?<![A-Za-z0-9-])--[a-z][a-z0-9-]*")
        let range = NSRange(help.startIndex..., in: help)
        return Set(regex.matches(in: help, range: range).map { (help as NSString).substring(with: $0.range) })
    }

    /// The subcommand words a help text lists (none for a leaf command).
    func listedSubcommands(_ help: String) -> [String] {
        guard help.contains("SUBCOMMANDS:") else { return [] }
        return help.components(separatedBy: "SUBCOMMANDS:").last!.split(separator: "\n")
            .filter { $0.hasPrefix("  ") && !$0.hasPrefix("   ") }
            .compactMap { $0.split(separator: " ").first.map(String.init) }
            .filter { $0.allSatisfy { $0.isLowercase || $0 == "-" } && $0 != "help" }
    }

    /// Every command path with its help text, depth first.
    func commands(under prefix: [String] = []) throws -> [(path: [String], help: String)] {
        let r = try run([pmemNBDBinary] + prefix + ["--help"])
        #expect(r.status == 0, "\(prefix): \(r.stderr)")
        var out = [(prefix, r.stdout)]
        for word in listedSubcommands(r.stdout) { out += try commands(under: prefix + [word]) }
        return out
    }

    @Test func everyOptionOfEveryCommandIsInTheManPage() throws {
        let page = try String(contentsOfFile: repositoryRoot + "/Docs/pmem-nbd.1", encoding: .utf8)
        // troff writes a literal '-' as '\-'.
        let text = page.replacingOccurrences(of: "\\-", with: "-")
        let all = try commands()
        let leaves = all.filter { listedSubcommands($0.help).isEmpty }
        // What the page must cover at least (a command dropped from --help would shrink this).
        for expected in [["serve"], ["create"], ["info"], ["check"], ["volume", "create"], ["volume", "export"], ["volume", "resize"],
                         ["snapshot", "rollback"], ["clone"], ["export-diff"], ["connections"], ["feed"], ["stats"]] {
            #expect(leaves.contains { $0.path == expected }, "\(expected) is not a command any more")
        }
        #expect(leaves.count >= 18, "\(leaves.map(\.path))")
        var checked = 0
        for (path, help) in all {
            let name = path.joined(separator: " ")
            if !path.isEmpty && listedSubcommands(help).isEmpty {
                #expect(page.contains(".SS \"\(name)\"") || page.contains(".SS \(name)\n"), "no .SS heading for \(name)")
            }
            for option in longOptions(help) where option != "--help" {
                #expect(text.contains(option), "\(name.isEmpty ? "pmem-nbd" : name) \(option) is not in Docs/pmem-nbd.1")
                checked += 1
            }
        }
        #expect(checked > 60, "the help texts were read")
        // The top level: --version (and -V) print the version and exit 0.
        for flag in ["--version", "-V"] {
            let v = try run([pmemNBDBinary, flag])
            #expect(v.status == 0 && v.stdout.hasPrefix("pmem-nbd "), "\(flag): \(v.stdout) \(v.stderr)")
        }
        #expect(text.contains("--version") && text.contains("-V"))
        // pmem-dax-read: --help exits 0, and its options are in the page, under its own heading.
        let dax = try run([(pmemNBDBinary as NSString).deletingLastPathComponent + "/pmem-dax-read", "--help"])
        #expect(dax.status == 0, "\(dax.stderr)")
        #expect(page.contains(".SS \"pmem-dax-read\""))
        let daxOptions = longOptions(dax.stdout)
        #expect(daxOptions.isSuperset(of: ["--feed", "--nbd", "--bench", "--hold"]), "\(daxOptions)")
        for option in daxOptions where option != "--help" { #expect(text.contains(option), "pmem-dax-read \(option) is not in the page") }
    }

    @Test func serveHelpHasExamples() throws {
        let r = try run([pmemNBDBinary, "serve", "--help"])
        #expect(r.stdout.contains("Examples:"))
        #expect(r.stdout.contains("--print-uri") && r.stdout.contains("--fork") && r.stdout.contains("--metrics") && r.stdout.contains("--run"))
        // The man page's serve examples use options serve accepts.
        let page = try String(contentsOfFile: repositoryRoot + "/Docs/pmem-nbd.1", encoding: .utf8).replacingOccurrences(of: "\\-", with: "-")
        #expect(page.contains("pmem-nbd serve"))
        let known = longOptions(r.stdout)
        for line in page.split(separator: "\n") where line.hasPrefix("pmem-nbd serve ") {
            for option in longOptions(String(line)) {
                #expect(known.contains(option), "example uses unknown option \(option): \(line)")
            }
        }
    }

    /// Shell completion is documented and works: the scripts name the commands.
    @Test func completionScripts() throws {
        let page = try String(contentsOfFile: repositoryRoot + "/Docs/pmem-nbd.1", encoding: .utf8).replacingOccurrences(of: "\\-", with: "-")
        #expect(page.contains("--generate-completion-script"))
        for shell in ["bash", "zsh", "fish"] {
            let r = try run([pmemNBDBinary, "--generate-completion-script", shell])
            #expect(r.status == 0 && r.stdout.contains("serve") && r.stdout.contains("connections"), "\(shell): \(r.stderr)")
        }
        if haveTool("bash") {
            let script = try run([pmemNBDBinary, "--generate-completion-script", "bash"]).stdout
            let check = try run(["bash", "-c", "source /dev/stdin && complete -p pmem-nbd"], stdin: Data(script.utf8))
            #expect(check.status == 0 && check.stdout.contains("pmem-nbd"), "\(check.stdout) \(check.stderr)")
        }
    }
}
