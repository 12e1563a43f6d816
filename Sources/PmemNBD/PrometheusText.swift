/// The Prometheus text exposition format, version 0.0.4: written by the metrics endpoint and
/// read back by `pmem-nbd stats`.
public struct PrometheusText {
    public private(set) var text = ""

    public init() {}

    /// Starts a metric family: its `# HELP` and `# TYPE` lines.
    public mutating func family(_ name: String, _ type: String, _ help: String) {
        var escaped = ""
        for c in help {
            switch c {
            case "\\": escaped += "\\\\"
            case "\n": escaped += "\\n"
            default: escaped.append(c)
            }
        }
        text += "# HELP \(name) \(escaped)\n"
        text += "# TYPE \(name) \(type)\n"
    }

    public mutating func sample(_ name: String, _ labels: [(String, String)], _ value: UInt64) { line(name, labels, String(value)) }
    public mutating func sample(_ name: String, _ labels: [(String, String)], _ value: Int) { line(name, labels, String(value)) }
    public mutating func sample(_ name: String, _ labels: [(String, String)], _ value: Double) { line(name, labels, Self.format(value)) }
    public mutating func sample(_ name: String, _ value: UInt64) { line(name, [], String(value)) }
    public mutating func sample(_ name: String, _ value: Int) { line(name, [], String(value)) }
    public mutating func sample(_ name: String, _ value: Double) { line(name, [], Self.format(value)) }

    private mutating func line(_ name: String, _ labels: [(String, String)], _ value: String) {
        text += name
        if !labels.isEmpty {
            text += "{" + labels.map { "\($0.0)=\"\(Self.escapeLabel($0.1))\"" }.joined(separator: ",") + "}"
        }
        text += " " + value + "\n"
    }

    static func escapeLabel(_ s: String) -> String {
        var out = ""
        for c in s {
            switch c {
            case "\\": out += "\\\\"
            case "\"": out += "\\\""
            case "\n": out += "\\n"
            default: out.append(c)
            }
        }
        return out
    }

    public static func format(_ v: Double) -> String {
        if v.isNaN { return "NaN" }
        if v.isInfinite { return v > 0 ? "+Inf" : "-Inf" }
        if v == v.rounded(), abs(v) < 1e15 { return String(Int64(v)) }
        return "\(v)"
    }

    /// Nanoseconds as decimal seconds, exactly ("0.000002", "1").
    public static func seconds(nanoseconds ns: UInt64) -> String {
        let whole = ns / 1_000_000_000, frac = ns % 1_000_000_000
        if frac == 0 { return String(whole) }
        var digits = String(frac)
        digits = String(repeating: "0", count: 9 - digits.count) + digits
        while digits.hasSuffix("0") { digits.removeLast() }
        return "\(whole).\(digits)"
    }

    // MARK: reading

    public struct Sample: Sendable, Equatable {
        public var name: String
        public var labels: [String: String]
        public var value: Double
    }

    /// A parsed exposition: families' types and help, and every sample in order.
    public struct Document: Sendable {
        public var types: [String: String] = [:]
        public var help: [String: String] = [:]
        public var samples: [Sample] = []

        /// The value of the one sample with this name and these labels (all must match).
        public func value(_ name: String, _ labels: [String: String] = [:]) -> Double? {
            samples.first { $0.name == name && $0.labels == labels }?.value
        }

        /// The samples of a name.
        public func samples(_ name: String) -> [Sample] { samples.filter { $0.name == name } }
    }

    public struct ParseError: Error, CustomStringConvertible {
        public var line: Int
        public var reason: String
        public var description: String { "metrics text, line \(line): \(reason)" }
    }

    /// Parses the text format strictly enough to catch malformed output: metric and label
    /// names, quoting and escapes, numeric values, TYPE lines naming known types before their
    /// samples.
    public static func parse(_ text: String) throws(ParseError) -> Document {
        var doc = Document()
        for (i, raw) in text.split(separator: "\n", omittingEmptySubsequences: false).enumerated() {
            let line = Substring(raw)
            let number = i + 1
            if line.isEmpty { continue }
            if line.hasPrefix("#") {
                let words = line.split(separator: " ", maxSplits: 3, omittingEmptySubsequences: true)
                guard words.count >= 3, words[0] == "#", words[1] == "TYPE" || words[1] == "HELP" else { continue }
                let name = String(words[2])
                guard isMetricName(name) else { throw ParseError(line: number, reason: "bad metric name '\(name)'") }
                if words[1] == "TYPE" {
                    let type = words.count > 3 ? String(words[3]) : ""
                    guard ["counter", "gauge", "histogram", "summary", "untyped"].contains(type) else {
                        throw ParseError(line: number, reason: "unknown type '\(type)'")
                    }
                    guard doc.types[name] == nil else { throw ParseError(line: number, reason: "second TYPE for \(name)") }
                    guard !doc.samples.contains(where: { family(of: $0.name, types: [name: type]) == name }) else {
                        throw ParseError(line: number, reason: "TYPE of \(name) after its samples")
                    }
                    doc.types[name] = type
                } else {
                    doc.help[name] = words.count > 3 ? String(words[3]) : ""
                }
                continue
            }
            doc.samples.append(try sample(line, number))
        }
        return doc
    }

    /// The family a sample belongs to (`x_bucket` → `x` for a histogram `x`).
    public static func family(of name: String, types: [String: String]) -> String {
        for suffix in ["_bucket", "_sum", "_count"] where name.hasSuffix(suffix) {
            let base = String(name.dropLast(suffix.count))
            if let t = types[base], t == "histogram" || (t == "summary" && suffix != "_bucket") { return base }
        }
        return name
    }

    static func isMetricName(_ s: String) -> Bool {
        guard let first = s.unicodeScalars.first, first == "_" || first == ":" || first.isASCIILetter else { return false }
        return s.unicodeScalars.allSatisfy { $0 == "_" || $0 == ":" || $0.isASCIILetter || ("0"..."9").contains($0) }
    }

    static func isLabelName(_ s: String) -> Bool {
        guard let first = s.unicodeScalars.first, first == "_" || first.isASCIILetter else { return false }
        return s.unicodeScalars.allSatisfy { $0 == "_" || $0.isASCIILetter || ("0"..."9").contains($0) }
    }

    private static func sample(_ line: Substring, _ number: Int) throws(ParseError) -> Sample {
        let chars = Array(line.unicodeScalars)
        var i = 0
        while i < chars.count && chars[i] != "{" && chars[i] != " " { i += 1 }
        let name = String(String.UnicodeScalarView(chars[0..<i]))
        guard isMetricName(name) else { throw ParseError(line: number, reason: "bad metric name '\(name)'") }
        var labels: [String: String] = [:]
        if i < chars.count && chars[i] == "{" {
            i += 1
            while true {
                guard i < chars.count else { throw ParseError(line: number, reason: "unterminated labels") }
                if chars[i] == "}" { i += 1; break }
                var j = i
                while j < chars.count && chars[j] != "=" { j += 1 }
                let label = String(String.UnicodeScalarView(chars[i..<j]))
                guard isLabelName(label), j + 1 < chars.count, chars[j + 1] == "\"" else {
                    throw ParseError(line: number, reason: "bad label '\(label)'")
                }
                j += 2
                var value = ""
                while true {
                    guard j < chars.count else { throw ParseError(line: number, reason: "unterminated label value") }
                    let c = chars[j]
                    if c == "\"" { j += 1; break }
                    if c == "\\" {
                        guard j + 1 < chars.count else { throw ParseError(line: number, reason: "bad escape") }
                        switch chars[j + 1] {
                        case "\\": value += "\\"
                        case "\"": value += "\""
                        case "n": value += "\n"
                        default: throw ParseError(line: number, reason: "bad escape")
                        }
                        j += 2
                        continue
                    }
                    value.unicodeScalars.append(c)
                    j += 1
                }
                guard labels[label] == nil else { throw ParseError(line: number, reason: "label \(label) twice") }
                labels[label] = value
                if j < chars.count && chars[j] == "," { j += 1 }
                i = j
            }
        }
        let rest = String(String.UnicodeScalarView(chars[i...])).split(separator: " ")
        guard rest.count == 1 || rest.count == 2, i < chars.count, chars[i] == " " else {
            throw ParseError(line: number, reason: "expected one value (and maybe a timestamp)")
        }
        guard let value = parseValue(String(rest[0])) else { throw ParseError(line: number, reason: "bad value '\(rest[0])'") }
        if rest.count == 2 && Int64(rest[1]) == nil { throw ParseError(line: number, reason: "bad timestamp") }
        return Sample(name: name, labels: labels, value: value)
    }

    public static func parseValue(_ s: String) -> Double? {
        switch s {
        case "+Inf", "Inf": return .infinity
        case "-Inf": return -.infinity
        case "NaN": return .nan
        default: return Double(s)
        }
    }
}

extension Unicode.Scalar {
    fileprivate var isASCIILetter: Bool { ("a"..."z").contains(self) || ("A"..."Z").contains(self) }
}
