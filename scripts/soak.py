#!/usr/bin/env python3
"""Soak a running verdict server with mixed good and hostile traffic.

Python standard library only; loopback only; every loop is bounded by the
run time. Every 30 s it prints requests served, answers by class, p99 latency
of the good requests, the server's RSS and /health latency; at the end a
summary with the goals: no 5xx other than 503, RSS growth after warm-up (the
trend: median of the last third of the samples against the first third)
<= 10 %, /health always under 50 ms.

Environment:
  SOAK_SECONDS      run time (default 600)
  SOAK_URL          server (default http://127.0.0.1:8000); must be loopback
  SOAK_CONCURRENCY  client threads sending requests (default 16)
  SOAK_PID          server process id for RSS (default: the process listening on the port)
  SOAK_WARMUP       seconds before the RSS baseline is taken (default 60, at most a third of the run)
  SOAK_REPORT       seconds between reports (default 30)
Exit status 1 when a goal is missed.
"""

import http.client
import json
import multiprocessing
import os
import random
import socket
import statistics
import sys
import threading
import time
import urllib.parse
from collections import Counter

SECONDS = float(os.environ.get("SOAK_SECONDS", "600"))
URL = urllib.parse.urlparse(os.environ.get("SOAK_URL", "http://127.0.0.1:8000"))
HOST, PORT = URL.hostname or "127.0.0.1", URL.port or 80
CONCURRENCY = int(os.environ.get("SOAK_CONCURRENCY", "16"))
WARMUP = min(float(os.environ.get("SOAK_WARMUP", "60")), SECONDS / 3)
REPORT_EVERY = float(os.environ.get("SOAK_REPORT", "30"))
HEALTH_BUDGET_MS = 50.0
RSS_GROWTH_BUDGET = 0.10

if HOST not in ("127.0.0.1", "localhost", "::1"):
    sys.exit(f"soak: {HOST} is not loopback; this script only talks to a local server")

WORDS = (
    "the service was quick and friendly but the food arrived cold and the bill was wrong "
    "I loved every minute of it and would come back tomorrow with friends and family "
    "nothing worked as promised the update broke my settings and support never replied"
).split()


def sentence(rng, n):
    return " ".join(rng.choice(WORDS) for _ in range(n))


class Stats:
    """Counters shared by the threads; one lock, small critical sections."""

    def __init__(self):
        self.lock = threading.Lock()
        self.classes = Counter()  # whole run
        self.window = Counter()  # since the last report
        self.latencies = []  # good requests, this window (seconds)
        self.all_latencies = []
        self.health = []  # /health latencies this window (ms)
        self.all_health = []
        self.slowloris_close_s = []

    def record(self, cls, latency=None):
        with self.lock:
            self.classes[cls] += 1
            self.window[cls] += 1
            if latency is not None:
                self.latencies.append(latency)
                self.all_latencies.append(latency)

    def record_health(self, ms, ok):
        with self.lock:
            self.health.append(ms)
            self.all_health.append(ms)
            if not ok:
                self.classes["health-failed"] += 1
                self.window["health-failed"] += 1

    def take_window(self):
        with self.lock:
            window, self.window = self.window, Counter()
            latencies, self.latencies = self.latencies, []
            health, self.health = self.health, []
        return window, latencies, health


def p99(values):
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * 0.99))]


def status_class(status):
    if status < 300:
        return "2xx"
    if status in (400, 401, 404, 405, 408, 413, 415, 503):
        return str(status)
    return "5xx-other" if status >= 500 else f"{status}"


def rss_kib(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def listening_pid(port):
    """The process holding the listening socket on `port` (Linux /proc)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                next(f)
                for line in f:
                    parts = line.split()
                    local, state, inode = parts[1], parts[3], parts[9]
                    if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:
                        inodes.add(f"socket:[{inode}]")
        except OSError:
            pass
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                if os.readlink(f"/proc/{pid}/fd/{fd}") in inodes:
                    return int(pid)
        except OSError:
            continue
    return None


# ---- traffic -------------------------------------------------------------

GOOD = "good"
BAD = "bad"


def make_request(rng):
    """(kind, method, path, body bytes or None, headers); kind says whether it should succeed."""
    json_headers = {"Content-Type": "application/json"}
    r = rng.random()
    if r < 0.40:
        body = {"input": sentence(rng, rng.randint(5, 40))}
        return GOOD, "POST", "/classify", json.dumps(body).encode(), json_headers
    if r < 0.55:
        body = {"input": [sentence(rng, rng.randint(5, 60)) for _ in range(8)]}
        return GOOD, "POST", "/classify", json.dumps(body).encode(), json_headers
    if r < 0.62:
        body = {"input": sentence(rng, 20), "use_activation": False}
        return GOOD, "POST", "/pooling", json.dumps(body).encode(), json_headers
    if r < 0.66:
        body = {"prompt": sentence(rng, 30)}
        return GOOD, "POST", "/tokenize", json.dumps(body).encode(), json_headers
    if r < 0.70:
        # A huge prompt cut to its last tokens.
        body = {"input": sentence(rng, 40_000), "truncate_prompt_tokens": 64}
        return GOOD, "POST", "/classify", json.dumps(body).encode(), json_headers
    if r < 0.76:
        return BAD, "POST", "/classify", b'{"input": [1, 2', json_headers
    if r < 0.80:
        return BAD, "POST", "/classify", json.dumps({"input": sentence(rng, 2000)}).encode(), json_headers
    if r < 0.84:
        return BAD, "POST", "/classify", b"input=hello", {"Content-Type": "text/plain"}
    if r < 0.88:
        path = "/nowhere/" + "".join(rng.choice("abcdef0123456789") for _ in range(24))
        return BAD, "POST", path, b'{"input": "x"}', json_headers
    if r < 0.92:
        method = "X" + "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(rng.randint(3, 300)))
        return BAD, method, "/classify", None, {}
    if r < 0.95:
        return BAD, "POST", "/classify", json.dumps({"input": []}).encode(), json_headers
    if r < 0.97:
        return GOOD, "GET", "/metrics", None, {}
    return GOOD, "GET", "/v1/models", None, {}


def client_worker(stats, stop, seed):
    rng = random.Random(seed)
    conn = None
    while not stop.is_set():
        kind, method, path, body, headers = make_request(rng)
        if conn is None:
            conn = http.client.HTTPConnection(HOST, PORT, timeout=30)
        started = time.monotonic()
        try:
            conn.request(method, path, body=body, headers=headers)
            response = conn.getresponse()
            response.read()
            latency = time.monotonic() - started
            cls = status_class(response.status)
            stats.record(cls, latency if (kind == GOOD and cls == "2xx") else None)
            if kind == GOOD and cls not in ("2xx", "503"):
                stats.record(f"unexpected-{response.status}-{path.split('/')[1]}")
            if response.getheader("connection", "").lower() == "close":
                conn.close()
                conn = None
        except socket.timeout:
            stats.record("timeout")
            conn.close()
            conn = None
        except (OSError, http.client.HTTPException) as e:
            stats.record(f"conn-error-{type(e).__name__}")
            if conn is not None:
                conn.close()
            conn = None
    if conn is not None:
        conn.close()


def oversized_worker(stats, stop):
    """Declares a 1 GB body and sends none: must be refused (413) from the header."""
    while not stop.wait(0.5):
        try:
            with socket.create_connection((HOST, PORT), timeout=10) as s:
                s.sendall(
                    b"POST /classify HTTP/1.1\r\nHost: soak\r\nContent-Type: application/json\r\n"
                    b"Expect: 100-continue\r\nContent-Length: 1000000000\r\n\r\n"
                )
                head = s.recv(4096)
                status = int(head.split(b" ", 2)[1]) if head.startswith(b"HTTP/1.1 ") else 0
                stats.record(status_class(status) if status else "oversized-no-answer")
        except (OSError, ValueError, IndexError):
            stats.record("oversized-conn-error")


def slowloris_worker(stats, stop, sockets=20):
    """Keeps `sockets` connections trickling a header byte every second; counts how long the server keeps each."""
    open_socks = {}
    while not stop.is_set():
        while len(open_socks) < sockets:
            try:
                s = socket.create_connection((HOST, PORT), timeout=5)
                s.sendall(b"POST /classify HTTP/1.1\r\nHost: soak\r\nX-Slow: ")
                s.setblocking(False)
                open_socks[s] = time.monotonic()
            except OSError:
                stats.record("slowloris-connect-failed")
                break
        if stop.wait(1.0):
            break
        for s, opened in list(open_socks.items()):
            closed = False
            try:
                if s.recv(4096) == b"":
                    closed = True
            except BlockingIOError:
                try:
                    s.send(b"a")
                except OSError:
                    closed = True
            except OSError:
                closed = True
            if closed:
                with stats.lock:
                    stats.slowloris_close_s.append(time.monotonic() - opened)
                stats.record("slowloris-closed-by-server")
                s.close()
                del open_socks[s]
    for s in open_socks:
        s.close()


def connection_flood_worker(stats, stop, burst=300):
    """Every 20 s: opens `burst` half-open connections, holds them 3 s, closes them."""
    while not stop.wait(20):
        socks = []
        for _ in range(burst):
            try:
                s = socket.create_connection((HOST, PORT), timeout=2)
                s.sendall(b"GET /cla")
                socks.append(s)
            except OSError:
                stats.record("flood-connect-failed")
        stats.record("flood-burst")
        stop.wait(3)
        for s in socks:
            s.close()


def health_probe(conn, stop):
    """A fresh connection every 250 ms, like a load balancer's probe.

    Runs in its own process: in the client threads' process a probe would wait
    for the GIL, and that wait would be counted as the server's latency.
    """
    while not stop.wait(0.25):
        started = time.monotonic()
        ok = False
        try:
            http_conn = http.client.HTTPConnection(HOST, PORT, timeout=5)
            http_conn.request("GET", "/health")
            response = http_conn.getresponse()
            response.read()
            ok = response.status == 200
            http_conn.close()
        except (OSError, http.client.HTTPException):
            pass
        conn.send(((time.monotonic() - started) * 1000.0, ok))
    conn.close()


def health_worker(stats, stop):
    """Starts the probe process and records what it measures."""
    receiver, sender = multiprocessing.Pipe(duplex=False)
    probe_stop = multiprocessing.Event()
    probe = multiprocessing.Process(target=health_probe, args=(sender, probe_stop), daemon=True)
    probe.start()
    sender.close()
    while not stop.is_set():
        if receiver.poll(0.5):
            try:
                ms, ok = receiver.recv()
            except EOFError:
                break
            stats.record_health(ms, ok)
    probe_stop.set()
    probe.join(timeout=10)


# ---- main ------------------------------------------------------------------


def main():
    pid = int(os.environ["SOAK_PID"]) if os.environ.get("SOAK_PID") else listening_pid(PORT)
    print(
        f"soak: {SECONDS:.0f} s against {HOST}:{PORT} (server pid {pid}), "
        f"{CONCURRENCY} clients + slowloris, oversized bodies, connection floods, health probe",
        flush=True,
    )
    stats = Stats()
    stop = threading.Event()
    threads = [threading.Thread(target=client_worker, args=(stats, stop, i), daemon=True) for i in range(CONCURRENCY)]
    threads += [
        threading.Thread(target=oversized_worker, args=(stats, stop), daemon=True),
        threading.Thread(target=slowloris_worker, args=(stats, stop), daemon=True),
        threading.Thread(target=connection_flood_worker, args=(stats, stop), daemon=True),
        threading.Thread(target=health_worker, args=(stats, stop), daemon=True),
    ]
    for t in threads:
        t.start()
    started = time.monotonic()
    rss_samples = []  # (elapsed, KiB)
    baseline = None
    next_report = REPORT_EVERY
    while True:
        elapsed = time.monotonic() - started
        if elapsed >= SECONDS:
            break
        time.sleep(min(1.0, SECONDS - elapsed))
        elapsed = time.monotonic() - started
        if baseline is None and elapsed >= WARMUP and pid:
            baseline = rss_kib(pid)
        if elapsed >= next_report or elapsed >= SECONDS:
            next_report += REPORT_EVERY
            window, latencies, health = stats.take_window()
            rss = rss_kib(pid) if pid else None
            if rss is not None:
                rss_samples.append((elapsed, rss))
            served = window["2xx"]
            print(
                f"[{elapsed:6.0f}s] requests {sum(v for k, v in window.items() if not k.startswith(('slowloris', 'flood'))):6d} "
                f"served {served:6d}  p99 {p99(latencies) * 1000:7.1f} ms  "
                f"RSS {rss / 1024 if rss else float('nan'):7.1f} MiB  "
                f"/health p99 {p99(health):5.1f} ms max {max(health, default=float('nan')):5.1f} ms  "
                f"{dict(sorted(window.items()))}",
                flush=True,
            )
    stop.set()
    for t in threads:
        t.join(timeout=35)

    classes = stats.classes
    served = classes["2xx"]
    other_5xx = classes["5xx-other"]
    unexpected = {k: v for k, v in classes.items() if k.startswith(("unexpected", "timeout", "conn-error", "oversized-no"))}
    health_max = max(stats.all_health, default=float("nan"))
    health_p99 = p99(stats.all_health)
    after = [kib for t, kib in rss_samples if t >= WARMUP]
    # Growth is the trend: the median RSS of the last third of the samples against
    # the first third after warm-up. The working set rises and falls with the
    # requests in flight (the peak is printed too); a leak keeps rising.
    third = max(1, len(after) // 3)
    early = statistics.median(after[:third]) if after else None
    late = statistics.median(after[-third:]) if after else None
    growth = (late - early) / early if early else float("nan")
    peak = (max(after) - baseline) / baseline if baseline and after else float("nan")
    closes = sorted(stats.slowloris_close_s)
    print("\nsoak summary")
    print(f"  duration            {SECONDS:.0f} s, {CONCURRENCY} client threads")
    print(f"  requests served     {served} (2xx), {sum(classes.values())} outcomes in all")
    print(f"  answers by class    {dict(sorted(classes.items()))}")
    print(f"  p99 latency (good)  {p99(stats.all_latencies) * 1000:.1f} ms")
    if baseline:
        print(
            f"  RSS                 {baseline / 1024:.1f} MiB after {WARMUP:.0f} s warm-up, "
            f"max after {max(after) / 1024:.1f} MiB ({peak * 100:+.1f} %), last {after[-1] / 1024:.1f} MiB; "
            f"median of the first third {early / 1024:.1f} MiB, of the last third {late / 1024:.1f} MiB, "
            f"growth {growth * 100:+.1f} %"
        )
    print(f"  /health             {len(stats.all_health)} probes, p99 {health_p99:.1f} ms, max {health_max:.1f} ms, failed {classes['health-failed']}")
    if closes:
        print(f"  slowloris           {len(closes)} closed by the server, after {closes[0]:.1f}-{closes[-1]:.1f} s")
    goals = [
        ("no 5xx other than 503", other_5xx == 0),
        ("no timeouts, connection errors or unexpected answers to good requests", not unexpected),
        ("RSS growth after warm-up <= 10 %", not (growth > RSS_GROWTH_BUDGET)),
        ("/health always under 50 ms and 200", health_max < HEALTH_BUDGET_MS and classes["health-failed"] == 0),
    ]
    for name, ok in goals:
        print(f"  {'PASS' if ok else 'FAIL'}  {name}")
    if unexpected:
        print(f"  unexpected: {unexpected}")
    return 0 if all(ok for _, ok in goals) else 1


if __name__ == "__main__":
    sys.exit(main())
