#!/usr/bin/env python3
"""Session fuzzing of a running pmem-nbd server (scripts/fuzz live; Docs/RELIABILITY.md).

The libFuzzer target covers the codec and the negotiation state machine in-process. This
covers what it cannot: the server's connection threads, receive buffer, transmission loop,
reply writer and the volumes behind them, over real sockets. It mutates the recorded client
conversations of Fuzz/corpus (and Fuzz/regressions) - bit flips, splices, truncations,
repeated chunks, NBD header fields set to edge values - and plays them against the server
from several workers at once, each reading replies until the server closes or goes quiet.

Meanwhile a well-behaved client keeps checking a canary volume that the mutated traffic never
names: its content must stay exactly as written, and every check must answer within seconds.
At the end the server must still serve, exit 0 on SIGTERM, print no sanitizer report, and its
descriptor count and memory must be back near where they started. Inputs that broke something
are saved in Fuzz/crashes/live-*.bin (replay one with --replay FILE).

usage: fuzz-live.py SERVER_BINARY SECONDS [--workers N] [--seed S] [--replay FILE]
"""
import argparse, os, random, socket, struct, subprocess, sys, tempfile, threading, time

REQUEST_MAGIC = struct.pack(">I", 0x25609513)
OPTION_MAGIC = b"IHAVEOPT"
EDGE32 = [0, 1, 511, 4095, 4096, 4097, 0x1FFFFFF, 0x2000000, 0x2000001, 0x7FFFFFFF, 0xFFFFFFFF]
EDGE64 = [0, 1, 4095, 1 << 26, (1 << 26) - 1, 1 << 40, (1 << 63) - 1, (1 << 64) - 1]


def load_corpus(dirs):
    seeds = []
    for d in dirs:
        if not os.path.isdir(d):
            continue
        for name in sorted(os.listdir(d)):
            with open(os.path.join(d, name), "rb") as f:
                data = f.read()
            if data:
                seeds.append(data)
    return seeds


def mutate(rng, seeds):
    data = bytearray(rng.choice(seeds))
    for _ in range(rng.randint(1, 4)):
        kind = rng.randrange(8)
        if kind == 0 and data:  # flip bits
            for _ in range(rng.randint(1, 8)):
                i = rng.randrange(len(data))
                data[i] ^= 1 << rng.randrange(8)
        elif kind == 1 and len(data) > 8:  # truncate
            del data[rng.randrange(8, len(data)):]
        elif kind == 2:  # splice another conversation's tail
            other = rng.choice(seeds)
            at = rng.randrange(len(data) + 1)
            data[at:] = other[rng.randrange(len(other)):]
        elif kind == 3 and data:  # repeat a chunk
            a = rng.randrange(len(data))
            b = min(len(data), a + rng.randint(1, 512))
            data[a:a] = data[a:b] * rng.randint(1, 8)
        elif kind in (4, 5):  # an NBD request's fields: flags, type, offset, length
            hits = [i for i in range(len(data) - 27) if data[i:i + 4] == REQUEST_MAGIC]
            if hits:
                i = rng.choice(hits)
                field = rng.randrange(4)
                if field == 0:
                    data[i + 4:i + 6] = struct.pack(">H", rng.choice([0, 1, 2, 4, 8, 16, 32, 64, 0xFFFF, rng.randrange(65536)]))
                elif field == 1:
                    data[i + 6:i + 8] = struct.pack(">H", rng.choice(list(range(12)) + [0xFFFF]))
                elif field == 2:
                    data[i + 16:i + 24] = struct.pack(">Q", rng.choice(EDGE64))
                else:
                    data[i + 24:i + 28] = struct.pack(">I", rng.choice(EDGE32))
        elif kind == 6:  # an option's length or code
            hits = [i for i in range(len(data) - 15) if data[i:i + 8] == OPTION_MAGIC]
            if hits:
                i = rng.choice(hits)
                if rng.random() < 0.5:
                    data[i + 12:i + 16] = struct.pack(">I", rng.choice(EDGE32))
                else:
                    data[i + 8:i + 12] = struct.pack(">I", rng.choice(list(range(16)) + [0x80000000, 0xFFFFFFFF]))
        elif kind == 7 and data:  # random bytes over a span
            a = rng.randrange(len(data))
            n = rng.randint(1, 32)
            data[a:a + n] = os.urandom(n)
    return bytes(data[:262144])


def play(sock_path, data, rng, quiet=0.5):
    """Sends one conversation (in random pieces) and drains replies until EOF or silence."""
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(quiet)
    try:
        s.connect(sock_path)
        stop = threading.Event()

        def drain():
            while not stop.is_set():
                try:
                    if not s.recv(1 << 20):
                        return
                except (socket.timeout, OSError):
                    return

        reader = threading.Thread(target=drain, daemon=True)
        reader.start()
        at = 0
        while at < len(data):
            n = rng.choice([1, 7, 28, 512, 4096, len(data)])
            s.sendall(data[at:at + n])
            at += n
        if rng.random() < 0.7:
            s.shutdown(socket.SHUT_WR)
        reader.join(quiet + 1)
        stop.set()
    except OSError:
        pass  # the server may close first: that is an allowed answer
    finally:
        s.close()


def nbdsh(code, timeout=20):
    env = dict(os.environ, PATH="/usr/bin:/bin")
    return subprocess.run(["nbdsh", "-c", code], env=env, timeout=timeout, capture_output=True, text=True)


def fd_count(pid):
    return len(os.listdir(f"/proc/{pid}/fd"))


def rss_kib(pid):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1])
    return 0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("binary")
    ap.add_argument("seconds", type=float)
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--seed", type=int, default=int(time.time()))
    ap.add_argument("--replay")
    args = ap.parse_args()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    seeds = load_corpus([os.path.join(root, "Fuzz/corpus"), os.path.join(root, "Fuzz/regressions")])
    if not seeds:
        sys.exit("fuzz-live: no corpus in Fuzz/corpus")
    work = tempfile.mkdtemp(prefix="pmem-nbd-live.")
    pool, sock = os.path.join(work, "pool"), os.path.join(work, "s.sock")
    b = args.binary
    subprocess.run([b, "create", pool, "--size", "160M", "--name", "vol", "--volume-size", "64M"], check=True, capture_output=True)
    subprocess.run([b, "snapshot", "create", "--pool", pool, "vol@s1"], check=True, capture_output=True)
    subprocess.run([b, "volume", "create", "--pool", pool, "canary-7f3a", "--size", "8M"], check=True, capture_output=True)
    log = open(os.path.join(work, "server.log"), "w+")
    env = dict(os.environ, ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:halt_on_error=1:quarantine_size_mb=16")
    server = subprocess.Popen([b, "serve", pool, "--unix", sock, "--feed", "none"], stderr=log, stdout=subprocess.DEVNULL, env=env)
    for _ in range(300):
        if os.path.exists(sock):
            break
        time.sleep(0.1)
    canary_uri = f"nbd+unix:///canary-7f3a?socket={sock}"
    pattern = "bytes((i * 7 + 3) & 255 for i in range(1 << 20))"
    r = nbdsh(f"h.connect_uri('{canary_uri}'); p = {pattern}; [h.pwrite(p, o) for o in range(0, 8 << 20, 1 << 20)]; h.flush()")
    if r.returncode != 0:
        sys.exit(f"fuzz-live: cannot write the canary: {r.stderr}")
    time.sleep(0.5)
    fds0, rss0 = fd_count(server.pid), rss_kib(server.pid)

    failures = []
    played = [0]
    lock = threading.Lock()
    deadline = time.time() + args.seconds

    def save(data, why):
        os.makedirs(os.path.join(root, "Fuzz/crashes"), exist_ok=True)
        path = os.path.join(root, "Fuzz/crashes", f"live-{int(time.time() * 1000)}-{len(failures)}.bin")
        with open(path, "wb") as f:
            f.write(data)
        failures.append(f"{why} (input saved: {path})")

    def worker(n):
        rng = random.Random(args.seed * 1000 + n)
        while time.time() < deadline and not failures:
            data = mutate(rng, seeds)
            play(sock, data, rng)
            with lock:
                played[0] += 1
            if server.poll() is not None:
                save(data, f"the server exited with {server.returncode} after this input")

    if args.replay:
        data = open(args.replay, "rb").read()
        play(sock, data, random.Random(0))
        ok = server.poll() is None
        print(f"fuzz-live: replayed {args.replay}: server {'alive' if ok else 'DIED'}")
    else:
        threads = [threading.Thread(target=worker, args=(n,), daemon=True) for n in range(args.workers)]
        for t in threads:
            t.start()
        checks = 0
        while time.time() < deadline and not failures:
            time.sleep(min(5, max(0.1, deadline - time.time())))
            if server.poll() is not None:
                break
            t0 = time.time()
            r = nbdsh(f"h.connect_uri('{canary_uri}'); p = {pattern}\n"
                      "for o in range(0, 8 << 20, 1 << 20):\n"
                      "    assert h.pread(1 << 20, o) == p, o")
            checks += 1
            if r.returncode != 0:
                failures.append(f"the canary volume check failed: {r.stderr.strip()[-400:]}")
            elif time.time() - t0 > 10:
                failures.append(f"the canary check took {time.time() - t0:.1f} s: other clients noticed")
        for t in threads:
            t.join(10)
        print(f"fuzz-live: {played[0]} mutated conversations in {args.seconds:.0f} s from {args.workers} workers, "
              f"{checks} canary checks, seed {args.seed}")

    if server.poll() is None:
        time.sleep(3)  # connections left half-open by the last inputs time out or close
        fds1, rss1 = fd_count(server.pid), rss_kib(server.pid)
        print(f"fuzz-live: server descriptors {fds0} -> {fds1}, RssAnon {rss0} -> {rss1} KiB")
        if fds1 > fds0 + 8:
            failures.append(f"descriptors grew from {fds0} to {fds1}")
        if rss1 > rss0 + 256 * 1024:
            failures.append(f"anonymous memory grew from {rss0} to {rss1} KiB")
        server.terminate()
        try:
            code = server.wait(60)
        except subprocess.TimeoutExpired:
            server.kill()
            code = "hung on SIGTERM"
        if code != 0:
            failures.append(f"the server's exit status on SIGTERM was {code}")
    elif not failures:
        failures.append(f"the server exited with {server.returncode}")
    log.seek(0)
    text = log.read()
    if "Sanitizer" in text or "Fatal error" in text:
        failures.append("the server's log has a sanitizer report or a fatal error:\n" + text[-3000:])
    if failures:
        print("fuzz-live: FAILED\n  " + "\n  ".join(failures) + f"\n  work directory kept: {work}")
        sys.exit(1)
    subprocess.run(["rm", "-rf", work])
    print("fuzz-live: passed")


if __name__ == "__main__":
    main()
