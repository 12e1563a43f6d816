#!/usr/bin/env python3
"""A raw NBD client that speaks extended headers (NBD_OPT_EXTENDED_HEADERS), for the fuzz
corpus: no packaged client does yet (Debian's libnbd 1.14 predates them). scripts/fuzz corpus
runs it through its recording proxy like the other clients.

    fuzz-extended-client.py SOCKET EXPORT [--orderings] [--record FILE]

The default conversation negotiates extended headers and meta contexts, then sends every
command with 32-byte headers (including rejected ones whose payload the server must skip)
and checks each reply is an extended chunk for its cookie. --orderings tries the option
orderings (STRUCTURED_REPLY before and after, repeats) and ends with a compact header, which
the server must hang up on. --record writes the bytes sent (the client side, as the proxy
records it) to FILE, cut to 64 KiB.
"""
import socket
import struct
import sys

OPT_MAGIC = 0x49484156454F5054
EXT_REQUEST, EXT_REPLY = 0x21E41C71, 0x6E8A278C
PAYLOAD_LEN, FUA, NO_HOLE, DF, REQ_ONE = 0x20, 1, 2, 4, 8


class Client:
    def __init__(self, path):
        self.s = socket.socket(socket.AF_UNIX)
        self.s.settimeout(10)
        self.s.connect(path)
        self.sent = bytearray()

    def send(self, b):
        self.sent += b
        self.s.sendall(b)

    def recv(self, n):
        out = bytearray()
        while len(out) < n:
            b = self.s.recv(n - len(out))
            if not b:
                raise EOFError("server closed the connection")
            out += b
        return bytes(out)

    def option(self, code, data=b""):
        self.send(struct.pack(">QII", OPT_MAGIC, code, len(data)) + data)

    def option_replies(self, code):
        """Option replies up to the final one; returns [(type, data)]."""
        out = []
        while True:
            _, opt, typ, n = struct.unpack(">QIII", self.recv(20))
            assert opt == code, (opt, code)
            out.append((typ, self.recv(n)))
            if typ == 1 or typ & 0x80000000:
                return out

    def request(self, typ, offset, length, flags=0, cookie=0, payload=b""):
        self.send(struct.pack(">IHHQQQ", EXT_REQUEST, flags, typ, cookie, offset, length) + payload)

    def reply(self, cookie, offset):
        """Chunks of one reply up to DONE; returns [(type, payload)]."""
        chunks = []
        while True:
            magic, flags, typ, c, off, n = struct.unpack(">IHHQQQ", self.recv(32))
            assert magic == EXT_REPLY and c == cookie and off == offset, (hex(magic), c, off)
            chunks.append((typ, self.recv(n)))
            if flags & 1:
                return chunks


def name_data(export, count_fmt=">H", items=()):
    e = export.encode()
    return struct.pack(">I", len(e)) + e + struct.pack(count_fmt, len(items)) + b"".join(items)


def meta_data(export, queries):
    return name_data(export, ">I", [struct.pack(">I", len(q)) + q.encode() for q in queries])


def go(c, export):
    c.option(7, name_data(export, ">H", [struct.pack(">H", 3)]))
    assert c.option_replies(7)[-1][0] == 1


def conversation(c, export):
    c.recv(18)
    c.send(struct.pack(">I", 3))
    c.option(11)
    assert c.option_replies(11) == [(1, b"")]
    c.option(9, meta_data(export, ["base:"]))
    c.option_replies(9)
    c.option(10, meta_data(export, ["base:allocation"]))
    assert c.option_replies(10)[-1][0] == 1
    go(c, export)
    cookie = 0

    def rt(typ, offset, length, flags=0, payload=b"", error=None):
        nonlocal cookie
        cookie += 1
        c.request(typ, offset, length, flags, cookie, payload)
        chunks = c.reply(cookie, offset)
        failed = [t for t, _ in chunks if t & 0x8000]
        assert bool(failed) == (error is not None), (typ, chunks)
        if error is not None:
            assert struct.unpack(">I", chunks[-1][1][:4])[0] == error, chunks

    rt(1, 4096, 4096, PAYLOAD_LEN | FUA, b"x" * 4096)
    rt(1, 12288, 5000, PAYLOAD_LEN, b"y" * 5000)
    rt(0, 0, 8192)
    rt(0, 0, 65536, DF)
    rt(7, 0, 1 << 20)
    rt(7, 0, 1 << 20, REQ_ONE)
    rt(4, 65536, 65536)
    rt(6, 4096, 131072)
    rt(6, 4096, 4096, NO_HOLE)
    rt(5, 0, 1 << 20)
    rt(3, 0, 0)
    rt(0, 0, 0)
    rt(4, 0, 100, PAYLOAD_LEN, b"\x21\xe4\x1c\x71" + b"\0" * 96, error=22)
    rt(1, 0, 4096, error=22)
    rt(0, 64 << 20, 4096, error=22)
    rt(0, 0, (32 << 20) + 1, error=75)
    c.request(2, 0, 0)


def orderings(c, export):
    c.recv(18)
    c.send(struct.pack(">I", 3))
    c.option(8)
    assert c.option_replies(8)[-1][0] == 1
    c.option(11, b"\0")
    assert c.option_replies(11)[-1][0] == 0x80000003
    c.option(11)
    assert c.option_replies(11)[-1][0] == 1
    c.option(11)
    assert c.option_replies(11)[-1][0] == 0x80000003
    c.option(8)
    assert c.option_replies(8)[-1][0] == 0x8000000A
    c.option(6, name_data(export, ">H", [struct.pack(">H", 3)]))
    assert c.option_replies(6)[-1][0] == 1
    go(c, export)
    c.request(3, 0, 0, cookie=1)
    c.reply(1, 0)
    # A compact header: the server must hang up.
    c.send(struct.pack(">IHHQQI", 0x25609513, 0, 0, 2, 0, 512) + b"\0" * 4)
    try:
        assert c.s.recv(1) == b""
    except ConnectionResetError:
        pass


def main():
    args = sys.argv[1:]
    record = None
    if "--record" in args:
        i = args.index("--record")
        record = args[i + 1]
        del args[i:i + 2]
    path, export = args[0], args[1]
    c = Client(path)
    (orderings if "--orderings" in args else conversation)(c, export)
    if record:
        open(record, "wb").write(bytes(c.sent[:65536]))


if __name__ == "__main__":
    main()
