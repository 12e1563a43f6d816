import Foundation
import Glibc
import NBDWire
import PmemSystem

/// A hand-driven socket for sending malformed or hostile bytes. It builds messages byte by
/// byte (not with the server's codec) and reads replies with a timeout.
final class RawClient: @unchecked Sendable {
    let fd: FileDescriptor

    init(unix path: String) throws {
        fd = try Socket.connectUnix(path: path)
        var tv = timeval(tv_sec: 10, tv_usec: 0)
        setsockopt(fd.rawValue, SOL_SOCKET, SO_RCVTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
    }

    deinit { fd.close() }

    func send(_ bytes: [UInt8]) throws { try fd.writeAll(bytes: bytes) }

    /// Reads exactly `n` bytes; nil if the server closed the connection first.
    func receive(_ n: Int) throws -> [UInt8]? {
        var out = [UInt8](repeating: 0, count: n)
        var got = 0
        while got < n {
            let r = out.withUnsafeMutableBytes { Glibc.read(fd.rawValue, $0.baseAddress! + got, n - got) }
            if r == 0 { return nil }
            if r < 0 {
                if errno == EINTR { continue }
                if errno == ECONNRESET { return nil }
                throw Errno.current
            }
            got += r
        }
        return out
    }

    /// True if the server has closed the connection (read returns end of stream).
    func isClosedByServer() -> Bool {
        var b: UInt8 = 0
        let r = Glibc.read(fd.rawValue, &b, 1)
        return r == 0 || (r < 0 && errno == ECONNRESET)
    }

    // MARK: message builders (independent of the server's codec)

    static func be<T: FixedWidthInteger>(_ v: T) -> [UInt8] { withUnsafeBytes(of: v.bigEndian) { Array($0) } }

    static func option(_ code: UInt32, _ data: [UInt8], magic: UInt64 = 0x4948_4156_454F_5054) -> [UInt8] {
        be(magic) + be(code) + be(UInt32(data.count)) + data
    }

    static func request(type: UInt16, flags: UInt16 = 0, cookie: UInt64, offset: UInt64, length: UInt32, magic: UInt32 = 0x2560_9513) -> [UInt8] {
        be(magic) + be(flags) + be(type) + be(cookie) + be(offset) + be(length)
    }

    /// Reads the 18-byte greeting and sends client flags.
    func greet(clientFlags: UInt32 = 3) throws -> [UInt8] {
        guard let g = try receive(18) else { throw Errno.connectionReset }
        try send(RawClient.be(clientFlags))
        return g
    }

    struct OptionReply {
        var option: UInt32
        var type: UInt32
        var data: [UInt8]
    }

    func optionReply() throws -> OptionReply? {
        guard let h = try receive(20) else { return nil }
        let magic = h[0..<8].reduce(UInt64(0)) { $0 << 8 | UInt64($1) }
        precondition(magic == 0x0003_e889_0455_65a9, "bad option reply magic")
        let option = h[8..<12].reduce(UInt32(0)) { $0 << 8 | UInt32($1) }
        let type = h[12..<16].reduce(UInt32(0)) { $0 << 8 | UInt32($1) }
        let len = Int(h[16..<20].reduce(UInt32(0)) { $0 << 8 | UInt32($1) })
        guard let data = try receive(len) else { return nil }
        return OptionReply(option: option, type: type, data: data)
    }

    /// Sends GO for `name` with structured replies first when asked; returns the export size.
    func go(name: String = "", structured: Bool = true, metaContexts: [String] = []) throws -> UInt64 {
        if structured {
            try send(RawClient.option(8, []))
            guard let r = try optionReply(), r.type == 1 else { throw Errno.ioError }
        }
        if !metaContexts.isEmpty {
            var data = RawClient.be(UInt32(name.utf8.count)) + Array(name.utf8) + RawClient.be(UInt32(metaContexts.count))
            for m in metaContexts { data += RawClient.be(UInt32(m.utf8.count)) + Array(m.utf8) }
            try send(RawClient.option(10, data))
            while let r = try optionReply(), r.type != 1 { if r.type & 0x8000_0000 != 0 { throw Errno.ioError } }
        }
        try send(RawClient.option(7, RawClient.be(UInt32(name.utf8.count)) + Array(name.utf8) + RawClient.be(UInt16(0))))
        var size: UInt64 = 0
        while true {
            guard let r = try optionReply() else { throw Errno.connectionReset }
            if r.type == 3, r.data.count >= 12, r.data[0] == 0, r.data[1] == 0 {
                size = r.data[2..<10].reduce(UInt64(0)) { $0 << 8 | UInt64($1) }
            } else if r.type == 1 {
                return size
            } else if r.type & 0x8000_0000 != 0 {
                throw Errno.ioError
            }
        }
    }

    struct SimpleReply {
        var error: UInt32
        var cookie: UInt64
    }

    struct Chunk {
        var flags: UInt16
        var type: UInt16
        var cookie: UInt64
        var payload: [UInt8]
        var errorCode: UInt32? { type & 0x8000 != 0 ? payload[0..<4].reduce(UInt32(0)) { $0 << 8 | UInt32($1) } : nil }
    }

    enum AnyReply {
        case simple(SimpleReply)
        case chunk(Chunk)
        var cookie: UInt64 {
            switch self {
            case .simple(let s): s.cookie
            case .chunk(let c): c.cookie
            }
        }
        var error: UInt32 {
            switch self {
            case .simple(let s): s.error
            case .chunk(let c): c.errorCode ?? 0
            }
        }
    }

    /// Reads one simple reply or structured chunk (without read payloads for simple replies).
    func reply() throws -> AnyReply? {
        guard let m = try receive(4) else { return nil }
        let magic = m.reduce(UInt32(0)) { $0 << 8 | UInt32($1) }
        if magic == 0x6744_6698 {
            guard let r = try receive(12) else { return nil }
            return .simple(SimpleReply(error: r[0..<4].reduce(UInt32(0)) { $0 << 8 | UInt32($1) },
                                       cookie: r[4..<12].reduce(UInt64(0)) { $0 << 8 | UInt64($1) }))
        }
        precondition(magic == 0x668e_33ef, "unexpected reply magic \(String(magic, radix: 16))")
        guard let r = try receive(16) else { return nil }
        let len = Int(r[12..<16].reduce(UInt32(0)) { $0 << 8 | UInt32($1) })
        guard let payload = try receive(len) else { return nil }
        return .chunk(Chunk(flags: UInt16(r[0]) << 8 | UInt16(r[1]), type: UInt16(r[2]) << 8 | UInt16(r[3]),
                            cookie: r[4..<12].reduce(UInt64(0)) { $0 << 8 | UInt64($1) }, payload: payload))
    }
}

/// Half-closes a raw client: the server reads end of file, the client can still read.
func Socket_shutdownWrite(_ raw: RawClient) { Glibc.shutdown(raw.fd.rawValue, Int32(SHUT_WR)) }
