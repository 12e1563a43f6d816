import Foundation
@testable import TestSupport
import Testing

/// Rules of the code that the compiler does not enforce, checked on the sources (issue 13's
/// audit; Docs/RELIABILITY.md "Unsafe code"): no pointer leaves a `withUnsafe*` closure, threads
/// start only through `OSThread`, map words are decoded only through their check tags, and
/// `Unmanaged` stays in the types that own a C callback's context.
@Suite(.timeLimit(.minutes(5))) struct SourceAuditTests {
    /// Swift files under `directory` of the repository, as (relative path, lines).
    static func files(_ directory: String) throws -> [(path: String, lines: [String])] {
        let root = repositoryRoot + "/" + directory
        guard let walker = FileManager.default.enumerator(atPath: root) else { return [] }
        var out: [(String, [String])] = []
        for case let relative as String in walker where relative.hasSuffix(".swift") {
            let text = try String(contentsOfFile: root + "/" + relative, encoding: .utf8)
            out.append((directory + "/" + relative, text.components(separatedBy: "\n")))
        }
        return out.sorted { $0.0 < $1.0 }
    }

    /// Lines matching `pattern` (code only: comment lines are skipped), as "path:line: text".
    static func matches(_ pattern: String, in files: [(path: String, lines: [String])], except allowed: Set<String> = []) throws -> [String] {
        let regex = try NSRegularExpression(pattern: pattern)
        var hits: [String] = []
        for (path, lines) in files where !allowed.contains(path) {
            for (i, line) in lines.enumerated() {
                let code = line.trimmingCharacters(in: .whitespaces)
                if code.hasPrefix("//") { continue }
                if regex.firstMatch(in: line, range: NSRange(line.startIndex..., in: line)) != nil {
                    hits.append("\(path):\(i + 1): \(code)")
                }
            }
        }
        return hits
    }

    /// `x.withUnsafeBytes { $0.baseAddress! }` and the like hand out a pointer that is only
    /// valid inside the closure (issue 13, defect 2: the client flags were read through one
    /// after the array was freed).
    @Test func noPointerEscapesAWithUnsafeClosure() throws {
        let all = try Self.files("Sources") + Self.files("Tests")
        let escapes = try Self.matches(#"withUnsafe\w*(\([^()]*\))?\s*\{\s*(\$0|(\w+)\s+in\s+\3)(\.baseAddress!?)?\s*\}"#, in: all,
                                       except: ["Tests/IntegrationTests/SourceAuditTests.swift"])
        #expect(escapes.isEmpty, "pointers returned out of withUnsafe* closures:\n\(escapes.joined(separator: "\n"))")
    }

    /// One way to start a thread: `OSThread` (and `Workers`, built on it). No `pthread_create`
    /// elsewhere, no Dispatch queues or Foundation threads in the sources. The signal source
    /// in ServeCommand is the one Dispatch use left (see Docs/RELIABILITY.md).
    @Test func threadsStartOnlyThroughOSThread() throws {
        let sources = try Self.files("Sources")
        let creates = try Self.matches(#"\bpthread_create\b"#, in: sources, except: ["Sources/PmemSystem/OSThread.swift"])
        #expect(creates.isEmpty, "\(creates)")
        let others = try Self.matches(#"\bDispatchQueue\b|\bThread\s*[({]|\.detachNewThread|\bDispatchSource\b"#, in: sources,
                                      except: ["Sources/PmemNBD/ServeCommand.swift"])
        #expect(others.isEmpty, "threads started outside OSThread:\n\(others.joined(separator: "\n"))")
    }

    /// Only PmemPool decodes map words, through `MapEntry.block` (the check tag) — the checker
    /// also looks at the raw bits to say what is wrong. A `& MapEntry.blockMask` elsewhere
    /// follows a damaged entry to another block (issue 13, defect 5).
    @Test func mapWordsAreDecodedOnlyThroughTheirCheckTags() throws {
        let sources = try Self.files("Sources")
        let raw = try Self.matches(#"&\s*MapEntry\.blockMask"#, in: sources,
                                   except: ["Sources/PmemPool/CheckTags.swift", "Sources/PmemPool/PoolCheck.swift"])
        #expect(raw.isEmpty, "map words decoded without their check tag:\n\(raw.joined(separator: "\n"))")
    }

    /// `Unmanaged` only where a C callback needs a context pointer: the thread start routine
    /// (OSThread) and GnuTLS's session pointer (NBDTLS).
    @Test func unmanagedStaysWithItsOwners() throws {
        let sources = try Self.files("Sources")
        let uses = try Self.matches(#"\bUnmanaged\b"#, in: sources, except: [
            "Sources/PmemSystem/OSThread.swift", "Sources/NBDTLS/TLSSession.swift", "Sources/NBDTLS/TLSCredentials.swift",
        ])
        #expect(uses.isEmpty, "\(uses)")
    }

    /// PmemSystem is the only way into C (issue 17): no other module imports CPmemSupport,
    /// maps memory, accepts connections outside `AcceptLoop`, or reads the monotonic clock
    /// outside `MonotonicClock`.
    @Test func onlyPmemSystemCallsC() throws {
        let sources = try Self.files("Sources")
        let outside = sources.filter { !$0.path.hasPrefix("Sources/PmemSystem/") && !$0.path.hasPrefix("Sources/CPmemSupport/") }
        let imports = try Self.matches(Self.cImport, in: outside)
        #expect(imports.isEmpty, "CPmemSupport imported outside PmemSystem:\n\(imports.joined(separator: "\n"))")
        let maps = try Self.matches(Self.rawMapping, in: outside)
        #expect(maps.isEmpty, "mappings made outside MappedRegion:\n\(maps.joined(separator: "\n"))")
        let accepts = try Self.matches(Self.rawAccept, in: sources, except: [
            "Sources/PmemSystem/AcceptLoop.swift", "Sources/PmemSystem/Socket.swift",
            // `serve --stdio` with socket activation: one blocking accept of the first client.
            "Sources/PmemNBD/ServeCommand.swift",
        ])
        #expect(accepts.isEmpty, "accept loops outside AcceptLoop:\n\(accepts.joined(separator: "\n"))")
        let clocks = try Self.matches(Self.rawMonotonic, in: outside)
        #expect(clocks.isEmpty, "monotonic clocks outside MonotonicClock:\n\(clocks.joined(separator: "\n"))")
    }

    /// The test targets follow the modules (issue 17, item 5; Docs/ARCHITECTURE.md "Tests"): the
    /// engine's tests and the helpers every target shares import nothing of the server or the
    /// application, the volumes' tests nothing of the server, and the server's tests nothing of
    /// the pool.
    @Test func lowerTestTargetsDoNotImportTheLayersAboveThem() throws {
        let engine = try Self.files("Tests/PmemPoolTests") + Self.files("Tests/TestSupport")
        #expect(engine.count >= 8, "the audit found only \(engine.map(\.path))")
        let up = try Self.matches(Self.serverImport, in: engine)
        #expect(up.isEmpty, "engine tests or TestSupport importing the server or the application:\n\(up.joined(separator: "\n"))")
        let server = try Self.files("Tests/NBDServerTests")
        #expect(!server.isEmpty)
        let down = try Self.matches(Self.poolImport, in: server)
        #expect(down.isEmpty, "server tests importing the pool:\n\(down.joined(separator: "\n"))")
        let volumes = try Self.files("Tests/PmemVolumesTests")
        #expect(!volumes.isEmpty)
        let above = try Self.matches(Self.serverImport, in: volumes)
        #expect(above.isEmpty, "volume tests importing the server or the application:\n\(above.joined(separator: "\n"))")
    }

    static let serverImport = #"^\s*(@testable\s+)?import\s+(NBDServer|NBDTLS|PmemNBD|PmemFeed|PmemFeedClient|PmemDAX|pmem_nbd)\b"#
    static let poolImport = #"^\s*(@testable\s+)?import\s+(PmemPool|PmemVolumes|PmemFeed|PmemNBD|pmem_nbd)\b"#

    /// Every mutex, condition and thread handle is one of PmemSystem's types (`PosixMutex`,
    /// `PosixMutexes`, `PosixCondition`, `ReadWriteLock`, `OSThread`; issue 17): no `pthread_`
    /// call or type elsewhere, such as a lock stored inline in another module's struct.
    @Test func pthreadsStayInPmemSystem() throws {
        let sources = try Self.files("Sources")
        let outside = sources.filter { !$0.path.hasPrefix("Sources/PmemSystem/") }
        let uses = try Self.matches(Self.rawPthread, in: outside)
        #expect(uses.isEmpty, "pthread_ used outside PmemSystem:\n\(uses.joined(separator: "\n"))")
    }

    static let rawPthread = #"\bpthread_\w+"#
    static let cImport = #"^\s*import\s+CPmemSupport\b"#
    static let rawMapping = #"\b(mmap|munmap)\s*\("#
    static let rawAccept = #"\bSocket\.accept\s*\(|\bEpoll\s*\("#
    static let rawMonotonic = #"CLOCK_MONOTONIC|DispatchTime\.now"#

    /// A negative control: the patterns find what they are meant to find.
    @Test func thePatternsMatchTheDefectsTheyGuardAgainst() throws {
        let samples: [(path: String, lines: [String])] = [("Sample.swift", [
            "let flags = loadBigEndian(UInt32.self, from: bytes.withUnsafeBytes { $0.baseAddress! })",
            "let p = withUnsafePointer(to: &x) { $0 }",
            "let q = data.withUnsafeMutableBytes { b in b.baseAddress }",
            "DispatchQueue.global().async { work() }",
            "let e = journal.load(off) & MapEntry.blockMask",
            "let ok = bytes.withUnsafeBytes { loadBigEndian(UInt32.self, from: $0.baseAddress!) }",
            "import CPmemSupport",
            "guard let p = mmap(nil, 4096, PROT_READ, MAP_SHARED, fd, 0) else { return }",
            "let c = try Socket.accept(listener)",
            "let epoll = try Epoll()",
            "clock_gettime(CLOCK_MONOTONIC, &ts)",
            "let start = DispatchTime.now().uptimeNanoseconds",
            "import NBDServer",
            "@testable import PmemNBD",
            "import PmemPool",
            "import NBDServerSupport",
            "        var lock = pthread_mutex_t()",
            "pthread_mutex_lock(&s.pointee.lock)",
            "// pthread_mutex_unlock in a comment is not code",
        ])]
        #expect(try Self.matches(#"withUnsafe\w*(\([^()]*\))?\s*\{\s*(\$0|(\w+)\s+in\s+\3)(\.baseAddress!?)?\s*\}"#, in: samples).count == 3)
        #expect(try Self.matches(#"\bDispatchQueue\b|\bThread\s*[({]|\.detachNewThread|\bDispatchSource\b"#, in: samples).count == 1)
        #expect(try Self.matches(#"&\s*MapEntry\.blockMask"#, in: samples).count == 1)
        #expect(try Self.matches(Self.cImport, in: samples).count == 1)
        #expect(try Self.matches(Self.rawMapping, in: samples).count == 1)
        #expect(try Self.matches(Self.rawAccept, in: samples).count == 2)
        #expect(try Self.matches(Self.rawMonotonic, in: samples).count == 2)
        #expect(try Self.matches(Self.serverImport, in: samples).count == 2)
        #expect(try Self.matches(Self.poolImport, in: samples).count == 2)
        #expect(try Self.matches(Self.rawPthread, in: samples).count == 2)
    }
}
