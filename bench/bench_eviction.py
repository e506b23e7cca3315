"""Eviction acceptance benchmark (issue 17): byte miss ratio per policy on the recorded workloads.

    python bench/bench_eviction.py [--traces bench/traces] [--only vision,chat] [--fractions 0.25,0.5]
                                   [--seeds 0,1,2] [--json out.json]
    python bench/bench_eviction.py --cost      # each policy's cost per reference on the loop

For each recorded trace (``bench/record_workloads.py``; committed under ``bench/traces/``) and each
capacity (a fraction of the trace's footprint: the bytes of the distinct keys it reads or puts),
every policy is replayed offline (:mod:`tierd.policy.simulate`): a demand cache of that many bytes
fed the trace's puts and gets in order, no prefetching. Every policy is fed the whole trace from its
start, as a daemon's policy is fed everything from start-up (auto's shadow caches and live orders
too). The first half of the references warms the caches and is all the learned model is trained on;
the model is installed at the split (in learned and in auto's learned candidate, whose shadow score
restarts then); the byte miss ratio is measured on the second half only. lru and s3fifo are
deterministic; learned and auto depend on the seed (the model's and the candidate sample's), so they
run once per seed and the table shows the median and the range.

``--cost`` measures instead what each policy costs the daemon's loop per reference: ``on_hit`` of
2000 entries in turn, 50 rounds, 3 runs (the range); auto's shadows run on their own thread, so
its figure is wall time including the share of the GIL that thread takes.

Acceptance (issue 17): learned or auto at least 10% lower than the best of lru and s3fifo on two
workloads, and auto never more than 2% worse than that best on any.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def footprint(trace) -> int:
    sizes: dict[str, int] = {}
    for a in trace:
        if a.op in ("get", "put") and a.nbytes:
            sizes[a.key] = a.nbytes
    return sum(sizes.values())


def cost(runs: int = 3, n: int = 2000, rounds: int = 50) -> None:
    """Microseconds per ``on_hit`` for each policy (the range over ``runs``)."""
    from tierd.policy import make_policy
    from tierd.policy.shadow import SimItem

    for name in ("lru", "s3fifo", "learned", "auto"):
        us = []
        for _ in range(runs):
            p = make_policy(name, capacity=n * 1024)
            for v in range(n):
                p.on_put(v, SimItem(f"ns/{v}", 1024, [], 1, v), new=True)
            t0 = time.perf_counter()
            for _ in range(rounds):
                for v in range(n):
                    p.on_hit(v)
            us.append((time.perf_counter() - t0) / (n * rounds) * 1e6)
            p.close()
        load = os.getloadavg()[0]
        print(f"{name}: {min(us):.2f}-{max(us):.2f} us per reference ({runs} runs, load {load:.1f})")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--traces", default=str(Path(__file__).resolve().parent / "traces"), help="folder of traces"
    )
    ap.add_argument("--only", default="", help="workloads (trace names) to run [all found]")
    ap.add_argument("--fractions", default="0.25,0.5", help="capacities, as fractions of the footprint")
    ap.add_argument("--seeds", default="0,1,2", help="seeds for learned and auto")
    ap.add_argument("--json", help="write the results here too")
    ap.add_argument("--cost", action="store_true", help="measure each policy's cost per reference instead")
    a = ap.parse_args()
    if a.cost:
        cost()
        return 0

    from record_workloads import load

    from tierd.policy.simulate import replay

    try:
        fractions = [float(x) for x in a.fractions.split(",")]
        seeds = [int(x) for x in a.seeds.split(",")]
    except ValueError as e:
        print(f"bench_eviction: --fractions and --seeds are comma-separated numbers: {e}", file=sys.stderr)
        return 2
    files = sorted(Path(a.traces).glob("*.jsonl.zst"))
    only = {x for x in a.only.split(",") if x}
    files = [f for f in files if not only or f.name.split(".")[0] in only]
    if not files:
        print(
            f"bench_eviction: no traces in {a.traces} (bench/record_workloads.py records them)",
            file=sys.stderr,
        )
        return 2
    load1 = os.getloadavg()[0]
    rows: list[dict[str, Any]] = []
    for f in files:
        name = f.name.split(".")[0]
        trace = load(f)
        fp = footprint(trace)
        refs = [x for x in trace if x.op in ("get", "put")]
        first = sum(x.op == "get" for x in refs[: len(refs) // 2])
        gets = sum(x.op == "get" for x in refs)
        print(f"{name}: {len(trace)} accesses, {gets} gets ({first} in the first half, {gets - first} in the "
              f"second), footprint {fp / 2**20:.1f} MiB", file=sys.stderr)  # fmt: skip
        for frac in fractions:
            cap = int(fp * frac)
            t0 = time.perf_counter()
            runs: dict[str, list[float]] = {}
            using: list[str] = []
            for seed in seeds:
                pols = ("lru", "s3fifo", "learned", "auto") if seed == seeds[0] else ("learned", "auto")
                for res in replay(trace, cap, pols, seed=seed):
                    runs.setdefault(res.policy, []).append(res.byte_miss_ratio)
                    if res.policy == "auto":
                        using.append(res.detail["using"])
            best = min(runs["lru"][0], runs["s3fifo"][0])
            row: dict[str, Any] = {
                "workload": name, "fraction": frac, "capacity_bytes": cap,
                **{p: runs[p] for p in ("lru", "s3fifo", "learned", "auto")},
                "auto_using": using, "best_heuristic": best,
                "learned_vs_best": statistics.median(runs["learned"]) / best if best else None,
                "auto_vs_best": statistics.median(runs["auto"]) / best if best else None,
                "seconds": round(time.perf_counter() - t0, 1),
            }  # fmt: skip
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    print(f"\nload average at start {load1:.2f}, at end {os.getloadavg()[0]:.2f}; "
          f"seeds {seeds}; train on the first half of each trace, measure on the second\n")  # fmt: skip
    print("| workload | capacity | lru | s3fifo | learned (median, range) | auto (median, range; follows) "
          "| learned / best | auto / best |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")

    def rng(xs: list[float]) -> str:
        return f"{statistics.median(xs):.3f} ({min(xs):.3f}-{max(xs):.3f})"

    for r in rows:
        follows = "/".join(sorted(set(r["auto_using"])))
        lv = "-" if r["learned_vs_best"] is None else f"{r['learned_vs_best']:.2f}x"
        av = "-" if r["auto_vs_best"] is None else f"{r['auto_vs_best']:.2f}x"
        size = f"{r['fraction']:.0%} ({r['capacity_bytes'] / 2**20:.1f} MiB)"
        print(f"| {r['workload']} | {size} | {r['lru'][0]:.3f} | {r['s3fifo'][0]:.3f} | {rng(r['learned'])} "
              f"| {rng(r['auto'])}; {follows} | {lv} | {av} |")  # fmt: skip
    if a.json:
        Path(a.json).write_text(json.dumps({"rows": rows, "load_start": load1, "seeds": seeds}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
