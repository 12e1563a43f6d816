/// A pre-shared key file as `psktool` writes it: one `username:hexkey` line per user.
/// Blank lines and lines starting with `#` are skipped.
public struct PSKFile: Sendable, Equatable {
    /// Keys by username.
    public private(set) var keys: [String: [UInt8]] = [:]

    /// Parses the file's text; `path` names the file in error messages.
    public init(text: String, path: String) throws(TLSError) {
        var lineNumber = 0
        // Character.isNewline takes "\r\n" (one Character in Swift) as one line end.
        for line in text.split(omittingEmptySubsequences: false, whereSeparator: \.isNewline) {
            lineNumber += 1
            if line.allSatisfy({ $0 == " " || $0 == "\t" }) || line.hasPrefix("#") { continue }
            let at = "\(path) line \(lineNumber)"
            guard let colon = line.lastIndex(of: ":") else {
                throw TLSError("\(at): expected username:hexkey (as psktool writes it)")
            }
            let user = String(line[..<colon])
            guard !user.isEmpty else { throw TLSError("\(at): empty username") }
            guard let key = PSKFile.decodeHex(line[line.index(after: colon)...]) else {
                throw TLSError("\(at): the key of '\(user)' is not an even number of hexadecimal digits")
            }
            guard !key.isEmpty else { throw TLSError("\(at): the key of '\(user)' is empty") }
            guard keys[user] == nil else { throw TLSError("\(at): '\(user)' is listed twice") }
            keys[user] = key
        }
        guard !keys.isEmpty else { throw TLSError("\(path) holds no keys (create one with: psktool -u USER -p \(path))") }
    }

    static func decodeHex(_ s: Substring) -> [UInt8]? {
        let digits = Array(s.utf8)
        guard digits.count % 2 == 0 else { return nil }
        func value(_ c: UInt8) -> UInt8? {
            switch c {
            case UInt8(ascii: "0")...UInt8(ascii: "9"): c - UInt8(ascii: "0")
            case UInt8(ascii: "a")...UInt8(ascii: "f"): c - UInt8(ascii: "a") + 10
            case UInt8(ascii: "A")...UInt8(ascii: "F"): c - UInt8(ascii: "A") + 10
            default: nil
            }
        }
        var out: [UInt8] = []
        out.reserveCapacity(digits.count / 2)
        var i = 0
        while i < digits.count {
            guard let hi = value(digits[i]), let lo = value(digits[i + 1]) else { return nil }
            out.append(hi << 4 | lo)
            i += 2
        }
        return out
    }
}
