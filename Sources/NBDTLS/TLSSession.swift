import CGnuTLS
import Glibc
import PmemSystem

/// One connection's TLS session (`gnutls_session_t`), server side, over the connection's
/// descriptors. The connection owns it: it is made by `handshake`, used by one receiving and
/// one sending thread at a time (GnuTLS allows that pair in parallel), closed with `bye` and
/// freed on deinit. The descriptors stay the connection's to close.
public final class TLSSession: @unchecked Sendable {
    let session: gnutls_session_t
    /// Kept alive as long as the session: GnuTLS and the PSK callback point into it.
    public let credentials: TLSCredentials
    /// Gathers small pieces of a send into one record (used under the sender's lock).
    private let staging: UnsafeMutableRawPointer
    private let stagingCapacity = 16 * 1024
    /// Bytes of application data per record (the negotiated limit, at most 16 KiB).
    private var recordSize = 16 * 1024

    private init(credentials: TLSCredentials, input: FileDescriptor, output: FileDescriptor) throws(TLSError) {
        var s: gnutls_session_t?
        let r = gnutls_init(&s, UInt32(GNUTLS_SERVER))
        guard r == GNUTLS_E_SUCCESS, let s else { throw TLSError.gnutls("gnutls_init", r) }
        session = s
        self.credentials = credentials
        staging = .allocate(byteCount: stagingCapacity, alignment: 64)
        gnutls_session_set_ptr(s, Unmanaged.passUnretained(credentials).toOpaque())
        if let c = credentials.certificates {
            let r = gnutls_credentials_set(s, GNUTLS_CRD_CERTIFICATE, UnsafeMutableRawPointer(c))
            guard r == GNUTLS_E_SUCCESS else { throw TLSError.gnutls("gnutls_credentials_set", r) }
            if credentials.verifiesPeer {
                gnutls_certificate_server_set_request(s, GNUTLS_CERT_REQUIRE)
                gnutls_session_set_verify_cert(s, nil, 0)
            }
        }
        if let p = credentials.psk {
            let r = gnutls_credentials_set(s, GNUTLS_CRD_PSK, UnsafeMutableRawPointer(p))
            guard r == GNUTLS_E_SUCCESS else { throw TLSError.gnutls("gnutls_credentials_set", r) }
        }
        let p = gnutls_priority_set(s, credentials.priority)
        guard p == GNUTLS_E_SUCCESS else { throw TLSError.gnutls("gnutls_priority_set", p) }
        // read(2)/writev(2) rather than GnuTLS's recv/sendmsg, so pipes (--stdio) work too.
        gnutls_transport_set_int2(s, input.rawValue, output.rawValue)
        gnutls_transport_set_pull_function(s, pull)
        gnutls_transport_set_pull_timeout_function(s, pullTimeout)
        gnutls_transport_set_vec_push_function(s, vecPush)
    }

    deinit {
        gnutls_deinit(session)
        staging.deallocate()
    }

    /// Runs the server side of the TLS handshake (`gnutls_handshake`) on descriptors that have
    /// just sent the ACK to STARTTLS. Fails after `timeoutSeconds` (0: no limit), or when the
    /// client is not authenticated (wrong key, no or untrusted certificate).
    public static func handshake(credentials: TLSCredentials, input: FileDescriptor, output: FileDescriptor,
                                 timeoutSeconds: Int) throws(TLSError) -> TLSSession {
        let t = try TLSSession(credentials: credentials, input: input, output: output)
        // 0 disables GnuTLS's timeout (as `--handshake-timeout 0` asks).
        gnutls_handshake_set_timeout(t.session, UInt32(max(0, timeoutSeconds) * 1000))
        while true {
            let r = gnutls_handshake(t.session)
            if r == GNUTLS_E_SUCCESS { break }
            // With blocking descriptors AGAIN means SO_RCVTIMEO expired: a stalled client.
            if r == GNUTLS_E_AGAIN { throw TLSError("TLS handshake timed out", code: r) }
            if r == GNUTLS_E_INTERRUPTED || gnutls_error_is_fatal(r) == 0 { continue }
            throw TLSError.gnutls("TLS handshake failed", r)
        }
        t.recordSize = min(t.stagingCapacity, max(512, Int(gnutls_record_get_max_size(t.session))))
        return t
    }

    /// `gnutls_session_get_desc` plus the PSK username: what was negotiated, for the log.
    public var details: String {
        var text = "TLS"
        if let d = gnutls_session_get_desc(session) {
            text = String(cString: d)
            cgnutls_free(d)
        }
        if let user = gnutls_psk_server_get_username(session) { text += " psk user '\(String(cString: user))'" }
        return text
    }

    /// `gnutls_record_recv`: decrypted bytes into `buffer`; 0 at the end of the stream (the
    /// client's close_notify, or a close without one). Other failures throw ECONNRESET (or
    /// EAGAIN when a receive timeout expired), as the plain `read` would end the connection.
    public func receive(into buffer: UnsafeMutableRawBufferPointer) throws(Errno) -> Int {
        while true {
            let r = gnutls_record_recv(session, buffer.baseAddress, buffer.count)
            if r >= 0 { return r }
            let code = Int32(r)
            switch code {
            case GNUTLS_E_INTERRUPTED: continue
            case GNUTLS_E_AGAIN: throw .wouldBlock
            case GNUTLS_E_PREMATURE_TERMINATION: return 0
            case GNUTLS_E_REHANDSHAKE:
                Log.debug("TLS: client asked to renegotiate, which is not supported; disconnecting")
                throw .connectionReset
            default:
                if gnutls_error_is_fatal(code) == 0 { continue }
                Log.debug("TLS receive: \(gnutlsMessage(code))")
                throw .connectionReset
            }
        }
    }

    /// Sends `bytes` completely.
    public func send(_ bytes: [UInt8]) throws(Errno) {
        let r: Result<Void, Errno> = bytes.withUnsafeBytes { b in
            Result { () throws(Errno) in
                guard let base = b.baseAddress else { return }
                var v = iovec(iov_base: UnsafeMutableRawPointer(mutating: base), iov_len: b.count)
                try send(&v, 1)
            }
        }
        try r.get()
    }

    /// Sends an iovec list completely, as records: pieces smaller than a record are gathered
    /// into one; larger ones are encrypted from where they are (`gnutls_record_send`).
    /// Callers serialise sends (ReplyWriter's lock).
    public func send(_ vec: UnsafePointer<iovec>, _ count: Int) throws(Errno) {
        var staged = 0
        for i in 0..<count {
            var n = vec[i].iov_len
            guard n > 0, var p = vec[i].iov_base.map({ UnsafeRawPointer($0) }) else { continue }
            while n > 0 {
                if staged == 0 && n >= recordSize {
                    let k = try sendRecord(p, recordSize)
                    p += k
                    n -= k
                } else {
                    let k = min(n, recordSize - staged)
                    (staging + staged).copyMemory(from: p, byteCount: k)
                    staged += k
                    p += k
                    n -= k
                    if staged == recordSize {
                        try sendAll(staging, staged)
                        staged = 0
                    }
                }
            }
        }
        if staged > 0 { try sendAll(staging, staged) }
    }

    private func sendAll(_ p: UnsafeRawPointer, _ n: Int) throws(Errno) {
        var done = 0
        while done < n { done += try sendRecord(p + done, n - done) }
    }

    /// `gnutls_record_send` of up to one record; returns how much went out.
    private func sendRecord(_ p: UnsafeRawPointer, _ n: Int) throws(Errno) -> Int {
        while true {
            let r = gnutls_record_send(session, p, n)
            if r > 0 { return r }
            let code = Int32(r)
            if code == GNUTLS_E_INTERRUPTED || code == GNUTLS_E_AGAIN { continue }
            Log.debug("TLS send: \(gnutlsMessage(code))")
            throw .brokenPipe
        }
    }

    /// `gnutls_bye(GNUTLS_SHUT_WR)`: sends close_notify without waiting for the client's.
    /// Call once no other thread sends.
    public func bye() {
        var r: Int32
        repeat { r = gnutls_bye(session, GNUTLS_SHUT_WR) } while r == GNUTLS_E_INTERRUPTED
    }
}

/// The session's pull function: `read(2)` on the input descriptor (GnuTLS reads errno).
private let pull: @convention(c) (gnutls_transport_ptr_t?, UnsafeMutableRawPointer?, Int) -> Int = { ptr, data, size in
    Glibc.read(Int32(truncatingIfNeeded: Int(bitPattern: ptr)), data, size)
}

/// The session's pull-timeout function (GnuTLS refuses a replaced pull function with its
/// own): `poll(2)` for input on the input descriptor; >0 ready, 0 timed out, -1 error.
private let pullTimeout: @convention(c) (gnutls_transport_ptr_t?, UInt32) -> Int32 = { ptr, ms in
    var p = pollfd(fd: Int32(truncatingIfNeeded: Int(bitPattern: ptr)), events: Int16(POLLIN), revents: 0)
    // GNUTLS_INDEFINITE_TIMEOUT is ((unsigned int)-2), a macro Swift does not import.
    let timeout = ms == UInt32.max - 1 ? -1 : Int32(min(ms, UInt32(Int32.max)))
    return poll(&p, 1, timeout)
}

/// The session's vector push function: `writev(2)` on the output descriptor.
private let vecPush: @convention(c) (gnutls_transport_ptr_t?, UnsafePointer<giovec_t>?, Int32) -> Int = { ptr, iov, count in
    Glibc.writev(Int32(truncatingIfNeeded: Int(bitPattern: ptr)), iov, count)
}
