import CLibNBD
import Foundation
import PmemSystem

/// An error reported by libnbd: its message and errno.
struct LibNBDError: Error, CustomStringConvertible {
    var errno: Int32
    var message: String
    var description: String { "libnbd: \(message) (errno \(errno))" }

    static func last() -> LibNBDError {
        LibNBDError(errno: nbd_get_errno(), message: nbd_get_error().map { String(cString: $0) } ?? "unknown")
    }
}

/// A libnbd handle: the real client library drives the server in these tests.
final class NBDClient {
    let h: OpaquePointer

    init() throws {
        guard let h = nbd_create() else { throw LibNBDError.last() }
        self.h = h
    }

    deinit {
        // nbd_close waits for a nbd_connect_command child without a limit: give it one.
        if let commandPID { ChildProcess.enforceDeadline(pid: commandPID, timeout: commandDeadline) }
        nbd_close(h)
    }

    @discardableResult
    private func check(_ r: Int32) throws -> Int32 {
        if r < 0 { throw LibNBDError.last() }
        return r
    }

    @discardableResult
    private func check64(_ r: Int64) throws -> Int64 {
        if r < 0 { throw LibNBDError.last() }
        return r
    }

    // MARK: settings before connecting

    func setExportName(_ name: String) throws { try check(nbd_set_export_name(h, name)) }
    func addMetaContext(_ name: String) throws { try check(nbd_add_meta_context(h, name)) }
    func requestStructuredReplies(_ on: Bool) throws { try check(nbd_set_request_structured_replies(h, on)) }
    func requestBlockSize(_ on: Bool) throws { try check(nbd_set_request_block_size(h, on)) }
    func setHandshakeFlags(_ flags: UInt32) throws { try check(nbd_set_handshake_flags(h, flags)) }
    func setStrictMode(_ flags: UInt32) throws { try check(nbd_set_strict_mode(h, flags)) }
    func setOptMode(_ on: Bool) throws { try check(nbd_set_opt_mode(h, on)) }
    func setFullInfo(_ on: Bool) throws { try check(nbd_set_full_info(h, on)) }

    // MARK: TLS

    /// `nbd_set_tls`: LIBNBD_TLS_DISABLE, _ALLOW or _REQUIRE.
    func setTLS(_ mode: Int32) throws { try check(nbd_set_tls(h, mode)) }
    /// `nbd_set_tls_certificates`: a directory with ca-cert.pem (and client-cert.pem, client-key.pem).
    func setTLSCertificates(_ dir: String) throws { try check(nbd_set_tls_certificates(h, dir)) }
    func setTLSPSKFile(_ path: String) throws { try check(nbd_set_tls_psk_file(h, path)) }
    func setTLSUsername(_ name: String) throws { try check(nbd_set_tls_username(h, name)) }
    /// `nbd_get_tls_negotiated`: whether the connection really is encrypted.
    var tlsNegotiated: Bool { get throws { try check(nbd_get_tls_negotiated(h)) == 1 } }

    // MARK: connecting

    func connect(unix path: String) throws { try check(nbd_connect_unix(h, path)) }
    func connect(uri: String) throws { try check(nbd_connect_uri(h, uri)) }
    func connect(tcp host: String, port: UInt16) throws { try check(nbd_connect_tcp(h, host, String(port))) }

    /// The process `connect(command:)` started (libnbd 1.14 has no nbd_get_subprocess_pid).
    private(set) var commandPID: pid_t?
    /// How long that process may outlive the handle before SIGTERM (SIGKILL 5 s later).
    var commandDeadline: Duration = .seconds(20)

    /// `nbd_connect_command` with a deadline: the command runs through a shell that records its
    /// pid and then execs it (keeping the pid), and the handshake is driven with
    /// `nbd_aio_connect_command` + `nbd_poll`, so a command that never answers is stopped after
    /// `timeout` instead of blocking the test.
    func connect(command argv: [String], timeout: Duration = .seconds(60)) throws {
        let pidFile = temporaryLogFile("libnbd-command-pid")
        defer { unlink(pidFile) }
        let wrapped = ["/bin/sh", "-c", "echo $$ > \"$0\"; exec \"$@\"", pidFile] + argv
        var cstrings = wrapped.map { strdup($0) }
        cstrings.append(nil)
        defer { for c in cstrings { free(c) } }
        try check(nbd_aio_connect_command(h, &cstrings))
        let deadline = ContinuousClock.now + timeout
        func readPID() {
            if commandPID == nil, let text = try? String(contentsOfFile: pidFile, encoding: .utf8),
               let pid = pid_t(text.trimmingCharacters(in: .whitespacesAndNewlines)) {
                commandPID = pid
            }
        }
        while nbd_aio_is_connecting(h) == 1 {
            readPID()
            if ContinuousClock.now > deadline {
                if let commandPID { ChildProcess.enforceDeadline(pid: commandPID, timeout: .zero) }
                throw LibNBDError(errno: ETIMEDOUT, message: "\(argv.joined(separator: " ")) did not complete the handshake in \(timeout)")
            }
            try check(nbd_poll(h, 100))
        }
        readPID()
        if nbd_aio_is_ready(h) != 1 && nbd_aio_is_negotiating(h) != 1 { throw LibNBDError.last() }
    }

    // MARK: option mode

    func optGo() throws { try check(nbd_opt_go(h)) }
    func optInfo() throws { try check(nbd_opt_info(h)) }
    func optAbort() throws { try check(nbd_opt_abort(h)) }

    func optList() throws -> [(name: String, description: String)] {
        final class Box { var items: [(String, String)] = [] }
        let box = Box()
        let cb = nbd_list_callback(callback: { user, name, desc in
            let b = Unmanaged<Box>.fromOpaque(user!).takeUnretainedValue()
            b.items.append((String(cString: name!), desc.map { String(cString: $0) } ?? ""))
            return 0
        }, user_data: Unmanaged.passUnretained(box).toOpaque(), free: nil)
        try check(nbd_opt_list(h, cb))
        return box.items.map { (name: $0.0, description: $0.1) }
    }

    func optListMetaContexts() throws -> [String] {
        final class Box { var items: [String] = [] }
        let box = Box()
        let cb = nbd_context_callback(callback: { user, name in
            Unmanaged<Box>.fromOpaque(user!).takeUnretainedValue().items.append(String(cString: name!))
            return 0
        }, user_data: Unmanaged.passUnretained(box).toOpaque(), free: nil)
        try check(nbd_opt_list_meta_context(h, cb))
        return box.items
    }

    // MARK: properties

    var size: UInt64 { get throws { UInt64(try check64(nbd_get_size(h))) } }
    var isReadOnly: Bool { get throws { try check(nbd_is_read_only(h)) == 1 } }
    var canFlush: Bool { get throws { try check(nbd_can_flush(h)) == 1 } }
    var canFUA: Bool { get throws { try check(nbd_can_fua(h)) == 1 } }
    var canTrim: Bool { get throws { try check(nbd_can_trim(h)) == 1 } }
    var canZero: Bool { get throws { try check(nbd_can_zero(h)) == 1 } }
    var canFastZero: Bool { get throws { try check(nbd_can_fast_zero(h)) == 1 } }
    var canDF: Bool { get throws { try check(nbd_can_df(h)) == 1 } }
    var canMultiConn: Bool { get throws { try check(nbd_can_multi_conn(h)) == 1 } }
    var canCache: Bool { get throws { try check(nbd_can_cache(h)) == 1 } }
    var structuredReplies: Bool { get throws { try check(nbd_get_structured_replies_negotiated(h)) == 1 } }
    func canMetaContext(_ name: String) throws -> Bool { try check(nbd_can_meta_context(h, name)) == 1 }
    func blockSize(_ which: Int32) throws -> Int64 { try check64(nbd_get_block_size(h, which)) }
    var protocolName: String { nbd_get_protocol(h).map { String(cString: $0) } ?? "" }
    var canonicalName: String { get throws {
        guard let p = nbd_get_canonical_export_name(h) else { throw LibNBDError.last() }
        defer { free(p) }
        return String(cString: p)
    } }
    var exportDescription: String { get throws {
        guard let p = nbd_get_export_description(h) else { throw LibNBDError.last() }
        defer { free(p) }
        return String(cString: p)
    } }

    // MARK: commands

    func pread(count: Int, offset: UInt64, flags: UInt32 = 0) throws -> [UInt8] {
        var buf = [UInt8](repeating: 0xAA, count: count)
        let r = buf.withUnsafeMutableBytes { nbd_pread(h, $0.baseAddress ?? UnsafeMutableRawPointer(bitPattern: 1)!, count, offset, flags) }
        try check(r)
        return buf
    }

    /// Reads with structured replies, reporting each chunk as (offset, length, isHole).
    func preadChunks(count: Int, offset: UInt64, flags: UInt32 = 0) throws -> (data: [UInt8], chunks: [(UInt64, Int, Bool)]) {
        final class Box { var chunks: [(UInt64, Int, Bool)] = [] }
        let box = Box()
        var buf = [UInt8](repeating: 0xAA, count: count)
        let cb = nbd_chunk_callback(callback: { user, _, count, offset, status, _ in
            let b = Unmanaged<Box>.fromOpaque(user!).takeUnretainedValue()
            b.chunks.append((offset, count, status == UInt32(LIBNBD_READ_HOLE)))
            return 0
        }, user_data: Unmanaged.passUnretained(box).toOpaque(), free: nil)
        let r = buf.withUnsafeMutableBytes { nbd_pread_structured(h, $0.baseAddress!, count, offset, cb, flags) }
        try check(r)
        return (buf, box.chunks)
    }

    func pwrite(_ data: [UInt8], offset: UInt64, flags: UInt32 = 0) throws {
        let r = data.withUnsafeBytes { nbd_pwrite(h, $0.baseAddress ?? UnsafeRawPointer(bitPattern: 1)!, data.count, offset, flags) }
        try check(r)
    }

    func flush() throws { try check(nbd_flush(h, 0)) }
    func trim(count: UInt64, offset: UInt64, flags: UInt32 = 0) throws { try check(nbd_trim(h, count, offset, flags)) }
    func zero(count: UInt64, offset: UInt64, flags: UInt32 = 0) throws { try check(nbd_zero(h, count, offset, flags)) }
    func cache(count: UInt64, offset: UInt64) throws { try check(nbd_cache(h, count, offset, 0)) }
    func shutdown() throws { try check(nbd_shutdown(h, 0)) }

    /// BLOCK_STATUS: the extents (length, flags) per context.
    func blockStatus(count: UInt64, offset: UInt64, flags: UInt32 = 0) throws -> [String: [(UInt32, UInt32)]] {
        final class Box { var result: [String: [(UInt32, UInt32)]] = [:] }
        let box = Box()
        let cb = nbd_extent_callback(callback: { user, ctx, _, entries, n, _ in
            let b = Unmanaged<Box>.fromOpaque(user!).takeUnretainedValue()
            var list: [(UInt32, UInt32)] = []
            var i = 0
            while i + 1 < n {
                list.append((entries![i], entries![i + 1]))
                i += 2
            }
            b.result[String(cString: ctx!), default: []] += list
            return 0
        }, user_data: Unmanaged.passUnretained(box).toOpaque(), free: nil)
        try check(nbd_block_status(h, count, offset, cb, flags))
        return box.result
    }

    // MARK: asynchronous commands (many in flight)

    func aioPread(_ buffer: UnsafeMutableRawBufferPointer, offset: UInt64) throws -> Int64 {
        try check64(nbd_aio_pread(h, buffer.baseAddress!, buffer.count, offset, nbd_completion_callback(callback: nil, user_data: nil, free: nil), 0))
    }

    func aioPwrite(_ buffer: UnsafeRawBufferPointer, offset: UInt64, flags: UInt32 = 0) throws -> Int64 {
        try check64(nbd_aio_pwrite(h, buffer.baseAddress!, buffer.count, offset, nbd_completion_callback(callback: nil, user_data: nil, free: nil), flags))
    }

    func aioFlush() throws -> Int64 { try check64(nbd_aio_flush(h, nbd_completion_callback(callback: nil, user_data: nil, free: nil), 0)) }

    var inFlight: Int32 { nbd_aio_in_flight(h) }

    func poll(timeoutMilliseconds: Int32 = 5000) throws { try check(nbd_poll(h, timeoutMilliseconds)) }

    /// Completes a command: true when done, throws if it failed.
    func completed(_ cookie: Int64) throws -> Bool {
        let r = nbd_aio_command_completed(h, UInt64(cookie))
        if r < 0 { throw LibNBDError.last() }
        return r == 1
    }
}

enum LibNBDTLS {
    static let disable = Int32(LIBNBD_TLS_DISABLE)
    static let allow = Int32(LIBNBD_TLS_ALLOW)
    static let require = Int32(LIBNBD_TLS_REQUIRE)
}

enum LibNBDFlags {
    static let fua = UInt32(LIBNBD_CMD_FLAG_FUA)
    static let noHole = UInt32(LIBNBD_CMD_FLAG_NO_HOLE)
    static let df = UInt32(LIBNBD_CMD_FLAG_DF)
    static let reqOne = UInt32(LIBNBD_CMD_FLAG_REQ_ONE)
    static let fastZero = UInt32(LIBNBD_CMD_FLAG_FAST_ZERO)
    static let fixedNewstyle = UInt32(LIBNBD_HANDSHAKE_FLAG_FIXED_NEWSTYLE)
    static let noZeroes = UInt32(LIBNBD_HANDSHAKE_FLAG_NO_ZEROES)
    static let strictBounds = UInt32(LIBNBD_STRICT_BOUNDS)
    static let strictFlags = UInt32(LIBNBD_STRICT_FLAGS)
    static let strictCommands = UInt32(LIBNBD_STRICT_COMMANDS)
}
