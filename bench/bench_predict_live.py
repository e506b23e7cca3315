#!/usr/bin/env python3
"""Predictors on live streaming models (issue 17's acceptance 1 and 2), in one run, interleaved:

    python bench/bench_predict_live.py --case single [--size-mb 400] [--tokens 16] [--rounds 3]
    python bench/bench_predict_live.py --case pair [--size-mb 300,500] [--tokens 16] [--rounds 3]

single: one random bf16 Qwen3-VL-shaped model (bench_qwen3vl's shape) streamed through a daemon whose
  RAM tier holds 50% of its weights (weights ingested durable once; each run restarts the daemon on
  the same state dir, so everything starts on disk). The model hints its next block itself
  (prefetch_depth 1). The same daemon flags but ``--predictor``; per run: generate time of the timed
  tokens, the daemon's demand disk reads (``reads_disk``), the bytes it read from the block device
  (``/proc/PID/io``), prefetches issued / covered / dropped / used. Goal: auto <= 1.03x none's
  time and no more disk reads.
pair: two models of different sizes (different token rates) in two processes on one daemon whose RAM
  tier holds 50% of their combined weights, generating at the same time; aggregate tokens/s =
  tokens of both / time from the common start to the last one's end. Goal: auto >= 1.15x none.
  Also reported: the I/O bound (what a perfect prefetcher could save), from the stall the daemon
  counted (``stall_us``: time gets waited for promotions) against the run's time.

The daemon runs in a cgroup-v1 memory group limited to its RAM tier + its own overhead + a margin,
so the page cache cannot hold the weights and a disk read is a disk read (root only; otherwise it
runs without, and says so). The page cache is dropped before each run. Rounds interleave the
predictors; ratios are taken within a round, and
the spread over rounds is printed. The order rotates from round to round (none first, then auto
first, ...), so that no predictor always runs first or after the same one.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_qwen3vl import drop_caches, inputs_for, io_read_bytes, make_checkpoint, timed_generate
from memcg import CG_ROOT, Cgroup

PREDICTORS = ("none", "auto", "sequence", "learned")
COUNTERS = ("reads_disk", "prefetch_issued", "prefetch_hinted", "prefetch_covered", "prefetch_dropped",
            "prefetch_used", "prefetch_wasted_bytes", "promoted_bytes", "stall_us", "gets")  # fmt: skip


def worker(a: argparse.Namespace) -> None:
    """One model process: load streaming, one warm-up token, wait for the go file, timed generate."""
    import torch
    from transformers import AutoConfig

    import tierd_integration as ti
    from tierd_client import Client

    torch.manual_seed(0)
    cfg = AutoConfig.from_pretrained(a.ckpt)
    inputs = inputs_for(cfg)
    client = Client(a.socket)
    budget = a.ram_budget or None  # two models on one tier: each streams within its share
    model = ti.from_pretrained(a.ckpt, client, namespace=a.ns, mode="streaming", prefetch_depth=1,
                               ram_budget=budget)  # fmt: skip
    timed_generate(model, inputs, 1)  # warm-up, not timed
    Path(a.out + ".ready").write_text("1")
    while not Path(a.go).exists():
        time.sleep(0.005)
    t0 = time.time()
    res = timed_generate(model, inputs, a.tokens)
    res["start_wall"], res["end_wall"] = t0, time.time()
    Path(a.out).write_text(json.dumps(res))
    client.close()


def run_once(tmp: Path, models: list[tuple[str, Path]], predictor: str, a: argparse.Namespace,
             ram: int, limit: int | None, budgets: dict[str, int]) -> dict:  # fmt: skip
    from tierd import launch
    from tierd_client import Client

    sock = str(tmp / "d.sock")
    cg = Cgroup(f"bench-plive-{os.getpid()}") if limit else None
    try:
        if cg:
            cg.set("memory.limit_in_bytes", limit)
        drop_caches()
        d = launch.start(sock, "--state-dir", str(tmp / "state"), "--disk-bytes", str(a.disk_bytes),
                         "--predictor", predictor, ram_bytes=str(ram), log_path=tmp / f"{predictor}.log",
                         prefix=cg.prefix() if cg else ())  # fmt: skip
        try:
            go = tmp / "go"
            go.unlink(missing_ok=True)
            procs, outs = [], []
            for ns, ckpt in models:
                out = tmp / f"out-{ns}.json"
                out.unlink(missing_ok=True)
                outs.append(out)
                cmd = [sys.executable, __file__, "--role", "worker", "--ckpt", str(ckpt), "--ns", ns,
                       "--socket", sock, "--out", str(out), "--go", str(go),
                       "--tokens", str(a.tokens), "--ram-budget", str(budgets.get(ns, 0))]  # fmt: skip
                procs.append(subprocess.Popen(cmd))
            t_wait = time.time()
            while not all(Path(str(o) + ".ready").exists() for o in outs):
                if any(p.poll() is not None for p in procs) or time.time() - t_wait > 600:
                    raise RuntimeError("a model process died or hung before its warm-up ended")
                time.sleep(0.01)
            with Client(sock) as c:
                c0 = c.stats()["counters"]
            io0 = io_read_bytes(d.pid)
            go.write_text("1")
            for p in procs:
                p.wait(600)
            io1 = io_read_bytes(d.pid)
            with Client(sock) as c:
                st = c.stats()
            c1 = st["counters"]
            ps = st["prefetch"]["predictor_stats"]
            pf = {k: st["prefetch"].get(k) for k in ("trainings", "train_cpu_s", "work_us_mean")}
        finally:
            d.stop()
        rs = [json.loads(o.read_text()) for o in outs]
        for o in outs:
            Path(str(o) + ".ready").unlink(missing_ok=True)
        start = min(r["start_wall"] for r in rs)
        end = max(r["end_wall"] for r in rs)
        return {
            "predictor": predictor,
            "wall_s": end - start,
            "total_s": [r["total_s"] for r in rs],
            "tokens": [r["n"] for r in rs],
            "token_ids": [r["tokens"] for r in rs],
            "agg_tok_s": sum(r["n"] for r in rs) / (end - start),
            "disk_read_bytes": io1 - io0,
            "counters": {k: c1.get(k, 0) - c0.get(k, 0) for k in COUNTERS},
            "auto_using": ps.get("using"),
            "auto_scores": ps.get("scores"),
            "oom_kills": cg.oom_kills() if cg else 0,
            "prefetcher": pf,
        }
    finally:
        if cg:
            cg.remove()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--case", choices=["single", "pair"], default="single")
    ap.add_argument("--size-mb", default="", help="bf16 weights per model [single: 400; pair: 300,500]")
    ap.add_argument("--tokens", type=int, default=16, help="timed tokens per model [16]")
    ap.add_argument("--rounds", type=int, default=3, help="rounds, each running every predictor [3]")
    ap.add_argument("--predictors", default=",".join(PREDICTORS), help="[none,auto,sequence,learned]")
    ap.add_argument("--ram-share", type=float, default=0.5, help="RAM tier / weights [0.5]")
    ap.add_argument("--margin-mb", type=int, default=192, help="cgroup limit beside the tier [192]")
    ap.add_argument("--json", help="write every number here")
    ap.add_argument("--role", help=argparse.SUPPRESS)
    ap.add_argument("--ckpt", help=argparse.SUPPRESS)
    ap.add_argument("--ns", help=argparse.SUPPRESS)
    ap.add_argument("--socket", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--go", help=argparse.SUPPRESS)
    ap.add_argument("--ram-budget", type=int, default=0, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.role == "worker":
        worker(a)
        return 0

    import tierd_integration as ti
    from tierd import launch
    from tierd_client import Client

    sizes = [int(x) for x in (a.size_mb or ("400" if a.case == "single" else "300,500")).split(",")]
    if (a.case == "single") != (len(sizes) == 1):
        ap.error("--case single takes one size, pair two")
    preds = [p for p in a.predictors.split(",") if p]
    T0 = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - T0:6.1f}s] {msg}", flush=True)

    tmp = Path(tempfile.mkdtemp(prefix="bench-plive-"))
    R: dict = {"case": a.case, "load_start": os.getloadavg(), "runs": []}
    models: list[tuple[str, Path]] = []
    W = 0
    own: dict[str, int] = {}
    for i, mb in enumerate(sizes):
        ckpt = tmp / f"ckpt{i}"
        w, _ = make_checkpoint(ckpt, mb)
        models.append((f"m{i}", ckpt))
        own[f"m{i}"] = w
        W += w
        log(f"model m{i}: {w / 2**20:.0f} MiB of bf16 weights")
    ram = int(a.ram_share * W)
    # with two models each streams within its share of the tier (less a little for the other's
    # window rounding); one model has the tier to itself
    budgets = {ns: int(0.95 * a.ram_share * w) for ns, w in own.items()} if len(own) > 1 else {}
    a.disk_bytes = 3 * W + (512 << 20)
    sock = str(tmp / "d.sock")
    d = launch.start(sock, "--state-dir", str(tmp / "state"), "--disk-bytes", str(a.disk_bytes),
                     ram_bytes=str(ram), log_path=tmp / "ingest.log")  # fmt: skip
    try:
        with Client(sock) as c:
            for ns, ckpt in models:
                ti.ingest(c, ckpt, ns, progress=False, durable=True)
        import psutil

        overhead = max(psutil.Process(d.pid).memory_info().rss - ram, 64 << 20)
    finally:
        d.stop()
    use_cg = os.geteuid() == 0 and CG_ROOT.is_dir()
    limit = ram + overhead + (a.margin_mb << 20) if use_cg else None
    R.update(weight_bytes=W, ram_bytes=ram, cg_limit=limit, sizes_mb=sizes, tokens=a.tokens)
    log(f"RAM tier {ram / 2**20:.0f} MiB ({a.ram_share:.0%} of {W / 2**20:.0f} MiB); daemon cgroup limit "
        + (f"{limit / 2**20:.0f} MiB" if limit else "none (not root)"))  # fmt: skip
    try:
        for rnd in range(a.rounds):
            for p in preds[rnd % len(preds) :] + preds[: rnd % len(preds)]:  # each goes first once
                r = run_once(tmp, models, p, a, ram, limit, budgets)
                r["round"] = rnd
                R["runs"].append(r)
                c = r["counters"]
                log(f"round {rnd} {p:<9} wall {r['wall_s']:6.2f}s  agg {r['agg_tok_s']:5.2f} tok/s  "
                    f"reads_disk {c['reads_disk']:4d}  disk {r['disk_read_bytes'] / 2**20:6.0f} MiB  "
                    f"issued {c['prefetch_issued']} covered {c['prefetch_covered']} "
                    f"dropped {c['prefetch_dropped']} "
                    f"used {c['prefetch_used']}  stall {c['stall_us'] / 1e6:.2f}s"
                    + f"  trainings {r['prefetcher']['trainings']} ({r['prefetcher']['train_cpu_s']} s CPU), "
                    f"predictor thread {r['prefetcher']['work_us_mean']} us/access"
                    + (f"  auto follows {r['auto_using']}" if r["auto_using"] else ""))  # fmt: skip
    finally:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    R["load_end"] = os.getloadavg()
    report(R, preds)
    if a.json:
        Path(a.json).write_text(json.dumps(R, indent=1))
    return 0


def report(R: dict, preds: list[str]) -> None:
    runs = R["runs"]
    by = {p: [r for r in runs if r["predictor"] == p] for p in preds}
    same = len({json.dumps(r["token_ids"]) for r in runs}) == 1
    print(f"\n== {R['case']}: {R['sizes_mb']} MB model(s), RAM tier {R['ram_bytes'] / 2**20:.0f} MiB "
          f"(of {R['weight_bytes'] / 2**20:.0f} MiB weights), {R['tokens']} tokens each; load "
          f"{R['load_start'][0]:.2f} -> {R['load_end'][0]:.2f}; "
          f"tokens identical in every run: {same}")  # fmt: skip
    print(f"   {'predictor':<10}{'wall s (median, min-max)':>28}{'agg tok/s':>11}{'reads_disk':>12}"
          f"{'disk MiB':>10}{'issued':>8}{'covered':>8}{'stall s':>8}"
          f"{'vs none (per round)':>24}")  # fmt: skip
    base = {r["round"]: r for r in by.get("none", [])}
    for p in preds:
        rs = by[p]
        walls = [r["wall_s"] for r in rs]
        ratios = [r["wall_s"] / base[r["round"]]["wall_s"] for r in rs if r["round"] in base]
        tps = [r["agg_tok_s"] / base[r["round"]]["agg_tok_s"] for r in rs if r["round"] in base]
        med = statistics.median
        ratio = f"{med(ratios):.3f}x ({min(ratios):.2f}-{max(ratios):.2f})" if ratios else "-"
        print(f"   {p:<10}{med(walls):>10.2f} ({min(walls):.2f}-{max(walls):.2f}){'':>6}"
              f"{med(r['agg_tok_s'] for r in rs):>11.2f}"
              f"{'/'.join(str(r['counters']['reads_disk']) for r in rs):>12}"
              f"{med(r['disk_read_bytes'] for r in rs) / 2**20:>10.0f}"
              f"{med(r['counters']['prefetch_issued'] for r in rs):>8.0f}"
              f"{med(r['counters']['prefetch_covered'] for r in rs):>8.0f}"
              f"{med(r['counters']['stall_us'] for r in rs) / 1e6:>8.2f}{ratio:>24}")  # fmt: skip
        R.setdefault("summary", {})[p] = {"wall_ratio_vs_none": ratios, "tok_s_ratio_vs_none": tps}
    if "none" in by:
        nr = by["none"]
        stall = statistics.median(r["counters"]["stall_us"] / 1e6 for r in nr)
        wall = statistics.median(r["wall_s"] for r in nr)
        n_proc = len(nr[0]["tokens"])
        # the most a perfect prefetcher could save: every get's wait for a promotion (summed over the
        # model processes, which wait in parallel, so divided by their number as a generous bound)
        bound = wall / max(wall - stall / n_proc, 1e-9)
        R["bound"] = {"none_stall_s": stall, "none_wall_s": wall, "max_speedup": bound}
        print(f"   bound: with none, gets waited {stall:.2f}s for promotions in a {wall:.2f}s run "
              f"({n_proc} process(es)): a perfect prefetcher could reach at most "
              f"{bound:.2f}x none")  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
