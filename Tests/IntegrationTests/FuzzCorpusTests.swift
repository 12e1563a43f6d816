import Foundation
@testable import TestSupport
import Testing

/// The fuzz target's corpus (real client conversations recorded by `scripts/fuzz corpus`) and
/// every reproducer the fuzzer ever found (`Fuzz/regressions/`) replayed through the wire codec
/// by the `nbd-fuzz` executable: none may fail its checks. `scripts/fuzz run` is the fuzzer.
@Suite(.timeLimit(.minutes(5))) struct FuzzCorpusTests {
    @Test func corpusAndRegressionsReplayCleanly() throws {
        let repo = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
        var files: [String] = []
        for dir in ["Fuzz/corpus", "Fuzz/regressions"] {
            let path = repo.appendingPathComponent(dir).path
            let names = (try? FileManager.default.contentsOfDirectory(atPath: path)) ?? []
            files += names.sorted().map { "\(path)/\($0)" }
        }
        #expect(files.count >= 10, "the recorded corpus is missing")
        let binary = (pmemNBDBinary as NSString).deletingLastPathComponent + "/nbd-fuzz"
        let r = try run([binary] + files)
        #expect(r.status == 0, "\(r.stdout)\(r.stderr)")
        #expect(r.stdout.contains("\(files.count) inputs replayed, 0 failed"))
    }
}
