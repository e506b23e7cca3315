#!/usr/bin/env python3
"""What watching the daemon costs it: the latency histogram per request, a scrape per scrape.

    python bench/bench_metrics.py [--reps 5] [--iters 2000] [--json OUT]

Starts its own tierd (temporary socket and state, RAM 64 MiB, LMDB 64 MiB, metrics on a free
loopback port), puts 200 small entries, connects 50 clients and has each make a few requests (so
status has a realistic client list and latency for several verbs), then, for ``--reps`` rounds
interleaved:

- ``get+release``: the round trip of a get of a small entry and its release (p50, microseconds):
  the baseline a per-request cost is a share of;
- ``observe``: one ``Latency.observe`` plus the two ``time.perf_counter`` reads the connection adds
  to every request (ns, in this process: the same code the daemon runs);
- ``status``: a status request's round trip (p50, ms), and ``scrape``: a GET /metrics round trip
  (p50, ms), which renders the same status into the exposition text on the daemon's loop;
- ``render``: ``tierd.exposition.render`` of that status here (p50, ms): how long a scrape holds
  the loop beyond the status itself.

Prints the medians over rounds with their spread (min-max) and the ratios observe / get+release and
scrape / status.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import sys
import tempfile
import time
import timeit
from pathlib import Path

import numpy as np

from tierd import launch
from tierd.exposition import render
from tierd.metrics import Latency
from tierd_client import Client


def http_get(address: str) -> bytes:
    host, _, port = address.rpartition(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def p50(fn, n: int) -> float:
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def observe_ns(n: int) -> float:
    lat = Latency()

    def one() -> None:
        t0 = time.perf_counter()
        lat.observe("get", time.perf_counter() - t0)

    return timeit.timeit(one, number=n) / n * 1e9


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=5, help="interleaved rounds [5]")
    p.add_argument("--iters", type=int, default=2000, help="get+release round trips per round [2000]")
    p.add_argument("--json", metavar="OUT", help="also write the numbers to OUT")
    args = p.parse_args(argv)
    rows: dict[str, list[float]] = {
        k: [] for k in ("get_us", "observe_ns", "status_ms", "scrape_ms", "render_ms")
    }
    with tempfile.TemporaryDirectory(prefix="tierd-bm-", dir="/tmp") as tmp:
        t = Path(tmp)
        flags = ("--state-dir", str(t / "state"), "--disk-bytes", "64MiB", "--metrics-listen", "127.0.0.1:0")
        d = launch.start(t / "s.sock", *flags, ram_bytes="64MiB", log_path=t / "log")
        try:
            clients = [Client(d.socket) for _ in range(50)]
            c = clients[0]
            for i in range(200):
                c.put(f"bm/{i}", np.ones(1000, dtype=np.float32))
            for k in clients:
                k.release(k.get("bm/1"))
                k.ls("bm/")
                k.stat("bm/2")
            address = c.stats()["daemon"]["metrics_listen"]
            for _ in range(args.reps):
                rows["get_us"].append(p50(lambda: c.release(c.get("bm/3")), args.iters) * 1e6)
                rows["observe_ns"].append(observe_ns(200_000))
                rows["status_ms"].append(p50(c.stats, 50) * 1e3)
                rows["scrape_ms"].append(p50(lambda: http_get(address), 50) * 1e3)
                st = c.stats()
                rows["render_ms"].append(p50(lambda st=st: render(st), 50) * 1e3)
            lines = render(c.stats()).count(b"\n")
            for k in clients:
                k.close()
        finally:
            d.stop()
    med = {k: statistics.median(v) for k, v in rows.items()}
    print(f"tierd metrics cost, {args.reps} rounds (median, min-max); exposition {lines} lines")
    for k, v in rows.items():
        print(f"  {k:11s} {med[k]:9.2f}   ({min(v):.2f}-{max(v):.2f})")
    ratio_req = med["observe_ns"] / 1e3 / med["get_us"]
    ratio_scrape = med["scrape_ms"] / med["status_ms"]
    print(f"  observe / get+release = {ratio_req:.4f}   scrape / status = {ratio_scrape:.1f}x")
    if args.json:
        out = {"rows": rows, "median": med, "lines": lines, "observe_per_get": ratio_req,
               "scrape_per_status": ratio_scrape}  # fmt: skip
        Path(args.json).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
