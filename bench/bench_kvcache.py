"""TierdKVCache against transformers' DynamicCache at long context, on one machine, in one run.

    python bench/bench_kvcache.py [--contexts 4096,8192,16384,32768 | --find 4096] [--kv-mb 320] [--json OUT]

The model: a random bf16 Qwen3-VL text decoder (vocab 32k, hidden 1024, 16 layers, 4 heads and 2 KV
heads of 128: 16 KiB of K/V per token; Qwen3-VL-2B holds 112 KiB per token in 28 layers), text only.
Contexts are prefilled in chunks of --chunk tokens (as a server does: no N x N attention scores),
then --tokens tokens decoded greedily.

1. Longest context at a fixed RAM budget: a memory cgroup (v1) holding the model process and, for
   TierdKVCache, its daemon (a RAM tier of --ram-tier-mb and a disk tier: K/V blocks beyond the RAM
   tier spill to disk). Its limit is the model's own memory (measured: a run with a 512-token
   context) plus --kv-mb. With --contexts each context is tried with each cache, longest first,
   stopping at the first served; with --find N each cache is tried at N, 2N, 4N, ... until a run
   fails (OOM-killed, or not done within --timeout), so the longest context served lies between
   the last served and the first failed. A run is served when it decodes every token; the
   worker's prefill progress (tokens, tokens/s) is printed as it goes (every 10 s).
2. Decode speed at a window of 1024 and more: one process, one daemon (RAM tier holding every
   block, no cgroup), a prompt of --decode-context tokens; DynamicCache and TierdKVCache(window=W)
   decode --tokens tokens in lockstep (each token one step of each cache in turn, so load from
   elsewhere falls on all alike), --rounds times; tokens/s per run, and the ratio TierdKVCache /
   DynamicCache of each round (the spread is over rounds), with the median of the per-step ratios.
   Tokens are compared.
   TierdKVCache runs with its default hold budget (every block of this prompt held); the windows
   of --stream-windows also run with hold_bytes=0 (every block fetched at every step), as the
   reference for what holding saves. Minor page faults per decoded token are reported for each.
Needs root for the cgroups (case 1 is skipped otherwise).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from memcg import CG_ROOT, Cgroup

LAYERS, HIDDEN, HEADS, KV_HEADS, HEAD_DIM, VOCAB = 16, 1024, 4, 2, 128, 32768
KV_PER_TOKEN = LAYERS * 2 * KV_HEADS * HEAD_DIM * 2


def build_model():
    import torch
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)  # built in bf16: no float32 copy at the start
    cfg = Qwen3VLConfig(
        text_config={
            "hidden_size": HIDDEN, "intermediate_size": 3 * HIDDEN, "num_hidden_layers": LAYERS,
            "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS, "head_dim": HEAD_DIM,
            "vocab_size": VOCAB, "max_position_embeddings": 65536, "dtype": "bfloat16",
            "rope_scaling": {"rope_type": "default", "mrope_section": [24, 20, 20],
                             "mrope_interleaved": True},
        },
        vision_config={"depth": 1, "hidden_size": 64, "intermediate_size": 128, "num_heads": 1,
                       "out_hidden_size": HIDDEN, "deepstack_visual_indexes": []},
        image_token_id=VOCAB - 4, video_token_id=VOCAB - 3, vision_start_token_id=VOCAB - 2,
        vision_end_token_id=VOCAB - 1, tie_word_embeddings=True, dtype="bfloat16",
    )  # fmt: skip
    return Qwen3VLForConditionalGeneration(cfg).to(torch.bfloat16).eval()


def prompt(n: int):
    import torch

    g = torch.Generator().manual_seed(1)
    return torch.randint(0, VOCAB - 8, (1, n), generator=g)


def serve(model, ids, cache, chunk: int, tokens: int, progress=None, stats: dict | None = None):
    """Prefill ``ids`` in chunks into ``cache``, then decode ``tokens`` greedily; (tokens, decode tok/s).
    ``progress(done, tok_s)`` is called after each prefill chunk; ``stats`` gets the prefill rate and
    the minor page faults per decoded token."""
    import resource

    import torch

    from tierd_integration import cache_kwargs

    n = ids.shape[1]
    with torch.inference_mode():
        out = None
        t0 = time.perf_counter()
        for s in range(0, n, chunk):
            part = ids[:, s : s + chunk]
            pos = torch.arange(s, s + part.shape[1]).unsqueeze(0)
            out = model(input_ids=part, use_cache=True, position_ids=pos, cache_position=pos[0],
                        logits_to_keep=1, **cache_kwargs(cache))  # fmt: skip
            if progress:
                progress(s + part.shape[1], (s + part.shape[1]) / (time.perf_counter() - t0))
        prefill_s = time.perf_counter() - t0
        toks = [int(out.logits[0, -1].argmax())]
        flt0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        t0 = time.perf_counter()
        for i in range(tokens - 1):
            pos = torch.tensor([[n + i]])
            out = model(input_ids=torch.tensor([[toks[-1]]]), use_cache=True, position_ids=pos,
                        cache_position=pos[0], **cache_kwargs(cache))  # fmt: skip
            toks.append(int(out.logits[0, -1].argmax()))
        dt = time.perf_counter() - t0
    if stats is not None:
        stats["prefill_tok_s"] = n / prefill_s
        stats["minflt_per_token"] = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - flt0) / (tokens - 1)
    return toks, (tokens - 1) / dt


def worker(a: argparse.Namespace) -> None:
    from transformers import DynamicCache

    model = build_model()
    ids = prompt(a.context)
    res: dict = {}

    def progress(done: int, tok_s: float) -> None:
        print(f"prefill {done}/{a.context} tokens, {tok_s:.0f} tokens/s", flush=True)

    if a.cache == "dynamic":
        cache = DynamicCache()
        toks, tps = serve(model, ids, cache, a.chunk, a.tokens, progress, res)
    else:
        from tierd_client import Client
        from tierd_integration import TierdKVCache

        with Client(a.socket) as c:
            cache = TierdKVCache(c, window=a.window, block=a.block)
            toks, tps = serve(model, ids, cache, a.chunk, a.tokens, progress, res)
            res.update(put_failures=cache.put_failures, offloaded_blocks=cache.offloaded_blocks,
                       held_peak=cache.held_peak, hold_sheds=cache.hold_sheds)  # fmt: skip
            cache.close()
    res.update(tokens=toks, decode_tok_s=tps)
    Path(a.out).write_text(json.dumps(res))


def run_limited(tmp: Path, a: argparse.Namespace, cache: str, context: int, limit: int, log=print) -> dict:
    """One model process (and, for tierd, its daemon) in a fresh cgroup of ``limit`` bytes; the
    worker's progress lines go to ``log`` as they come (the last one only every 10 s)."""
    from tierd import launch

    cg = Cgroup(f"bench-kv-{os.getpid()}-{cache}-{context}")
    daemon = None
    out = tmp / f"{cache}-{context}.json"
    res: dict = {"cache": cache, "context": context, "limit": limit}
    try:
        cg.set("memory.limit_in_bytes", limit)
        cmd = [sys.executable, __file__, "--role", "w", "--cache", cache, "--context", str(context),
               "--out", str(out), "--chunk", str(a.chunk), "--tokens", str(a.limit_tokens),
               "--window", str(a.window), "--block", str(a.block)]  # fmt: skip
        if cache == "tierd":
            sock = tmp / f"kv-{context}.sock"
            daemon = launch.start(sock, "--state-dir", str(tmp / f"state-{context}"), "--disk-bytes", "8GiB",
                                  ram_bytes=f"{a.ram_tier_mb}MiB", log_path=tmp / f"kv-{context}.log",
                                  prefix=cg.prefix())  # fmt: skip
            cmd += ["--socket", str(sock)]
        t0 = time.perf_counter()
        rc, err = watch([*cg.prefix(), *cmd], a.timeout, lambda line: log(f"  {cache} {context}: {line}"))
        res["wall_s"] = time.perf_counter() - t0
        res["rc"] = rc
        res["peak"] = int(cg.get("memory.max_usage_in_bytes"))
        res["oom_kills"] = cg.oom_kills()
        if out.exists():
            res.update(json.loads(out.read_text()))
        elif rc is None:
            res["error"] = f"not done within {a.timeout}s"
        else:
            res["error"] = "OOM-killed" if res["oom_kills"] else f"exit {rc}: {err[-200:]}"
    finally:
        if daemon is not None:
            daemon.stop()
        cg.remove()
    return res


def watch(cmd: list[str], timeout: float, show) -> tuple[int | None, str]:
    """Run ``cmd``, passing its stdout lines to ``show`` at most every 10 s (and the last one);
    (exit status, or None when killed at ``timeout``; the last line of stderr)."""
    import threading

    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    err: list[str] = []
    threading.Thread(target=lambda: err.extend(p.stderr or []), daemon=True).start()
    killer = threading.Timer(timeout, p.kill)
    killer.start()
    last, shown, at = "", "", 0.0
    for line in p.stdout or []:
        last = line.rstrip()
        if time.perf_counter() - at >= 10:
            show(last)
            shown, at = last, time.perf_counter()
    rc = p.wait()
    timed_out = not killer.is_alive()
    killer.cancel()
    if last and last != shown:
        show(last)
    return (None if timed_out else rc), (err[-1].strip() if err else "")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--contexts", default="4096,8192,16384,32768", help="contexts tried in case 1")
    ap.add_argument(
        "--find",
        type=int,
        default=0,
        help="case 1: try N, 2N, 4N, ... tokens until a run fails, instead of --contexts",
    )
    ap.add_argument("--caches", default="dynamic,tierd", help="case 1's caches [dynamic,tierd]")
    ap.add_argument("--model-peak-mb", type=int, default=0,
                    help="case 1: the model's own peak, measured before (skips that run) [0]")  # fmt: skip
    ap.add_argument(
        "--kv-mb",
        type=int,
        default=320,
        help="case 1's limit: the model's own memory + this [320: a DynamicCache of ~20k tokens]",
    )
    ap.add_argument("--ram-tier-mb", type=int, default=64, help="case 1: the daemon's RAM tier [64]")
    ap.add_argument("--limit-tokens", type=int, default=8, help="case 1: tokens decoded [8]")
    ap.add_argument("--decode-context", type=int, default=4096, help="case 2's prompt [4096]")
    ap.add_argument("--windows", default="1024,2048", help="case 2's TierdKVCache windows [1024,2048]")
    ap.add_argument("--stream-windows", default="1024",
                    help="case 2: these windows also with hold_bytes=0 ('' for none) [1024]")  # fmt: skip
    ap.add_argument("--rounds", type=int, default=3, help="case 2's rounds [3]")
    ap.add_argument("--tokens", type=int, default=32, help="case 2: tokens decoded per run [32]")
    ap.add_argument("--chunk", type=int, default=1024, help="prefill chunk [1024]")
    ap.add_argument("--window", type=int, default=1024, help="case 1's TierdKVCache window [1024]")
    ap.add_argument("--block", type=int, default=128, help="TierdKVCache block [128]")
    ap.add_argument("--cases", default="limit,decode", help="limit,decode")
    ap.add_argument("--timeout", type=int, default=300,
                    help="per run in case 1 (start, prefill, decode) [300 s]")  # fmt: skip
    ap.add_argument("--json", help="write every number here")
    ap.add_argument("--role", help=argparse.SUPPRESS)
    ap.add_argument("--cache", help=argparse.SUPPRESS)
    ap.add_argument("--context", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--socket", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.role:
        worker(a)
        return 0

    T0 = time.perf_counter()
    R: dict = {"kv_bytes_per_token": KV_PER_TOKEN, "load_start": os.getloadavg()[0], "cpus": os.cpu_count()}
    tmp = Path(tempfile.mkdtemp(prefix="bench-kv-", dir="/var/tmp"))

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - T0:6.1f}s] {msg}", flush=True)

    cases = set(a.cases.split(","))
    try:
        if "limit" in cases and os.geteuid() == 0 and CG_ROOT.is_dir():
            # the model's own memory: a short context under a generous limit
            peak = (a.model_peak_mb << 20) or run_limited(tmp, a, "dynamic", 512, 8 << 30, log)["peak"]
            limit = peak + (a.kv_mb << 20)
            R["limit"] = {"model_peak_512": peak, "limit": limit, "runs": [], "find": a.find}
            log(f"model alone at 512 tokens: peak {peak / 2**20:.0f} MiB; "
                f"limit {limit / 2**20:.0f} MiB "
                f"(+{a.kv_mb} MiB = {(a.kv_mb << 20) // KV_PER_TOKEN} tokens of K/V)")  # fmt: skip
            for cache in a.caches.split(","):
                if a.find:
                    tries = (a.find << i for i in range(20))
                else:
                    tries = iter(sorted((int(x) for x in a.contexts.split(",")), reverse=True))
                for ctx in tries:
                    log(f"{cache:8s} {ctx:6d} tokens: starting (limit {limit / 2**20:.0f} MiB, {a.timeout}s)")
                    r = run_limited(tmp, a, cache, ctx, limit, log)
                    R["limit"]["runs"].append(r)
                    how = r.get("error") or (f"served, prefill {r['prefill_tok_s']:.0f} tok/s, "
                                             f"decode {r['decode_tok_s']:.2f} tok/s")  # fmt: skip
                    log(f"{cache:8s} {ctx:6d} tokens: {how} (peak {r.get('peak', 0) / 2**20:.0f} MiB, "
                        f"{r.get('wall_s', 0):.0f}s)")  # fmt: skip
                    if ("error" in r) == bool(a.find):
                        break
        if "decode" in cases:
            R["decode"] = decode_case(tmp, a, log)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    R["load_end"] = os.getloadavg()[0]
    R["total_s"] = time.perf_counter() - T0
    report(R)
    if a.json:
        Path(a.json).write_text(json.dumps(R, indent=1))
    return 0


def lockstep(model, ids, caches: dict, chunk: int, tokens: int) -> dict:
    """Prefill ``ids`` into every cache, then decode ``tokens`` greedily with all of them in lockstep:
    each token is one step of each cache in turn, so a burst of load from elsewhere falls on all of
    them alike. Per cache: tokens/s over its own steps, minor page faults per token, and whether its
    tokens equal the first cache's; per step, each cache's time over the first's (median)."""
    import resource

    import torch

    from tierd_integration import cache_kwargs

    n = ids.shape[1]
    tok: dict = {}
    with torch.inference_mode():
        for name, cache in caches.items():
            for s in range(0, n, chunk):
                part = ids[:, s : s + chunk]
                pos = torch.arange(s, s + part.shape[1]).unsqueeze(0)
                out = model(input_ids=part, use_cache=True, position_ids=pos, cache_position=pos[0],
                            logits_to_keep=1, **cache_kwargs(cache))  # fmt: skip
            tok[name] = [int(out.logits[0, -1].argmax())]
        secs: dict = {name: [] for name in caches}
        faults = dict.fromkeys(caches, 0)
        for i in range(tokens - 1):
            pos = torch.tensor([[n + i]])
            for name, cache in caches.items():
                f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                t0 = time.perf_counter()
                out = model(input_ids=torch.tensor([[tok[name][-1]]]), use_cache=True, position_ids=pos,
                            cache_position=pos[0], **cache_kwargs(cache))  # fmt: skip
                tok[name].append(int(out.logits[0, -1].argmax()))
                secs[name].append(time.perf_counter() - t0)
                faults[name] += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
    first = next(iter(caches))
    row: dict = {}
    for name in caches:
        row[name] = (tokens - 1) / sum(secs[name])
        row[f"minflt_{name}"] = faults[name] / (tokens - 1)
        if name != first:
            row[f"same_{name}"] = tok[name] == tok[first]
            row[f"step_{name}"] = statistics.median(
                a / b for a, b in zip(secs[first], secs[name], strict=True)
            )
    return row


def decode_case(tmp: Path, a: argparse.Namespace, log) -> dict:
    from transformers import DynamicCache

    from tierd import launch
    from tierd_client import Client
    from tierd_integration import TierdKVCache

    ctx = a.decode_context
    need = (ctx + a.tokens) * KV_PER_TOKEN
    d = launch.start(tmp / "dec.sock", "--disk-bytes", "0", ram_bytes=f"{2 * need // 2**20 + 256}MiB",
                     log_path=tmp / "dec.log")  # fmt: skip
    out: dict = {"context": ctx, "rounds": []}
    try:
        model = build_model()
        ids = prompt(ctx)
        with Client(tmp / "dec.sock") as c:
            serve(model, ids[:, :256], DynamicCache(), a.chunk, 4)  # warm-up: first calls are slow
            with TierdKVCache(c, window=128, block=a.block) as kv:
                serve(model, ids[:, :256], kv, a.chunk, 4)
            runs = [(f"tierd_{w}", int(w), None) for w in a.windows.split(",")]
            runs += [(f"stream_{w}", int(w), 0) for w in a.stream_windows.split(",") if w]
            for r in range(a.rounds):
                caches: dict = {"dynamic": DynamicCache()}
                for name, w, hold in runs:
                    kw = {} if hold is None else {"hold_bytes": hold}
                    caches[name] = TierdKVCache(c, window=w, block=a.block, **kw)
                try:
                    row = lockstep(model, ids, caches, a.chunk, a.tokens)
                finally:
                    for name, kv in caches.items():
                        if name != "dynamic":
                            row[f"held_mib_{name}"] = kv.held_peak / 2**20
                            row[f"rt_{name}"] = kv.round_trips
                            kv.close()
                out["rounds"].append(row)
                shown = [f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()]
                log(f"decode round {r + 1}: " + ", ".join(shown))
    finally:
        d.stop()
    return out


def report(R: dict) -> None:
    M = 2**20
    print(f"\nK/V: {R['kv_bytes_per_token'] // 1024} KiB per token ({LAYERS} layers, {KV_HEADS} KV heads of "
          f"{HEAD_DIM}, bf16)")  # fmt: skip
    lim = R.get("limit")
    if lim:
        print(f"(1) cgroup limit {lim['limit'] / M:.0f} MiB (the model alone at 512 tokens peaks at "
              f"{lim['model_peak_512'] / M:.0f} MiB)")  # fmt: skip
        for cache in dict.fromkeys(r["cache"] for r in lim["runs"]):  # the caches this run tried
            runs = [r for r in lim["runs"] if r["cache"] == cache]
            ok = [r["context"] for r in runs if "error" not in r]
            fails = [f"{r['context']} ({r['error']})" for r in runs if "error" in r]
            print(f"  {cache:8s} longest served: {max(ok) if ok else 'none of those tried'}; "
                  f"failed: {', '.join(fails) or '-'}")  # fmt: skip
    dec = R.get("decode")
    if dec and dec["rounds"]:
        print(f"(2) decode at a {dec['context']}-token prompt, tok/s per round:")
        keys = [k for k in dec["rounds"][0] if k == "dynamic" or k.startswith(("tierd_", "stream_"))]
        for k in keys:
            vals = [r[k] for r in dec["rounds"]]
            line = f"  {k:12s} " + " ".join(f"{v:.2f}" for v in vals)
            if k != "dynamic":
                ratios = [r[k] / r["dynamic"] for r in dec["rounds"]]
                steps = [r[f"step_{k}"] for r in dec["rounds"] if f"step_{k}" in r]
                line += (f"   / DynamicCache: median {statistics.median(ratios):.3f} "
                         f"(min {min(ratios):.3f}, max {max(ratios):.3f})")  # fmt: skip
                if steps:
                    line += f"; per step, median of rounds' medians {statistics.median(steps):.3f}"
            print(line)
        flt = [f"{k[7:]} {statistics.median(r[k] for r in dec['rounds']):.0f}" for k in dec["rounds"][0]
               if k.startswith("minflt_")]  # fmt: skip
        print("  minor page faults per decoded token (median): " + ", ".join(flt))
        held = [f"{k[9:]} {dec['rounds'][0][k]:.0f}" for k in dec["rounds"][0] if k.startswith("held_mib_")]
        print("  held MiB (peak): " + ", ".join(held))
        same = all(v for r in dec["rounds"] for k, v in r.items() if k.startswith("same"))
        print(f"  tokens identical to DynamicCache in every run: {same}")
    print(f"load average {R['load_start']:.2f} -> {R['load_end']:.2f} on {R['cpus']} CPUs; "
          f"total {R['total_s']:.0f}s")  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
