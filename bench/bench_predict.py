#!/usr/bin/env python3
"""Prefetch predictors side by side: replays the four synthetic traces of tierd.predict.traces
through the offline simulator (LRU RAM cache of ~working set / 1.5, FIFO disk at 1.5 GB/s,
depth-2 prefetch within a speculative budget) with each predictor:

    python bench/bench_predict.py                  # the four traces and two variants, ~15 s
    python bench/bench_predict.py --quick          # smaller traces, ~5 s
    python bench/bench_predict.py --seed 3 --json out.json

The traces: cyclic, interleaved, vision, random (issue 4's (a)-(d)), and two variants that check
the result is not an artefact of them: interleaved-2clients (the two models in two clients, where
sequence is not weak) and vision-hashed (image features keyed by content hash, not by number).

Rows per trace: none (LRU only), sequence, learned, auto, and an ablation "learned/no-fit" (the
learned predictor's candidate tables with its fixed fallback ranking, never trained), which shows
how much of learned's result is the fitted model and how much its candidate features.

Everything but the timing columns and the auto row is deterministic for a seed (the replay is a
simulation: stall is simulated seconds, not measured). auto scores its candidates in bursts sized
from their measured CPU cost, as in the daemon, so which one it follows when can vary a little from
run to run. "us/get" is the measured wall time of observe() + predict() per get on this machine,
and "train s" the time spent in train() (in the daemon, a niced child process).

--per-access times each predictor's observe + predict per access on its own (mean, p99, the spread
of the rounds' means), the figure behind the daemon's bound of 5 us per access for auto.

The goal stated in issue 4: learned at least matches sequence on every trace and beats it on
"interleaved" and "vision"; auto uses the best. The verdict lines say, per trace, whether it did.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tierd.predict import make_predictor
from tierd.predict.learned import LearnedPredictor
from tierd.predict.simulate import DEFAULT_MIN_CONFIDENCE, ReplayResult, replay
from tierd.predict.traces import EXTRA_SCENARIOS, SCENARIO_NAMES, Scenario, make_scenario, recorded

MIB = 1 << 20
PREDICTORS = ("none", "sequence", "learned", "auto", "learned/no-fit")
QUICK = {
    "cyclic": {"layers": 12, "steps": 20},
    "interleaved": {"fast_layers": 8, "slow_layers": 12, "fast_steps": 40},
    "vision": {"images": 600, "requests": 1000},
    "random": {"keys": 200, "gets": 2000},
}
QUICK["interleaved-2clients"] = QUICK["interleaved"]
QUICK["vision-hashed"] = QUICK["vision"]
QUICK["cyclic-hinted"] = QUICK["cyclic"]
# what the issue asks of learned vs sequence per trace; the extra variants are there to check that
# the gains are not an artefact of the four (two clients: sequence is not weak; hashed keys)
WANT = {
    "cyclic": "matches", "interleaved": "beats", "vision": "beats", "random": "matches",
    "interleaved-2clients": "matches", "vision-hashed": "beats", "cyclic-hinted": "matches",
}  # fmt: skip


def machine() -> dict[str, Any]:
    import numpy
    import sklearn

    return {
        "python": platform.python_version(),
        "numpy": numpy.__version__,
        "sklearn": sklearn.__version__,
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "loadavg": os.getloadavg(),
    }


def run_one(s: Scenario, name: str, args: argparse.Namespace) -> ReplayResult:
    pred: Any = name
    if name == "learned/no-fit":
        pred = LearnedPredictor(first_train_after=1 << 62)
    r = replay(
        s.trace, pred, ram_bytes=s.ram_bytes, prefetch_budget_bytes=s.prefetch_budget_bytes,
        depth=args.depth, disk_gbps=args.disk_gbps, train_every=args.train_every,
        min_confidence=args.min_confidence,
    )  # fmt: skip
    r.predictor = name
    return r


def verdict(name: str, res: dict[str, ReplayResult]) -> tuple[list[str], dict[str, Any]]:
    seq, lrn, auto = res["sequence"], res["learned"], res["auto"]
    d_hit = lrn.hit_rate - seq.hit_rate
    d_stall = (lrn.stall_s - seq.stall_s) / seq.stall_s if seq.stall_s else 0.0
    if d_hit >= 0.01 or (d_hit > -0.005 and d_stall <= -0.05):
        lv = "beats"
    elif d_hit > -0.005 and d_stall <= 0.05:
        lv = "matches"
    else:
        lv = "LOSES TO"
    best_name = max(("sequence", "learned"), key=lambda n: (res[n].hit_rate, -res[n].stall_s))
    best = res[best_name]
    using = auto.predictor_stats.get("using", "?")
    auto_ok = auto.hit_rate >= best.hit_rate - 0.01
    lines = [
        f"  learned {lv} sequence: hit rate {lrn.hit_rate:.1%} vs {seq.hit_rate:.1%} "
        f"({d_hit * 100:+.1f} pt), stall {lrn.stall_s:.2f} s vs {seq.stall_s:.2f} s ({d_stall:+.0%}), "
        f"wasted {lrn.wasted_bytes / MIB:.0f} vs {seq.wasted_bytes / MIB:.0f} MiB",
        f"  auto ends using {using} ({auto.predictor_stats.get('switches', 0)} switches): hit rate "
        f"{auto.hit_rate:.1%} vs best {best_name} {best.hit_rate:.1%}: "
        + ("ok" if auto_ok else "NOT the best"),
    ]
    nofit = res.get("learned/no-fit")
    if nofit is not None:
        lines.append(
            f"  the fitted model vs its tables alone: hit rate {lrn.hit_rate:.1%} vs {nofit.hit_rate:.1%}, "
            f"wasted {lrn.wasted_bytes / MIB:.0f} vs {nofit.wasted_bytes / MIB:.0f} MiB"
        )
    return lines, {"learned_vs_sequence": lv.strip(), "auto_using": using, "auto_ok": auto_ok}


def per_access(args: argparse.Namespace) -> dict[str, Any]:
    """The predictor thread's work per access, each predictor alone on each trace: observe() of
    every access, plus predict(depth) after a get, timed one access at a time (perf_counter_ns),
    trained as the daemon would (every --train-every accesses, off the clock: the daemon trains in
    a child process). Rounds interleave the predictors; mean and p99 of all rounds together, and
    the spread of the per-round means."""
    names = ("none", "sequence", "learned", "auto")
    traces = [n for n in args.scenarios.split(",") if n]
    out: dict[str, Any] = {}
    print(f"\n== per-access work (us): observe + predict, {args.rounds} rounds, interleaved")
    print(f"   {'trace':<22}{'predictor':<10}{'mean':>7}{'p99':>7}{'max':>8}  round means")
    for tname in traces:
        s = make_scenario(tname, args.seed, **(QUICK[tname] if args.quick else {}))
        times: dict[str, list[int]] = {n: [] for n in names}
        means: dict[str, list[float]] = {n: [] for n in names}
        using: dict[str, str] = {}
        for _ in range(args.rounds):
            for name in names:
                p = make_predictor(name, **({} if name in ("none", "sequence") else {"min_confidence": 0.2}))
                ts: list[int] = []
                for i, a in enumerate(s.trace):
                    if args.train_every and i and i % args.train_every == 0 and p.wants_training():
                        p.install(p.train(s.trace[max(0, i - 65536) : i]))
                    t = time.perf_counter_ns()
                    p.observe(a)
                    if a.op == "get":
                        p.predict(a, args.depth)
                    ts.append(time.perf_counter_ns() - t)
                times[name] += ts
                means[name].append(sum(ts) / len(ts) / 1e3)
                if name == "auto":
                    using[name] = p.stats().get("using", "?")
        out[tname] = {}
        for name in names:
            ts = sorted(times[name])
            mean = sum(ts) / len(ts) / 1e3
            p99 = ts[int(0.99 * (len(ts) - 1))] / 1e3
            rng = f"{min(means[name]):.2f}-{max(means[name]):.2f}"
            extra = f" (auto follows {using['auto']})" if name == "auto" else ""
            print(f"   {tname:<22}{name:<10}{mean:>7.2f}{p99:>7.1f}{ts[-1] / 1e3:>8.0f}  {rng}{extra}")
            out[tname][name] = {"mean_us": mean, "p99_us": p99, "max_us": ts[-1] / 1e3,
                                "round_means_us": means[name]}  # fmt: skip
        if "auto" in using:
            out[tname]["auto"]["follows"] = using["auto"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", metavar="OUT", help="write every number to OUT")
    ap.add_argument("--quick", action="store_true", help="smaller traces")
    ap.add_argument(
        "--scenarios",
        default=",".join(SCENARIO_NAMES + EXTRA_SCENARIOS),
        help="comma-separated subset of " + ", ".join(SCENARIO_NAMES + EXTRA_SCENARIOS),
    )
    ap.add_argument("--depth", type=int, default=2)
    ap.add_argument("--disk-gbps", type=float, default=1.5)
    ap.add_argument("--train-every", type=int, default=2000)
    ap.add_argument("--min-confidence", type=float, default=DEFAULT_MIN_CONFIDENCE)
    ap.add_argument("--no-ablation", action="store_true", help="leave out the learned/no-fit row")
    ap.add_argument("--trace", action="append", default=[], metavar="FILE",
                    help="also replay a recorded trace file (tierctl trace record, or "
                         "bench/record_qwen3vl_trace.py for trace (e)); may be repeated")  # fmt: skip
    ap.add_argument(
        "--per-access",
        action="store_true",
        help="instead of the replays: time each predictor's observe + predict per access",
    )
    ap.add_argument("--rounds", type=int, default=3, help="rounds for --per-access [3]")
    args = ap.parse_args()

    facts = machine()
    print(
        f"python {facts['python']}, numpy {facts['numpy']}, scikit-learn {facts['sklearn']}, "
        f"{facts['cpus']} CPUs, load {facts['loadavg'][0]:.2f}; seed {args.seed}; depth {args.depth}, "
        f"disk {args.disk_gbps} GB/s, min confidence {args.min_confidence}, train every {args.train_every}"
    )
    if args.per_access:
        res = per_access(args)
        if args.json:
            Path(args.json).write_text(json.dumps({"machine": facts, "args": vars(args), "per_access": res}))
        return
    preds = [p for p in PREDICTORS if not (args.no_ablation and p == "learned/no-fit")]
    out: dict[str, Any] = {"machine": facts, "args": vars(args), "scenarios": {}}
    summary: list[tuple[str, dict[str, Any]]] = []
    t_all = time.perf_counter()
    jobs: list[tuple[str, str | None]] = [(n, None) for n in args.scenarios.split(",") if n]
    jobs += [(Path(f).name, f) for f in args.trace]
    for name, trace_file in jobs:
        if trace_file is not None:
            s = recorded(trace_file, name)
            WANT.setdefault(name, "matches")
        else:
            s = make_scenario(name, args.seed, **(QUICK[name] if args.quick else {}))
        gets = sum(a.op == "get" for a in s.trace)
        print(
            f"\n== {name}: {s.description}\n   {len(s.trace)} accesses ({gets} gets), working set "
            f"{s.working_set_bytes / (1 << 30):.2f} GiB, RAM {s.ram_bytes / (1 << 30):.2f} GiB, "
            f"prefetch budget {s.prefetch_budget_bytes / MIB:.0f} MiB"
        )
        print(
            f"   {'predictor':<15}{'hit rate':>9}{'misses':>8}{'prefetched':>11}{'used':>7}{'late':>6}"
            f"{'wasted MiB':>11}{'stall s':>9}{'makespan s':>11}{'us/get':>8}{'train s':>8}"
        )
        res: dict[str, ReplayResult] = {}
        for p in preds:
            r = run_one(s, p, args)
            res[p] = r
            print(
                f"   {p:<15}{r.hit_rate:>9.1%}{r.demand_misses:>8}{r.prefetch_issued:>11}{r.prefetch_used:>7}"
                f"{r.prefetch_late:>6}{r.wasted_bytes / MIB:>11.0f}{r.stall_s:>9.2f}{r.makespan_s:>11.1f}"
                f"{r.predict_us_mean:>8.0f}{r.train_s:>8.2f}"
            )
        lines, v = verdict(name, res)
        print("\n".join(lines))
        fw = res["learned"].predictor_stats.get("feature_weights")
        if fw:
            top = ", ".join(f"{k} {w:.2f}" for k, w in list(fw.items())[:5])
            st = res["learned"].predictor_stats
            print(
                f"  learned's model: {st.get('samples')} examples, held-out AUC {st.get('holdout_auc')}, "
                f"top-1 precision {st.get('holdout_top1')}; feature weight shares: {top}"
            )
        summary.append((name, v))
        out["scenarios"][name] = {
            "description": s.description,
            "accesses": len(s.trace),
            "gets": gets,
            "working_set_bytes": s.working_set_bytes,
            "ram_bytes": s.ram_bytes,
            "prefetch_budget_bytes": s.prefetch_budget_bytes,
            "results": {p: r.to_dict() for p, r in res.items()},
            "verdict": v,
        }

    print("\n== goal (issue 4): learned >= sequence everywhere, > on interleaved and vision; auto the best")
    ok = True
    for name, v in summary:
        want = WANT[name]
        met = v["learned_vs_sequence"] in ({"beats"} if want == "beats" else {"beats", "matches"})
        ok &= met and v["auto_ok"]
        auto = "ok" if v["auto_ok"] else "NOT ok"
        print(
            f"  {name:<20} learned {v['learned_vs_sequence']} sequence (wanted: {want}) "
            f"{'met' if met else 'NOT MET'}; auto uses {v['auto_using']}: {auto}"
        )
    print(f"  overall: {'met' if ok else 'NOT met (see above)'}; {time.perf_counter() - t_all:.0f} s")
    out["goal_met"] = ok
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
