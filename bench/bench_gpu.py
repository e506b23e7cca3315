#!/usr/bin/env python3
"""Promotion RAM -> GPU tier throughput against memcpy of the same bytes, in the same run.

    python bench/bench_gpu.py                       # the simulated device (no GPU needed)
    python bench/bench_gpu.py --backend cuda        # a real GPU (scripts/gpu-check.sh runs it)
    python bench/bench_gpu.py --quick --json out.json

The script starts its own tierd (``--gpu-backend BACKEND``, socket and state in a temporary
directory) and stops it at the end. Each repetition puts new versions of N entries (not timed),
then times ``get_many(keys, tier="gpu")``: one request that promotes every entry and waits for its
copy's event. Interleaved with it, in the same process:

- ``memcpy_warm``: numpy.copyto of the same bytes into a destination whose pages exist (the
  machine's memcpy bound);
- ``memcpy_cold``: the same into a fresh memfd (first touch: what writing a new slab costs, since
  the simulated device's slabs are sparse memfds, made as the tier grows and freed when empty).

On the simulated device a copy is started at least ``--delay-ms`` after it was queued (0 here by
default: this measures the copy path, not the deliberate delay; pass 20 to see the tier's default).
On CUDA the bound that matters is the pinned H2D copy (scripts/gpu-check.sh measures it).
Reported: GB/s medians and the promotion / memcpy ratios with their min and max over repetitions.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tierd import launch
from tierd_client import Client


def memcpy_warm(dst: np.ndarray, src: np.ndarray) -> float:
    t0 = time.perf_counter()
    np.copyto(dst, src)
    return time.perf_counter() - t0


def memcpy_cold(src: np.ndarray) -> float:
    """Into a fresh memfd of the same size: what a copy into a new simulated slab meets."""
    fd = os.memfd_create("bench-gpu-cold", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, src.nbytes)
        m = mmap.mmap(fd, src.nbytes)
        dst = np.frombuffer(m, np.uint8)
        t0 = time.perf_counter()
        np.copyto(dst, src)
        took = time.perf_counter() - t0
        del dst
        m.close()
    finally:
        os.close(fd)
    return took


def run(args: argparse.Namespace) -> dict[str, Any]:
    entry = args.entry_mib << 20
    total = entry * args.entries
    gpu_bytes = f"{max(64, 2 * total >> 20)}MiB"
    ram = f"{max(256, 3 * total >> 20)}MiB"
    srcs = [torch.randn(entry // 4) for _ in range(args.entries)]
    flat = np.concatenate([s.numpy().view(np.uint8) for s in srcs])
    warm = np.empty_like(flat)
    warm.fill(1)
    rows: dict[str, list[float]] = {"memcpy_warm": [], "memcpy_cold": [], "promote": []}
    with tempfile.TemporaryDirectory(prefix="tierd-bench-gpu-") as tmp:
        flags = ["--state-dir", f"{tmp}/state", "--disk-bytes", "0", "--gpu-backend", args.backend,
                 "--gpu-bytes", gpu_bytes]  # fmt: skip
        if args.backend == "simulated":
            flags += ["--gpu-sim-delay-ms", str(args.delay_ms)]
        d = launch.start(Path(tmp) / "tierd.sock", *flags, ram_bytes=ram, log_path=Path(tmp) / "tierd.log")
        try:
            with Client(d.socket) as c:
                keys = [f"bench-gpu/{i}" for i in range(args.entries)]
                for rep in range(args.reps + 1):  # the first is a warm-up, not reported
                    for k, s in zip(keys, srcs, strict=True):
                        c.put(k, s)
                    w = memcpy_warm(warm, flat)
                    cold = memcpy_cold(flat)
                    t0 = time.perf_counter()
                    got = c.get_many(keys, tier="gpu")
                    if args.backend == "cuda":
                        torch.cuda.synchronize()
                    took = time.perf_counter() - t0
                    if rep == 0:
                        ok = all(torch.equal(g.cpu(), s) for g, s in zip(got, srcs, strict=True))
                        if not ok:
                            raise SystemExit("bench_gpu: promoted bytes differ from what was put")
                    else:
                        rows["memcpy_warm"].append(w)
                        rows["memcpy_cold"].append(cold)
                        rows["promote"].append(took)
                    c.release(got)
                    del got
                counters = c.stats()["counters"]
        finally:
            d.stop()
    gbps = {k: total / statistics.median(v) / 1e9 for k, v in rows.items()}
    out: dict[str, Any] = {
        "backend": args.backend,
        "delay_ms": args.delay_ms if args.backend == "simulated" else None,
        "entries": args.entries,
        "entry_mib": args.entry_mib,
        "reps": args.reps,
        "gbps_median": {k: round(v, 2) for k, v in gbps.items()},
        "gpu_promotions": counters["gpu_promotions"],
        "load_avg": os.getloadavg(),
    }
    for base in ("memcpy_warm", "memcpy_cold"):
        ratios = sorted(b / p for b, p in zip(rows[base], rows["promote"], strict=True))
        out[f"promote_over_{base}"] = {
            "median": round(statistics.median(ratios), 3),
            "min": round(ratios[0], 3),
            "max": round(ratios[-1], 3),
        }
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backend", default="simulated", choices=["simulated", "cuda"])
    p.add_argument("--entries", type=int, default=16, help="entries promoted per request (16)")
    p.add_argument("--entry-mib", type=int, default=16, help="MiB per entry (16)")
    p.add_argument("--reps", type=int, default=7, help="timed repetitions (7)")
    p.add_argument("--delay-ms", type=float, default=0.0, help="simulated device's copy delay (0)")
    p.add_argument("--quick", action="store_true", help="4 entries of 8 MiB, 3 repetitions")
    p.add_argument("--json", metavar="OUT", help="also write the numbers to OUT")
    args = p.parse_args()
    if args.quick:
        args.entries, args.entry_mib, args.reps = 4, 8, 3
    print(f"bench_gpu: {args.entries} x {args.entry_mib} MiB per request, {args.reps} reps, "
          f"backend {args.backend}", file=sys.stderr)  # fmt: skip
    out = run(args)
    print(json.dumps(out, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
