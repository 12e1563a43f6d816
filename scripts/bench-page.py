#!/usr/bin/env python3
"""Writes where users are (issue 15): pmem-nbd in page mode on an ordinary file and on tmpfs,
against the tools people compare it with, plus the control plane.

Every server is up at once (as ../shared/bench/peer-bench.sh does), each device filled with 1 MiB
writes first; then each workload runs on every server in turn, ROUNDS times (A B C A B C ...), so
the machine's drift hits every server alike, and the tables show the median of the rounds.

Servers: nbdkit-file and qemu-nbd (raw file on the disk), nbdkit-memory; pmem-nbd with its pool
file on the disk, nearly full (a 1 GiB volume with the default 1/16 reserve) and with headroom
(2 GiB pool, 1 GiB volume); pmem-nbd with its pool on tmpfs in page and in cache-line mode.

Workloads: the six of the issue (fio ioengine=nbd, Unix sockets), and for the servers on the disk
the write workloads again with a FLUSH every 32 writes (fio fsync=32) and as FUA writes
(scripts/nbd-fua-bench.c: fio's nbd engine cannot send FUA).

Control plane: `pmem-nbd snapshot create` against a served pool with a writer running (process
start included), and 4K random writes after 1000 snapshots against none.

    scripts/bench --page-speed [--rt 6] [--rounds 3] [--json FILE] [--only REGEX] [--no-control]
"""
import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench  # noqa: E402  (start, stop, fio, fill, cpu_ticks, make_disk, rm, parse_size)

SIZE = "1G"
GIB = 1 << 30
MIB = 1 << 20

# name, rw, bs, iodepth, jobs, mode ("" plain fio, "fsync" fio fsync=32, "fua" nbd-fua-bench)
WORKLOADS = [
    ("randwrite", "4k", 32, 1, ""),
    ("randwrite", "4k", 1, 1, ""),
    ("randrw", "4k", 16, 4, ""),
    ("write", "1M", 8, 1, ""),
    ("randread", "4k", 32, 1, ""),
    ("read", "1M", 8, 1, ""),
    ("randwrite", "4k", 32, 1, "fsync"),
    ("randwrite", "4k", 1, 1, "fsync"),
    ("randrw", "4k", 16, 4, "fsync"),
    ("write", "1M", 8, 1, "fsync"),
    ("randwrite", "4k", 32, 1, "fua"),
    ("randwrite", "4k", 1, 1, "fua"),
    ("write", "1M", 8, 1, "fua"),
]
DISK = ["pmem-disk", "pmem-disk-room", "nbdkit-file", "qemu-nbd"]
MEMORY = ["pmem-tmpfs-page", "pmem-tmpfs-cl", "nbdkit-memory"]


def wname(w):
    rw, bs, qd, jobs, mode = w
    return f"{rw}/{bs}/qd{qd}/j{jobs}" + (f"+{mode}" if mode else "")


def nearly_full_pool_bytes(volume):
    """The smallest pool (whole MiB) whose default reserve (capacity/16, at least 16 MiB) still
    leaves `volume` bytes: PoolLayout.compute, mirrored."""
    def layout_blocks(pool):
        table_end = 12288 + 1024 * 128
        journal_off = (table_end + 65535) & ~65535
        journal = min(16 << 20, max(256 << 10, (pool // 128) & ~4095))
        rc_off = journal_off + journal
        blocks = (pool - rc_off) // 4096
        while True:
            rc = (blocks * 4 + 4095) // 4096 * 4096
            area = (rc_off + rc + (2 << 20) - 1) // (2 << 20) * (2 << 20)
            if area + blocks * 4096 <= pool:
                return blocks
            blocks -= max(1, (area + blocks * 4096 - pool) // 4096)
    pool = volume
    while True:
        cap = layout_blocks(pool) * 4096
        if cap - max(16 * MIB, cap // 16) >= volume:
            return pool
        pool += MIB


def servers(bin_path, d, shm):
    def pmem(name, pool, pool_bytes, persistence):
        create = [bin_path, "create", pool, "--size", f"{pool_bytes // MIB}M", "--volume-size", SIZE]

        def cmd(ep):
            return [bin_path, "serve", pool, "--persistence", persistence, "--feed", "none",
                    "--control", ep["sock"] + ".ctl", "--unix", ep["sock"]]
        return dict(name=name, pool=pool, setup=lambda: (bench.rm(pool), subprocess.run(create, check=True, stdout=subprocess.DEVNULL)),
                    cmd=cmd, cleanup=lambda: bench.rm(pool))

    kfile, qfile = os.path.join(d, "nbdkit-file.img"), os.path.join(d, "qemu-nbd.img")
    return [
        dict(name="nbdkit-file", setup=lambda: bench.make_disk(kfile, SIZE), cmd=lambda ep: ["nbdkit", "-f", "-U", ep["sock"], "file", kfile]),
        dict(name="qemu-nbd", setup=lambda: bench.make_disk(qfile, SIZE),
             cmd=lambda ep: ["qemu-nbd", "-t", "-k", ep["sock"], "-f", "raw", "--cache=writeback", "--aio=threads", "-e", "16", qfile]),
        dict(name="nbdkit-memory", cmd=lambda ep: ["nbdkit", "-f", "-U", ep["sock"], "memory", f"size={SIZE}"]),
        pmem("pmem-disk", os.path.join(d, "full.pool"), nearly_full_pool_bytes(GIB), "page"),
        pmem("pmem-disk-room", os.path.join(d, "room.pool"), 2 * GIB, "page"),
        pmem("pmem-tmpfs-page", os.path.join(shm, "page.pool"), GIB + 256 * MIB, "page"),
        pmem("pmem-tmpfs-cl", os.path.join(shm, "cl.pool"), GIB + 256 * MIB, "cacheline"),
    ]


def fua(tool, uri, rw, bs, qd, rt):
    out = subprocess.run([tool, uri, rw, str(bench.parse_size(bs.upper())), str(qd), str(rt), str(GIB)],
                         capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"nbd-fua-bench failed: {out.stderr.strip()[-300:]}")
    iops, mbps, p50, p99 = (float(x) for x in out.stdout.split())
    return dict(iops=iops, mbps=mbps, p50_us=p50, p99_us=p99)


def measure(server, pid, uri, w, args):
    rw, bs, qd, jobs, mode = w
    c0, t0 = bench.cpu_ticks(pid), time.monotonic()
    if mode == "fua":
        r = fua(args.fua_tool, uri, rw, bs, qd, args.rt)
    else:
        r = fio(uri, rw, bs, qd, jobs, args.rt, fsync=32 if mode == "fsync" else 0)
    c1 = bench.cpu_ticks(pid)
    ops = r["iops"] * args.rt
    r["cpu_us_per_op"] = (c1 - c0) / bench.TICKS * 1e6 / ops if ops else 0
    r["elapsed"] = time.monotonic() - t0
    return r


def fio(uri, rw, bs, qd, jobs, rt, fsync=0):
    cmd = ["fio", "--name=j", "--ioengine=nbd", f"--uri={uri}", f"--rw={rw}", f"--bs={bs}", f"--iodepth={qd}",
           f"--numjobs={jobs}", "--group_reporting", f"--size={SIZE}", "--time_based", f"--runtime={rt}",
           "--output-format=json", "--percentile_list=50:99"]
    if fsync:
        cmd.append(f"--fsync={fsync}")
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"fio failed: {r.stderr.strip()[-400:]}")
    job = json.loads(r.stdout[r.stdout.index("{"):])["jobs"][0]
    rd, wr = job["read"], job["write"]
    main = rd if rd["iops"] >= wr["iops"] else wr
    pct = main["clat_ns"].get("percentile", {})
    return dict(iops=rd["iops"] + wr["iops"], mbps=(rd["bw_bytes"] + wr["bw_bytes"]) / 1e6,
                p50_us=pct.get("50.000000", 0) / 1000, p99_us=pct.get("99.000000", 0) / 1000)


def load_average():
    return float(open("/proc/loadavg").read().split()[0])


def median_rows(rows):
    out = {}
    for (s, w), rs in rows.items():
        out[(s, w)] = {k: statistics.median(r[k] for r in rs) for k in ("iops", "mbps", "p50_us", "p99_us", "cpu_us_per_op")}
        out[(s, w)]["rounds"] = len(rs)
    return out


def show(v, w):
    return f"{v['mbps']:,.0f} MB/s" if w[1] == "1M" else f"{v['iops']:,.0f}"


def print_tables(med, names):
    print("\n== IOPS (MB/s for 1M), median of the rounds")
    cols = [n for n in ["pmem-disk", "pmem-disk-room", "nbdkit-file", "qemu-nbd", "pmem-tmpfs-page", "pmem-tmpfs-cl", "nbdkit-memory"] if n in names]
    print("| workload | " + " | ".join(cols) + " |")
    print("|---|" + "---|" * len(cols))
    for w in WORKLOADS:
        cells = [show(med[(c, wname(w))], w) if (c, wname(w)) in med else "" for c in cols]
        if any(cells):
            print(f"| {wname(w)} | " + " | ".join(cells) + " |")
    print("\n== server CPU per operation (µs), median of the rounds")
    print("| workload | " + " | ".join(cols) + " |")
    print("|---|" + "---|" * len(cols))
    for w in WORKLOADS:
        cells = [f"{med[(c, wname(w))]['cpu_us_per_op']:.1f}" if (c, wname(w)) in med else "" for c in cols]
        if any(cells):
            print(f"| {wname(w)} | " + " | ".join(cells) + " |")
    print("\n== ratios (IOPS: higher is better; CPU per op: lower is better)")
    print("| workload | disk, nearly full vs better of nbdkit-file/qemu-nbd | disk, headroom vs same | tmpfs page vs nbdkit-memory | tmpfs cache-line vs nbdkit-memory |")
    print("|---|---|---|---|---|")
    ratios = []
    for w in WORKLOADS:
        n = wname(w)
        peers = [med[(p, n)] for p in ("nbdkit-file", "qemu-nbd") if (p, n) in med]
        best = max(peers, key=lambda v: v["iops"]) if peers else None
        cells = []
        for mine, ref in (("pmem-disk", best), ("pmem-disk-room", best),
                          ("pmem-tmpfs-page", med.get(("nbdkit-memory", n))), ("pmem-tmpfs-cl", med.get(("nbdkit-memory", n)))):
            v = med.get((mine, n))
            if v and ref and ref["iops"] > 0:
                iops = v["iops"] / ref["iops"]
                cpu = v["cpu_us_per_op"] / ref["cpu_us_per_op"] if ref["cpu_us_per_op"] > 0 else 0
                cells.append(f"{iops:.2f}× (CPU {cpu:.2f}×)")
                ratios.append(dict(server=mine, workload=n, iops=iops, cpu_per_op=cpu))
            else:
                cells.append("")
        print(f"| {n} | " + " | ".join(cells) + " |")
    return ratios


def control_plane(args, bin_path, d, shm):
    """CLI latency against a served pool with a writer running, and writes after 1000 snapshots."""
    result = {}
    ctl_py = os.path.join(os.path.dirname(os.path.abspath(__file__)), "control.py")
    # A. `pmem-nbd snapshot create` with fio writing to the volume (pool on the disk).
    pool = os.path.join(d, "ctl.pool")
    bench.rm(pool)
    subprocess.run([bin_path, "create", pool, "--size", "2G", "--volume-size", "1G"], check=True, stdout=subprocess.DEVNULL)
    sock = os.path.join(d, "ctl.sock")
    with open(os.path.join(d, "ctl.log"), "w") as log:
        p = subprocess.Popen([bin_path, "serve", pool, "--unix", sock, "--feed", "none"], stdout=log, stderr=log, start_new_session=True)
        try:
            for _ in range(200):
                if os.path.exists(sock) and os.path.exists(pool + ".ctl"):
                    break
                time.sleep(0.05)
            uri = f"nbd+unix:///?socket={sock}"
            bench.fill(uri, "256M")
            writer = subprocess.Popen(["fio", "--name=w", "--ioengine=nbd", f"--uri={uri}", "--rw=randwrite", "--bs=4k", "--iodepth=4",
                                       "--size=1G", "--time_based", "--runtime=600"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                time.sleep(1)
                times = []
                for i in range(30):
                    t0 = time.monotonic()
                    subprocess.run([bin_path, "snapshot", "create", f"pmem0@c{i}", "--pool", pool], check=True, stdout=subprocess.DEVNULL)
                    times.append((time.monotonic() - t0) * 1e3)
            finally:
                writer.terminate()
                writer.wait()
            times.sort()
            result["cli_snapshot_create_ms"] = dict(median=statistics.median(times), p90=times[int(len(times) * 0.9)], min=times[0], max=times[-1])
            print(f"\n== control plane\n`pmem-nbd snapshot create` against the served pool with fio writing (30 runs, process start included): "
                  f"median {statistics.median(times):.1f} ms, p90 {times[int(len(times) * 0.9)]:.1f} ms, min {times[0]:.1f} ms, max {times[-1]:.1f} ms")
        finally:
            bench.stop(p, dict(cleanup=lambda: bench.rm(pool)))
    # B. 4K randwrite QD32 with no snapshot, then after 1000 (pool on tmpfs, prefaulted).
    pool = os.path.join(shm, "snap.pool")
    bench.rm(pool)
    subprocess.run([bin_path, "create", pool, "--size", "2560M", "--name", "vol", "--volume-size", "1G", "--prefault"], check=True,
                   stdout=subprocess.DEVNULL)
    sock = os.path.join(d, "snap.sock")
    with open(os.path.join(d, "snap.log"), "w") as log:
        p = subprocess.Popen([bin_path, "serve", pool, "--unix", sock, "--control", sock + ".ctl", "--feed", "none", "--prefault", "-v"],
                             stdout=log, stderr=log, start_new_session=True)
        try:
            for _ in range(600):
                if os.path.exists(sock) and "mapped" in open(os.path.join(d, "snap.log")).read():
                    break
                time.sleep(0.1)
            uri = f"nbd+unix:///vol?socket={sock}"
            bench.fill(uri, SIZE)
            none = statistics.median(fio(uri, "randwrite", "4k", 32, 1, args.rt)["iops"] for _ in range(args.rounds))
            subprocess.run([sys.executable, ctl_py, sock + ".ctl", "--repeat", "1000", '{"op":"snapshot-create","name":"vol@s%d"}'],
                           check=True, stdout=subprocess.DEVNULL)
            first = fio(uri, "randwrite", "4k", 32, 1, 2)["iops"]
            steady = statistics.median(fio(uri, "randwrite", "4k", 32, 1, args.rt)["iops"] for _ in range(args.rounds))
            result["snapshots_1000"] = dict(none=none, first_2s=first, steady=steady, ratio_first=first / none, ratio_steady=steady / none)
            print(f"4K randwrite QD32, pool on tmpfs: no snapshot {none:,.0f} IOPS; after 1000 snapshots: first 2 s {first:,.0f} IOPS "
                  f"({first / none:.2f}×), then {steady:,.0f} IOPS ({steady / none:.2f}×)")
        finally:
            bench.stop(p, dict(cleanup=lambda: bench.rm(pool)))
    return result


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", required=True)
    ap.add_argument("--fua-tool", required=True)
    ap.add_argument("--rt", type=int, default=6)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", default="bench-page.json")
    ap.add_argument("--only", default=".", help="regex of server names")
    ap.add_argument("--workloads", default=".", help="regex of workload names")
    ap.add_argument("--no-control", action="store_true")
    ap.add_argument("--dir", default="/var/tmp", help="scratch folder on the disk")
    args = ap.parse_args()
    d = tempfile.mkdtemp(prefix="pmem-nbd-bench-page.", dir=args.dir)
    shm = tempfile.mkdtemp(prefix="pmem-nbd-bench-page.", dir="/dev/shm")
    result = dict(date=time.strftime("%Y-%m-%d %H:%M"), machine=os.uname().release, cpus=os.cpu_count(), rt=args.rt,
                  rounds=args.rounds, load_before=load_average())
    print(f"load average before: {result['load_before']:.2f}", flush=True)
    running = []
    try:
        all_servers = [s for s in servers(args.bin, d, shm) if re.search(args.only, s["name"])]
        for s in all_servers:
            ep = {"sock": os.path.join(d, s["name"] + ".sock")}
            log = open(os.path.join(d, s["name"] + ".log"), "w")
            p = bench.start(s, ep, log)
            running.append((s, p, f"nbd+unix:///?socket={ep['sock']}"))
            bench.fill(running[-1][2], SIZE)
            print(f"started and filled {s['name']}", flush=True)
        rows = {}
        for w in WORKLOADS:
            if not re.search(args.workloads, wname(w)):
                continue
            for r in range(args.rounds):
                for s, p, uri in running:
                    if w[4] and s["name"] not in DISK:
                        continue
                    v = measure(s, p.pid, uri, w, args)
                    rows.setdefault((s["name"], wname(w)), []).append(v)
                    print(f"  round {r + 1} {s['name']:<16} {wname(w):<26} {v['iops']:>9.0f} IOPS {v['mbps']:>8.1f} MB/s "
                          f"p50 {v['p50_us']:>8.1f} us  cpu/op {v['cpu_us_per_op']:>7.2f} us", flush=True)
        med = median_rows(rows)
        result["median"] = [dict(server=s, workload=w, **v) for (s, w), v in med.items()]
        result["ratios"] = print_tables(med, [s["name"] for s, _, _ in running])
    finally:
        for s, p, _ in running:
            bench.stop(p, s)
    if not args.no_control:
        result["control"] = control_plane(args, args.bin, d, shm)
    result["load_after"] = load_average()
    print(f"\nload average after: {result['load_after']:.2f}")
    with open(args.json, "w") as f:
        json.dump(result, f, indent=1)
    print(f"JSON: {args.json}")
    shutil.rmtree(d, ignore_errors=True)
    shutil.rmtree(shm, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
