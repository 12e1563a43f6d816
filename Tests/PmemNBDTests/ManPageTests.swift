import Foundation
import Testing

/// Docs/pmem-nbd.1 agrees with `--help`: every subcommand has a section and every option a
/// subcommand prints is in the page.
@Suite(.timeLimit(.minutes(5))) struct ManPageTests {
    static let subcommands = [
        ["serve"], ["create"], ["info"], ["check"], ["volume", "create"], ["volume", "list"], ["volume", "delete"],
        ["volume", "resize"], ["snapshot", "create"], ["snapshot", "list"], ["snapshot", "delete"], ["snapshot", "rollback"],
        ["clone"], ["export-diff"], ["feed"], ["stats"],
    ]

    /// `--long-option` names in a help text.
    func longOptions(_ help: String) -> Set<String> {
        let regex = try! NSRegularExpression(pattern: "(?<![A-Za-z0-9-])--[a-z][a-z0-9-]*")
        let range = NSRange(help.startIndex..., in: help)
        return Set(regex.matches(in: help, range: range).map { (help as NSString).substring(with: $0.range) })
    }

    @Test func everyOptionOfEverySubcommandIsInTheManPage() throws {
        let page = try String(contentsOfFile: repositoryRoot + "/Docs/pmem-nbd.1", encoding: .utf8)
        // troff writes a literal '-' as '\-'.
        let text = page.replacingOccurrences(of: "\\-", with: "-")
        let top = try run([pmemNBDBinary, "--help"])
        #expect(top.status == 0)
        var checked = 0
        for command in Self.subcommands {
            let r = try run([pmemNBDBinary] + command + ["--help"])
            #expect(r.status == 0, "\(command): \(r.stderr)")
            // The subcommand has its own heading.
            #expect(page.contains(".SS \"\(command.joined(separator: " "))") || page.contains(".SS \(command.joined(separator: " "))"),
                    "no .SS heading for \(command.joined(separator: " "))")
            for option in longOptions(r.stdout) where option != "--help" {
                #expect(text.contains(option), "\(command.joined(separator: " ")) \(option) is not in Docs/pmem-nbd.1")
                checked += 1
            }
        }
        #expect(checked > 40, "the help texts were read")
        // And every subcommand the top-level help lists is covered above.
        let listed = top.stdout.components(separatedBy: "SUBCOMMANDS:").last?.split(separator: "\n")
            .filter { $0.hasPrefix("  ") && !$0.hasPrefix("   ") }
            .compactMap { $0.split(separator: " ").first.map(String.init) }
            .filter { $0.allSatisfy { $0.isLowercase || $0 == "-" } } ?? []
        #expect(listed.count >= 9, "\(listed)")
        for word in listed where word != "help" {
            #expect(Self.subcommands.contains { $0[0] == word }, "subcommand \(word) is not checked")
        }
    }

    @Test func serveHelpHasExamples() throws {
        let r = try run([pmemNBDBinary, "serve", "--help"])
        #expect(r.stdout.contains("Examples:"))
        #expect(r.stdout.contains("--print-uri") && r.stdout.contains("--fork") && r.stdout.contains("--metrics"))
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
}
