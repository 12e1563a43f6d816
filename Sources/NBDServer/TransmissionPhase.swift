import Glibc
import NBDWire
import PmemSystem

/// The payload of a WRITE: buffered bytes first, then from the socket (straight into the
/// destination when large). Pending replies are sent before the thread blocks on the socket.
struct PayloadSource: ByteSource {
    let receive: ReceiveBuffer
    let replies: ReplyWriter
    private(set) var consumed: UInt64 = 0

    init(receive: ReceiveBuffer, replies: ReplyWriter) {
        self.receive = receive
        self.replies = replies
    }

    mutating func fill(_ destination: UnsafeMutableRawBufferPointer, nonTemporal: Bool) throws(Errno) {
        let replies = self.replies
        try receive.move(into: destination, nonTemporal: nonTemporal, beforeBlocking: { replies.flush() }, afterBlocking: {})
        consumed += UInt64(destination.count)
    }

    mutating func fill(scatter vectors: UnsafeMutableBufferPointer<iovec>, nonTemporal: Bool) throws(Errno) {
        let replies = self.replies
        consumed += UInt64(try receive.move(scatter: vectors, nonTemporal: nonTemporal, beforeBlocking: { replies.flush() }, afterBlocking: {}))
    }
}

/// Per-connection state of the transmission phase, reused across requests so the hot path
/// does not allocate.
struct TransmissionState {
    let session: NegotiatedSession
    let volume: any BlockVolume
    /// How replies are framed; with `.extended`, requests have 32-byte headers too.
    let style: ReplyStyle
    /// Entered from the first reply that points into pool memory until the batch is sent.
    let readGuard: any ReadGuard
    var segments: [Segment] = []
    var extents: [(length: UInt64, status: UInt32)] = []
    /// When the request being handled started (0 when latency is not measured).
    var started: UInt64 = 0
    /// Whether its reply was handed to a worker (which then records its latency).
    var handedOff = false

    init(session: NegotiatedSession, volume: any BlockVolume) {
        self.session = session
        self.volume = volume
        self.style = ReplyStyle(session)
        self.readGuard = volume.makeReadGuard()
        segments.reserveCapacity(64)
        extents.reserveCapacity(256)
    }
}

extension Connection {
    /// Serves requests until DISC, end of stream, a bad magic or a failed send.
    func transmit(session: NegotiatedSession, volume: any BlockVolume) throws(Errno) {
        var state = TransmissionState(session: session, volume: volume)
        let readGuard = state.readGuard
        defer { readGuard.exit() }
        // Chosen once: two copies of the loop, each with its header style a constant, so the
        // compact one decodes exactly as it did before extended headers existed.
        if session.extendedHeaders {
            try serve(&state, extended: true)
        } else {
            try serve(&state, extended: false)
        }
    }

    /// The request loop: parses every complete header buffered, handles each request, sends
    /// the batch of replies, reads more.
    @inline(__always)
    private func serve(_ state: inout TransmissionState, extended: Bool) throws(Errno) {
        let readGuard = state.readGuard
        let headerSize = Request.headerSize(extended: extended)
        while true {
            while receive.available >= headerSize {
                switch Request.decode(receive.readPointer, extended: extended) {
                case .badMagic(let magic):
                    // Includes the other header style's magic: its size differs, the stream is lost.
                    Log.info("connection \(id): bad request magic 0x\(String(magic, radix: 16))\(extended ? " (extended headers)" : ""); disconnecting")
                    return
                case .request(let request):
                    receive.consume(headerSize)
                    state.started = metrics.start(request.typeCode)
                    state.handedOff = false
                    let more = try handle(request, &state)
                    metrics.finished(started: state.started, handedOff: state.handedOff)
                    guard more else { return }
                }
            }
            replies.flush()
            readGuard.exit()
            if replies.failed { return }
            guard try receive.fill(atLeast: headerSize) else { return }
        }
    }

    /// Handles one request; false ends the connection.
    private func handle(_ r: Request, _ state: inout TransmissionState) throws(Errno) -> Bool {
        if case .reject(let error, let message) = RequestCheck.check(r, session: state.session) {
            Log.debug("connection \(id): \(r.type?.name ?? "command \(r.typeCode)") rejected: \(error) \(message)")
            switch RequestCheck.payload(of: r, session: state.session) {
            case .disconnect:
                Log.info("connection \(id): payload of \(r.length) bytes over the maximum; disconnecting")
                return false
            case .consume(let payload):
                if payload > 0 {
                    releasePoolPointers(state)
                    guard try receive.discard(payload) else { return false }
                }
            }
            replyError(r, state, error, message)
            return true
        }
        let volume = state.volume
        let fua = r.flags.contains(.fua)
        let type = r.type!
        switch type {
        case .read, .blockStatus:
            // Replies will point into pool memory (or status was read from maps).
            state.readGuard.enter()
        case .write, .trim, .writeZeroes:
            // A change may free blocks this connection's pending replies point at, and it may
            // need freed blocks back: send those replies and leave the epoch first.
            releasePoolPointers(state)
        default:
            break
        }
        switch type {
        case .read:
            read(r, &state)
        case .write:
            var source = PayloadSource(receive: receive, replies: replies)
            do {
                try volume.write(offset: r.offset, length: Int(r.length), fua: fua && volume.flushIsCheap, from: &source)
            } catch {
                if error.sourceFailed { return false }
                if source.consumed < r.length {
                    replies.flush()
                    guard try receive.discard(r.length - source.consumed) else { return false }
                }
                replyError(r, state, error)
                return true
            }
            metrics.own.add(MetricSlot.bytesWritten, UInt64(r.length))
            complete(r, &state, syncFirst: fua && !volume.flushIsCheap)
        case .disconnect:
            return false
        case .flush:
            complete(r, &state, syncFirst: true)
        case .trim:
            do { try volume.trim(offset: r.offset, length: r.length, fua: fua && volume.flushIsCheap) } catch {
                replyError(r, state, error)
                return true
            }
            metrics.own.add(MetricSlot.bytesTrimmed, UInt64(r.length))
            complete(r, &state, syncFirst: fua && !volume.flushIsCheap)
        case .writeZeroes:
            do {
                try volume.writeZeroes(offset: r.offset, length: r.length, mayTrim: !r.flags.contains(.noHole),
                                       fast: r.flags.contains(.fastZero), fua: fua && volume.flushIsCheap)
            } catch {
                replyError(r, state, error)
                return true
            }
            metrics.own.add(MetricSlot.bytesZeroed, UInt64(r.length))
            complete(r, &state, syncFirst: fua && !volume.flushIsCheap)
        case .cache:
            do { try volume.cache(offset: r.offset, length: r.length) } catch {
                replyError(r, state, error)
                return true
            }
            replyOK(r, state)
        case .blockStatus:
            blockStatus(r, &state)
        case .resize:
            preconditionFailure("RequestCheck rejects RESIZE")
        }
        return true
    }

    /// Sends queued replies that point into pool memory and leaves the read epoch.
    private func releasePoolPointers(_ state: TransmissionState) {
        guard state.readGuard.isEntered else { return }
        replies.flush()
        state.readGuard.exit()
    }

    // MARK: replies

    @inline(__always)
    private func replyOK(_ r: Request, _ state: TransmissionState) {
        replies.success(state.style, cookie: r.cookie, offset: r.offset)
    }

    private func replyError(_ r: Request, _ state: TransmissionState, _ error: StorageError) {
        // Not a request past the end (also ENOSPC): the storage ran out of free blocks.
        if error.code == .noSpace && r.offset <= state.volume.size && UInt64(r.length) <= state.volume.size - r.offset {
            server.warnNoSpace(export: state.session.export.name, command: r.type?.name ?? "request",
                               offset: r.offset, length: UInt64(r.length))
        }
        replyError(r, state, error.code, error.message)
    }

    private func replyError(_ r: Request, _ state: TransmissionState, _ error: NBDErrno, _ message: String) {
        metrics.own.add(MetricSlot.errors(r.typeCode))
        replies.error(state.style, cookie: r.cookie, offset: r.offset, error, message)
    }

    /// Replies success, after a flush of the volume when `syncFirst` (FLUSH, or FUA where a
    /// sync is expensive: that work goes to a worker so this thread keeps reading requests).
    private func complete(_ r: Request, _ state: inout TransmissionState, syncFirst: Bool) {
        guard syncFirst else { return replyOK(r, state) }
        let volume = state.volume
        if volume.flushIsCheap {
            do { try volume.flush() } catch { return replyError(r, state, error) }
            return replyOK(r, state)
        }
        let style = state.style
        let cookie = r.cookie
        let offset = r.offset
        let replies = self.replies
        let metrics = self.metrics
        let started = state.started
        let code = r.typeCode
        state.handedOff = true
        offloaded.enter()
        Workers.shared.run { [offloaded] in
            defer { offloaded.leave() }
            let bytes: [UInt8]
            var failed = false
            do throws(StorageError) {
                try volume.flush()
                bytes = style.encoded(cookie: cookie, offset: offset, error: nil, message: "")
            } catch {
                failed = true
                bytes = style.encoded(cookie: cookie, offset: offset, error: .io, message: error.message)
            }
            // Counted before the reply goes out, so a client that has its reply sees it counted.
            metrics.finishedOffloaded(started: started, failedCode: failed ? code : nil)
            replies.sendNow(bytes)
        }
    }

    // MARK: READ

    private func read(_ r: Request, _ state: inout TransmissionState) {
        let length = Int(r.length)
        state.segments.removeAll(keepingCapacity: true)
        do {
            try state.volume.read(offset: r.offset, length: length) { state.segments.append($0) }
        } catch {
            return replyError(r, state, error)
        }
        metrics.own.add(MetricSlot.bytesRead, UInt64(length))
        let style = state.style
        guard style != .simple else {
            _ = Reply.simple(error: nil, cookie: r.cookie, into: replies.header(Reply.simpleSize))
            for s in state.segments {
                switch s {
                case .data(let p, let n): replies.data(p, n)
                case .hole(let n): replies.zeroes(n)
                }
            }
            return
        }
        if length == 0 {
            replies.none(style, cookie: r.cookie, offset: r.offset)
            return
        }
        if r.flags.contains(.dontFragment) {
            replies.dataHeader(style, cookie: r.cookie, offset: r.offset, dataOffset: r.offset, length: length, done: true)
            for s in state.segments {
                switch s {
                case .data(let p, let n): replies.data(p, n)
                case .hole(let n): replies.zeroes(n)
                }
            }
            return
        }
        // Consecutive data segments form one OFFSET_DATA chunk; holes become OFFSET_HOLE.
        let segments = state.segments
        var i = 0
        var offset = r.offset
        while i < segments.count {
            if case .hole(let n) = segments[i] {
                var total = n
                var j = i + 1
                while j < segments.count, case .hole(let m) = segments[j] { total += m; j += 1 }
                replies.hole(style, cookie: r.cookie, offset: r.offset, holeOffset: offset, length: total, done: j == segments.count)
                offset += UInt64(total)
                i = j
                continue
            }
            var total = 0
            var j = i
            while j < segments.count, case .data(_, let n) = segments[j] { total += n; j += 1 }
            replies.dataHeader(style, cookie: r.cookie, offset: r.offset, dataOffset: offset, length: total, done: j == segments.count)
            for k in i..<j {
                if case .data(let p, let n) = segments[k] { replies.data(p, n) }
            }
            offset += UInt64(total)
            i = j
        }
    }

    // MARK: BLOCK_STATUS

    private func blockStatus(_ r: Request, _ state: inout TransmissionState) {
        guard r.length > 0 else { return replyError(r, state, .invalid, "BLOCK_STATUS of zero length") }
        let one = r.flags.contains(.requestOne)
        let contexts = state.session.metaContexts
        let style = state.style
        let maxLength = style.maxExtentLength
        let maxExtents = style.maxExtentsPerReply
        for (index, context) in contexts.enumerated() {
            state.extents.removeAll(keepingCapacity: true)
            var covered: UInt64 = 0
            do {
                try state.volume.status(context: context.name, offset: r.offset, length: r.length) { n, flags in
                    var left = n
                    if one { left = min(left, r.length) }
                    while left > 0 {
                        let k = min(left, maxLength)
                        if let last = state.extents.last, last.status == flags, k <= maxLength - last.length {
                            state.extents[state.extents.count - 1].length += k
                        } else {
                            state.extents.append((k, flags))
                        }
                        left -= k
                        covered += k
                        if one || covered >= r.length || state.extents.count >= maxExtents { return false }
                    }
                    return true
                }
            } catch {
                return replyError(r, state, error)
            }
            if state.extents.isEmpty { return replyError(r, state, .invalid, "no status for that range") }
            replies.blockStatus(style, cookie: r.cookie, offset: r.offset, contextID: context.id, extents: state.extents,
                                done: index == contexts.count - 1)
        }
    }
}
