#!/usr/bin/env python3
"""Side-by-side NBD server benchmark: pmem-nbd against nbdkit (null, memory, file) and qemu-nbd.

The method is that of ../shared/bench/peer-bench.sh (each server on its own socket, the whole
device filled with 1 MiB writes first, then fio ioengine=nbd per workload, the server's CPU time
from /proc), with more measured: p50 and p99 completion latency, the server's memory beyond its
data (RssAnon), a TCP variant, multi-connection scaling, and 64 connections at once. It prints
a table per transport and the ratio of each pmem-nbd configuration to each peer, and writes
everything as JSON.

    scripts/bench [--rt 6] [--size 1G] [--json bench.json] [--only REGEX] [--no-tcp] [--no-conn64]

Run through `scripts/bench`, which builds pmem-nbd first.
"""
import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

WORKLOADS = [  # rw, bs, iodepth, jobs (connections)
    ("randread", "4k", 32, 1),
    ("randwrite", "4k", 32, 1),
    ("randread", "4k", 1, 1),
    ("randwrite", "4k", 1, 1),
    ("randrw", "4k", 16, 1),
    ("randrw", "4k", 16, 2),
    ("randrw", "4k", 16, 4),
    ("write", "1M", 8, 1),
    ("read", "1M", 8, 1),
]
TCP_SERVERS = {"nbdkit-memory", "pmem-nbd", "pmem-nbd-cl"}
TICKS = os.sysconf("SC_CLK_TCK")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def servers(args, bin_path, d, shm):
    size = args.size
    pool_mb = parse_size(size) // (1 << 20) + 256

    def pmem(name, pool, persistence):
        create = [bin_path, "create", pool, "--size", f"{pool_mb}M", "--volume-size", size]
        def cmd(ep):
            listen = ["--unix", ep["sock"]] if "sock" in ep else ["--port", str(ep["port"]), "--bind", "127.0.0.1"]
            return [bin_path, "serve", pool, "--persistence", persistence, "--control", "none", "--feed", "none"] + listen
        return dict(name=name, setup=lambda: (rm(pool), subprocess.run(create, check=True, stdout=subprocess.DEVNULL)),
                    cmd=cmd, cleanup=lambda: rm(pool))

    def nbdkit(name, *plugin):
        def cmd(ep):
            listen = ["-U", ep["sock"]] if "sock" in ep else ["-p", str(ep["port"]), "-i", "127.0.0.1"]
            return ["nbdkit", "-f"] + listen + list(plugin)
        return dict(name=name, cmd=cmd)

    disk = os.path.join(d, "disk.img")

    def qemu(ep):
        listen = ["-k", ep["sock"]] if "sock" in ep else ["-p", str(ep["port"]), "-b", "127.0.0.1"]
        return ["qemu-nbd", "-t", "-f", "raw", "--cache=writeback", "--aio=threads", "-e", "64"] + listen + [disk]

    return [
        nbdkit("nbdkit-null", "null", f"size={size}"),
        nbdkit("nbdkit-memory", "memory", f"size={size}"),
        dict(nbdkit("nbdkit-file", "file", disk), setup=lambda: make_disk(disk, size)),
        dict(name="qemu-nbd", cmd=qemu, setup=lambda: make_disk(disk, size)),
        pmem("pmem-nbd", os.path.join(shm, "a.pool"), "page"),
        pmem("pmem-nbd-cl", os.path.join(shm, "b.pool"), "cacheline"),
        pmem("pmem-nbd-disk", os.path.join(d, "c.pool"), "page"),
    ]


def parse_size(s):
    m = re.fullmatch(r"(\d+)([KMGT]?)", s)
    return int(m.group(1)) << {"": 0, "K": 10, "M": 20, "G": 30, "T": 40}[m.group(2)]


def rm(path):
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def make_disk(path, size):
    rm(path)
    with open(path, "wb") as f:
        f.truncate(parse_size(size))


def cpu_ticks(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def memory(pid):
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("VmRSS", "RssAnon", "RssFile", "RssShmem"):
                out[k] = int(v.split()[0]) * 1024
    return out


def uri_for(ep):
    return f"nbd+unix:///?socket={ep['sock']}" if "sock" in ep else f"nbd://127.0.0.1:{ep['port']}/"


def start(server, ep, log):
    if "setup" in server:
        server["setup"]()
    p = subprocess.Popen(server["cmd"](ep), stdout=log, stderr=log, start_new_session=True)
    for _ in range(200):
        if "sock" in ep and os.path.exists(ep["sock"]):
            break
        if "port" in ep:
            try:
                socket.create_connection(("127.0.0.1", ep["port"]), timeout=0.2).close()
                break
            except OSError:
                pass
        if p.poll() is not None:
            raise RuntimeError(f"{server['name']} exited at start ({p.returncode})")
        time.sleep(0.05)
    else:
        raise RuntimeError(f"{server['name']} did not start")
    return p


def stop(p, server):
    p.send_signal(signal.SIGTERM)
    try:
        p.wait(20)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()
    if "cleanup" in server:
        server["cleanup"]()


def fio(uri, rw, bs, qd, jobs, size, rt):
    cmd = ["fio", "--name=j", "--ioengine=nbd", f"--uri={uri}", f"--rw={rw}", f"--bs={bs}", f"--iodepth={qd}",
           f"--numjobs={jobs}", "--group_reporting", f"--size={size}", "--time_based", f"--runtime={rt}",
           "--output-format=json", "--percentile_list=50:99"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"fio failed: {r.stderr.strip()[-400:]}")
    job = json.loads(r.stdout[r.stdout.index("{"):])["jobs"][0]
    rd, wr = job["read"], job["write"]
    main = rd if rd["iops"] >= wr["iops"] else wr
    pct = main["clat_ns"].get("percentile", {})
    errors = job.get("error", 0)
    if errors:
        raise RuntimeError(f"fio reported error {errors}")
    return dict(iops=rd["iops"] + wr["iops"], mbps=(rd["bw_bytes"] + wr["bw_bytes"]) / 1e6,
                p50_us=pct.get("50.000000", 0) / 1000, p99_us=pct.get("99.000000", 0) / 1000)


def fill(uri, size):
    """Writes the whole device once, so reads hit data, not holes."""
    subprocess.run(["fio", "--name=fill", "--ioengine=nbd", f"--uri={uri}", "--rw=write", "--bs=1M", "--iodepth=8",
                    f"--size={size}"], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def run_server(server, ep, args, d, workloads):
    rows = []
    with open(os.path.join(d, server["name"] + ".log"), "w") as log:
        p = start(server, ep, log)
        try:
            uri = uri_for(ep)
            fill(uri, args.size)
            for rw, bs, qd, jobs in workloads:
                c0 = cpu_ticks(p.pid)
                t0 = time.monotonic()
                r = fio(uri, rw, bs, qd, jobs, args.size, args.rt)
                elapsed = time.monotonic() - t0
                c1 = cpu_ticks(p.pid)
                ops = r["iops"] * args.rt
                r["cpu_us_per_op"] = (c1 - c0) / TICKS * 1e6 / ops if ops else 0
                r["cpu_cores"] = (c1 - c0) / TICKS / elapsed
                r.update(server=server["name"], workload=f"{rw}/{bs}/qd{qd}/j{jobs}", **{"rss_anon_mib": memory(p.pid).get("RssAnon", 0) / 2**20})
                rows.append(r)
                print(f"  {r['server']:<14} {r['workload']:<20} {r['iops']:>9.0f} {r['mbps']:>9.1f} {r['p50_us']:>8.1f} {r['p99_us']:>9.1f}"
                      f" {r['cpu_us_per_op']:>8.2f} {r['rss_anon_mib']:>7.1f}", flush=True)
        finally:
            stop(p, server)
    return rows


def conn64(server, ep, args, d):
    """64 connections at once (fio numjobs=64, randrw QD4): the server's anonymous memory
    sampled during the run, against what it had idle after the fill."""
    with open(os.path.join(d, server["name"] + ".c64.log"), "w") as log:
        p = start(server, ep, log)
        try:
            uri = uri_for(ep)
            fill(uri, args.size)
            idle = memory(p.pid)
            f = subprocess.Popen(["fio", "--name=j", "--ioengine=nbd", f"--uri={uri}", "--rw=randrw", "--bs=4k", "--iodepth=4",
                                  "--numjobs=64", "--group_reporting", f"--size={args.size}", "--time_based", "--runtime=8",
                                  "--output-format=json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            peak = idle
            while f.poll() is None:
                time.sleep(0.5)
                m = memory(p.pid)
                if m.get("RssAnon", 0) > peak.get("RssAnon", 0):
                    peak = m
            out, err = f.communicate()
            if f.returncode != 0:
                raise RuntimeError(f"fio (64 connections) failed: {err[-300:]}")
            job = json.loads(out[out.index("{"):])["jobs"][0]
            return dict(server=server["name"], idle_rss_anon_mib=idle.get("RssAnon", 0) / 2**20,
                        peak_rss_anon_mib=peak.get("RssAnon", 0) / 2**20, peak_vmrss_mib=peak.get("VmRSS", 0) / 2**20,
                        iops=job["read"]["iops"] + job["write"]["iops"], errors=job.get("error", 0))
        finally:
            stop(p, server)


def ratios(rows, peers, mine):
    by = {(r["server"], r["workload"]): r for r in rows}
    out = []
    for m in mine:
        for peer in peers:
            for (s, w), r in by.items():
                if s != m or (peer, w) not in by:
                    continue
                q = by[(peer, w)]
                def ratio(a, b):
                    return a / b if b else 0.0
                out.append(dict(server=m, peer=peer, workload=w, iops=ratio(r["iops"], q["iops"]),
                                p50=ratio(r["p50_us"], q["p50_us"]), p99=ratio(r["p99_us"], q["p99_us"]),
                                cpu_per_op=ratio(r["cpu_us_per_op"], q["cpu_us_per_op"])))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", required=True)
    ap.add_argument("--rt", type=int, default=6)
    ap.add_argument("--size", default="1G")
    ap.add_argument("--json", default="bench.json")
    ap.add_argument("--only", default=".")
    ap.add_argument("--no-tcp", action="store_true")
    ap.add_argument("--no-conn64", action="store_true")
    args = ap.parse_args()
    d = tempfile.mkdtemp(prefix="pmem-nbd-bench.", dir="/var/tmp")
    shm = tempfile.mkdtemp(prefix="pmem-nbd-bench.", dir="/dev/shm")
    result = dict(date=time.strftime("%Y-%m-%d %H:%M"), machine=os.uname().release, cpus=os.cpu_count(), rt=args.rt,
                  size=args.size, unix=[], tcp=[], conn64=[])
    header = f"  {'server':<14} {'workload':<20} {'IOPS':>9} {'MB/s':>9} {'p50_us':>8} {'p99_us':>9} {'cpu/op':>8} {'anonMiB':>7}"
    try:
        all_servers = [s for s in servers(args, args.bin, d, shm) if re.search(args.only, s["name"])]
        print(f"== Unix sockets (RT={args.rt}s, {args.size})\n{header}")
        for s in all_servers:
            result["unix"] += run_server(s, {"sock": os.path.join(d, s["name"] + ".sock")}, args, d, WORKLOADS)
        if not args.no_tcp:
            print(f"\n== TCP 127.0.0.1\n{header}")
            for s in all_servers:
                if s["name"] in TCP_SERVERS:
                    result["tcp"] += run_server(s, {"port": free_port()}, args, d, WORKLOADS)
        if not args.no_conn64:
            print("\n== 64 connections at once (fio numjobs=64 randrw 4k QD4, 8 s), server memory beyond its data")
            for s in all_servers:
                if s["name"] in ("nbdkit-memory", "pmem-nbd", "pmem-nbd-cl"):
                    r = conn64(s, {"sock": os.path.join(d, s["name"] + ".c64.sock")}, args, d)
                    result["conn64"].append(r)
                    print(f"  {r['server']:<14} RssAnon idle {r['idle_rss_anon_mib']:.1f} MiB, peak {r['peak_rss_anon_mib']:.1f} MiB"
                          f" (VmRSS {r['peak_vmrss_mib']:.0f} MiB incl. mapped data), {r['iops']:.0f} IOPS, fio errors {r['errors']}")
        mine = ["pmem-nbd", "pmem-nbd-cl", "pmem-nbd-disk"]
        result["ratios_unix"] = ratios(result["unix"], ["nbdkit-memory", "nbdkit-file", "qemu-nbd"], mine)
        result["ratios_tcp"] = ratios(result["tcp"], ["nbdkit-memory"], mine)
        for name, rs in (("Unix", result["ratios_unix"]), ("TCP", result["ratios_tcp"])):
            if not rs:
                continue
            print(f"\n== ratios, {name} (IOPS: higher is better; latency and CPU/op: lower is better)")
            for r in rs:
                if r["peer"] == "nbdkit-memory" or name == "Unix" and r["server"] == "pmem-nbd":
                    print(f"  {r['server']:<14} vs {r['peer']:<14} {r['workload']:<20} IOPS {r['iops']:5.2f}x  p50 {r['p50']:5.2f}x"
                          f"  p99 {r['p99']:5.2f}x  cpu/op {r['cpu_per_op']:5.2f}x")
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
        print(f"\nJSON: {args.json}")
    finally:
        shutil.rmtree(d, ignore_errors=True)
        shutil.rmtree(shm, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
