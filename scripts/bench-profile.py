#!/usr/bin/env python3
"""Per-operation costs of pmem-nbd and nbdkit-memory, side by side (Docs/PERFORMANCE.md).

For each server and workload it runs fio (ioengine=nbd, Unix socket) for a fixed time while
`perf stat` watches the server process, and divides by the operations fio completed:
system calls, context switches (a thread going to sleep or being preempted: each is a
wake-up on the request's path), CPU time split into user and system. With --record it also
keeps a `perf record -g` profile of pmem-nbd per workload and prints its top symbols.
Numbers, not timings, are the point: they explain the latency and CPU ratios that
scripts/bench measures and are steady on a busy machine.

usage: scripts/bench-profile.py --bin .build/release/pmem-nbd [--rt 5] [--record]
"""
import argparse, os, re, signal, subprocess, sys, tempfile, time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench  # noqa: E402  (servers, start, stop, fill, fio)

WORKLOADS = [("randread", "4k", 1), ("randwrite", "4k", 1), ("randwrite", "4k", 32), ("write", "1M", 8)]
EVENTS = ["raw_syscalls:sys_enter", "context-switches", "task-clock"]


def perf_stat(pid, out):
    """Counts for the server's threads, including connection threads created meanwhile (their
    counts arrive when they exit, so perf is stopped only after fio's connection closed)."""
    return subprocess.Popen(["perf", "stat", "-x", ",", "-o", out, "-e", ",".join(EVENTS), "-p", str(pid)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def cpu_split(pid):
    """User and system seconds of the whole process (exited threads included)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) / bench.TICKS, int(fields[12]) / bench.TICKS


def parse_stat(path):
    values = {}
    for line in open(path):
        parts = line.strip().split(",")
        if len(parts) > 3 and parts[0] and parts[0][0].isdigit():
            values[parts[2]] = float(parts[0])
    return values


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", required=True)
    ap.add_argument("--rt", type=int, default=5)
    ap.add_argument("--size", default="512M")
    ap.add_argument("--record", action="store_true")
    args = ap.parse_args()
    d = tempfile.mkdtemp(prefix="pmem-nbd-profile.")
    shm = tempfile.mkdtemp(prefix="pmem-nbd-profile.", dir="/dev/shm")
    wanted = {"nbdkit-memory", "pmem-nbd", "pmem-nbd-cl"}
    all_servers = [s for s in bench.servers(args, os.path.abspath(args.bin), d, shm) if s["name"] in wanted]
    print(f"{'server':<14} {'workload':<16} {'IOPS':>8} {'p50_us':>7} {'syscalls/op':>11} {'ctxsw/op':>8} "
          f"{'user_us/op':>10} {'sys_us/op':>9}")
    for server in all_servers:
        ep = {"sock": os.path.join(d, server["name"] + ".sock")}
        with open(os.path.join(d, server["name"] + ".log"), "w") as log:
            p = bench.start(server, ep, log)
            try:
                uri = bench.uri_for(ep)
                bench.fill(uri, args.size)
                for rw, bs, qd in WORKLOADS:
                    stat_out = os.path.join(d, "stat.txt")
                    st = perf_stat(p.pid, stat_out)
                    u0, s0 = cpu_split(p.pid)
                    rec = None
                    data = os.path.join(d, f"{server['name']}-{rw}-{bs}-{qd}.perf")
                    if args.record and server["name"].startswith("pmem"):
                        rec = subprocess.Popen(["perf", "record", "-F", "499", "-g", "-o", data, "-p", str(p.pid)],
                                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                    time.sleep(0.3)
                    r = bench.fio(uri, rw, bs, qd, 1, args.size, args.rt)
                    time.sleep(0.5)
                    u1, s1 = cpu_split(p.pid)
                    for q in (st, rec):
                        if q:
                            q.send_signal(signal.SIGINT)
                            q.wait()
                    v = parse_stat(stat_out)
                    # fio's steady IOPS × its runtime: the operations the server saw (ramp-up aside).
                    ops = r["iops"] * args.rt
                    def per(k, scale=1.0):
                        return v.get(k, 0) * scale / ops if ops else 0
                    print(f"{server['name']:<14} {rw + '/' + bs + '/qd' + str(qd):<16} {r['iops']:>8.0f} {r['p50_us']:>7.1f} "
                          f"{per('raw_syscalls:sys_enter'):>11.2f} {per('context-switches'):>8.2f} "
                          f"{(u1 - u0) * 1e6 / ops:>10.2f} {(s1 - s0) * 1e6 / ops:>9.2f}", flush=True)
                    if rec:
                        top = subprocess.run(["perf", "report", "-i", data, "--no-children", "--percent-limit", "2",
                                              "--stdio", "--sort", "symbol", "-g", "none"], capture_output=True, text=True).stdout
                        lines = [l for l in top.splitlines() if re.match(r"\s+\d+\.\d+%", l)][:14]
                        print("    " + "\n    ".join(l.strip() for l in lines))
            finally:
                bench.stop(p, server)
    subprocess.run(["rm", "-rf", d, shm])


if __name__ == "__main__":
    main()
