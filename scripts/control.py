#!/usr/bin/python3
"""Send control requests to a pmem-nbd server (Docs/CONTROL.md) over one connection.

usage: control.py SOCKET '{"op":"list"}' ['{"op":...}' ...]
       control.py SOCKET --repeat N '{"op":"snapshot-create","name":"vol@s%d"}'
Prints each response line. With --repeat, %d in the request is replaced by 1..N.
"""
import json, socket, sys

def main():
    path, args = sys.argv[1], sys.argv[2:]
    requests = []
    if args and args[0] == "--repeat":
        n, template = int(args[1]), args[2]
        requests = [template.replace("%d", str(i + 1)) for i in range(n)]
    else:
        requests = args
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(path)
    f = s.makefile("rwb")
    for r in requests:
        json.loads(r)
        f.write(r.encode() + b"\n")
        f.flush()
        line = f.readline()
        if not line:
            sys.exit("server closed the connection")
        sys.stdout.write(line.decode())
        if not json.loads(line).get("ok"):
            sys.exit(1)

main()
