import Foundation
@testable import TestSupport
import Testing

/// The lease protocol's spin model (Tests/Model/leases.pml; Docs/FEED.md, "The model"): the
/// smallest configuration (a rollback under loans, the ack deadline) is searched completely
/// without finding anything, and the model with a known bug put back is caught — the
/// rollback-order bug of issue 14 (item 6), the naive fix of it, the silent fence, and the
/// snapshot-pin bug (item 1) on its own configuration. `scripts/model-check` runs every
/// configuration and negative control (scripts/test does); this keeps the model honest for
/// anyone running `swift test` alone.
@Suite(.timeLimit(.minutes(5))) struct LeaseModelTests {
    @Test(.timeLimit(.minutes(5)))
    func smallestConfigurationHoldsAndItsNegativeControlsFail() throws {
        #expect(haveTool("spin") && haveTool("gcc"), "spin and gcc are needed: scripts/test installs them")
        let rows = ["2", "2 BUG_ROLLBACK_ORDER", "2 BUG_EARLY_EVENT", "2 BUG_SILENT_FENCE", "1 BUG_SNAPSHOT_PIN"]
        let r = try run([repositoryRoot + "/scripts/model-check", "--only", rows.joined(separator: ",")],
                        environment: ["MODEL_CHECK_DEADLINE": "240", "MODEL_CHECK_MEMLIM": "1024"], timeout: 280)
        #expect(r.status == 0, "\(r.stdout)\(r.stderr)")
        // One line per row: the fixed model searched to the end without an error, each bug found.
        let lines = r.stdout.split(separator: "\n").map { $0.split(separator: " ", omittingEmptySubsequences: true) }
        for row in rows {
            let parts = row.split(separator: " ")
            let variant = parts.count > 1 ? String(parts[1]) : "(fixed)"
            let line = lines.first { $0.count >= 4 && $0[0] == parts[0] && $0[1] == variant }
            #expect(line?[3] == (parts.count > 1 ? "found" : "ok"), "\(row): \(r.stdout)")
        }
    }
}
