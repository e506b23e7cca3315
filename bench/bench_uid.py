#!/usr/bin/env python3
"""Put bandwidth per uid: a client of the daemon's own uid (its arena pre-faulted at start) and a
client of another uid (an arena of its own, made at its first connection), each against
numpy.copyto of the same bytes into a warm destination in the same process, interleaved.

    sudo python bench/bench_uid.py            # needs root: the second client runs as uid nobody
    sudo python bench/bench_uid.py --json out.json

The script starts its own tierd (as root, socket group ``nogroup`` so that uid nobody may connect) in
a temporary directory and stops it at the end. Each client's first put is reported apart: for the
other uid it is where that uid's pages are first allocated.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path
from typing import Any

from tierd import launch

NOBODY = 65534

CLIENT = textwrap.dedent(
    """
    import contextlib, json, os, statistics, sys, time
    import numpy as np, torch
    from tierd_client import Client, NotFound
    uid, sock, nbytes, reps = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    if uid != os.getuid():
        os.setgroups([]); os.setgid(uid); os.setuid(uid)
    src = torch.randn(nbytes // 4)
    src_u8 = src.numpy().view(np.uint8)
    dst = np.empty(nbytes, np.uint8); dst.fill(1); np.copyto(dst, src_u8)
    key = f"bench-uid/{uid}"
    with Client(sock) as c:
        t0 = time.perf_counter(); c.put(key, src); first = time.perf_counter() - t0
        copy, put = [], []
        for _ in range(reps):
            t0 = time.perf_counter(); np.copyto(dst, src_u8); copy.append(time.perf_counter() - t0)
            with contextlib.suppress(NotFound):
                c.delete(key)
            t0 = time.perf_counter(); c.put(key, src); put.append(time.perf_counter() - t0)
        got = c.get(key); ok = bool(torch.equal(got, src)); c.release(got)
        space = [s for s, a in c.arenas.items() if a is c.arena][0]
    print(json.dumps({"uid": uid, "arena": space, "first_put_s": first, "copyto_s": copy, "put_s": put,
                      "equal": ok}))
    """
)


def run_client(uid: int, sock: Path, nbytes: int, reps: int) -> dict[str, Any]:
    r = subprocess.run(
        [sys.executable, "-c", CLIENT, str(uid), str(sock), str(nbytes), str(reps)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    if r.returncode != 0:
        raise SystemExit(f"client as uid {uid} failed:\n{r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def summarize(row: dict[str, Any], nbytes: int) -> dict[str, Any]:
    import statistics

    ratios = sorted(c / p for c, p in zip(row["copyto_s"], row["put_s"], strict=True))
    return {
        "uid": row["uid"],
        "arena": row["arena"],
        "first_put_gbps": nbytes / row["first_put_s"] / 1e9,
        "put_gbps_median": nbytes / statistics.median(row["put_s"]) / 1e9,
        "copyto_gbps_median": nbytes / statistics.median(row["copyto_s"]) / 1e9,
        "put_over_copyto_median": statistics.median(ratios),
        "put_over_copyto_min_max": [ratios[0], ratios[-1]],
        "bytes_equal": row["equal"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mib", type=int, default=256, help="bytes per put, in MiB (default 256)")
    ap.add_argument("--reps", type=int, default=9, help="interleaved repetitions per client (default 9)")
    ap.add_argument("--rounds", type=int, default=2, help="alternating rounds of the two clients (default 2)")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("bench_uid.py needs root: its second client runs as uid nobody")
    nbytes = args.mib << 20
    with tempfile.TemporaryDirectory(prefix="tierd-bu-", dir="/tmp") as d:
        tmp = Path(d)
        tmp.chmod(0o755)
        ram = f"{3 * args.mib}MiB"
        print(f"bench_uid: tierd with a {ram} RAM tier; {args.mib} MiB puts, {args.reps} reps x "
              f"{args.rounds} rounds per client", flush=True)  # fmt: skip
        daemon = launch.start(
            tmp / "tierd.sock", "--state-dir", str(tmp / "state"), "--disk-bytes", "0",
            "--socket-group", "nogroup", ram_bytes=ram, log_path=tmp / "tierd.log",
        )  # fmt: skip
        rows: dict[str, list[dict[str, Any]]] = {"own uid (root)": [], "other uid (nobody)": []}
        try:
            for r in range(args.rounds):
                for name, uid in (("own uid (root)", 0), ("other uid (nobody)", NOBODY)):
                    s = summarize(run_client(uid, daemon.socket, nbytes, args.reps), nbytes)
                    rows[name].append(s)
                    lo, hi = s["put_over_copyto_min_max"]
                    print(f"  round {r + 1} {name:20s} put/copyto {s['put_over_copyto_median']:.3f} "
                          f"(min {lo:.3f}, max {hi:.3f}), "
                          f"first put {s['first_put_gbps']:.2f} GB/s, bytes equal: {s['bytes_equal']}",
                          flush=True)  # fmt: skip
        finally:
            daemon.stop()
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
