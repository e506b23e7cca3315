"""Record the eviction workloads from real daemons serving real model processes (issue 17, item 3).

    python bench/record_workloads.py [--only stream,multi,vision,chat] [--out bench/traces]
                                     [--stream-prompts N] [--multi-prompts A,B] [--vision-draws N]
                                     [--chat-sessions N] [--chat-turns N] [--seed N]
    python bench/bench_eviction.py                       # replays what this wrote

Each workload starts its own tierd (a RAM tier smaller than what the model processes put in it, a
disk tier below), runs the model processes as child processes of this script, each with its own
client, and reads the daemon's access log while they work and after (``Client.trace``, what
``tierctl trace record`` does; read every few seconds, so the log's ring of 65536 never drops a
row). The models are small random Qwen3-VL-shaped bf16 checkpoints
(``bench_qwen3vl.make_checkpoint``, the smallest of which is about 0.45 GB: the vision tower and
the embeddings); what matters here is the access stream, not the weights.

The lengths are chosen so that each half of every trace (the replay trains on the first half and
measures the second) holds several times the 1000 gets ``auto`` waits for as evidence; the
defaults are what the committed traces were recorded with:

- stream: one model streamed from tierd (``from_pretrained(mode="streaming")``: the model's own
  hints), RAM at half the weights, ``--stream-prompts`` (20) prompts of 24 tokens.
- multi: two different models (4 and 18 decoder layers) on one daemon, RAM at 70% of their
  weights' sum (at half, the parts each streaming process keeps leased filled it and a put was
  refused), two processes at the same time at different rates: 24 and 8 tokens per prompt,
  ``--multi-prompts`` (12,20) prompts.
- vision: the vision cache (``enable_vision_cache``) over 400 distinct images drawn
  ``--vision-draws`` (8000) times with Zipf popularity (s=1.0), the vision tower run in the
  process; RAM at a quarter of the features' bytes (the weights stay in the process).
- chat: ``--chat-sessions`` (6) chats with a ``TierdKVCache`` each (window 64 tokens, blocks of 16,
  ``hold_bytes=0``: each step fetches its offloaded blocks, as when RAM cannot hold them),
  interleaved turn by turn with pauses of 0.1-0.6 s between turns, ``--chat-turns`` (10) turns of 24
  prompt + 12 generated tokens each; RAM at 3 MiB for 4 chats of 8 turns (43% of the KV blocks they
  end with), scaled with chats x turns (5.6 MiB for the defaults, 39% of their 14.2 MiB).

``--seed`` (0, the committed traces') changes what the model processes are given: the stream and
multi prompts, the vision workload's images and their draws, the chats' tokens and pauses; and,
for a seed other than 0, the lengths that shape the access stream: each stream or multi prompt's
generated tokens (2/3 to 4/3 of ``--tokens``), each chat turn's prompt (12-36 tokens) and the order
of the chats in each round (seed 0 keeps the fixed ones the committed traces were recorded with; a
change of tokens alone leaves a streamed model's or a KV cache's access stream as it was). Another
seed records a held-out set (``--out bench/traces/heldout``) of the same workloads.

Each trace is written as zstd-compressed JSON lines of access rows (``tierd.predict.log.to_row``):
``bench/traces/NAME.jsonl.zst``, read back by :func:`load`. Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

KINDS = ("stream", "multi", "vision", "chat")
MIB = 1 << 20


def save(path: Path, accesses: list) -> None:
    import zstandard

    from tierd.predict.log import to_row

    t0 = accesses[0].t if accesses else 0.0
    lines = []
    for a in accesses:
        row = to_row(a)
        row[0] = round(row[0] - t0, 6)
        lines.append(json.dumps(row, separators=(",", ":")))
    path.write_bytes(zstandard.ZstdCompressor(level=19).compress(("\n".join(lines) + "\n").encode()))


def load(path: str | Path) -> list:
    """The accesses of a trace written by :func:`save`."""
    import zstandard

    from tierd.predict.log import from_row

    text = zstandard.ZstdDecompressor().decompress(Path(path).read_bytes()).decode()
    return [from_row(json.loads(line)) for line in text.splitlines() if line]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# -- model processes ---------------------------------------------------------------------------------
def worker(a: argparse.Namespace) -> None:
    import torch
    from bench_qwen3vl import inputs_for
    from transformers import AutoConfig, Qwen3VLForConditionalGeneration

    import tierd_integration as ti
    from tierd_client import Client

    torch.set_num_threads(1)
    with Client(a.socket) as c:
        if a.worker == "stream":
            cfg = AutoConfig.from_pretrained(a.ckpt)
            model = ti.from_pretrained(a.ckpt, c, namespace=a.namespace, mode="streaming", prefetch_depth=1)
            rng = random.Random(a.seed)
            for n in range(a.prompts):
                # seed 0: the committed traces' fixed length; another seed draws each prompt's
                tokens = a.tokens if a.seed == 0 else rng.randint(a.tokens * 2 // 3, a.tokens * 4 // 3)
                with torch.inference_mode():
                    model.generate(**inputs_for(cfg, seed=n % 3 + 3 * a.seed), max_new_tokens=tokens,
                                   min_new_tokens=tokens, do_sample=False)  # fmt: skip
                log(f"{a.namespace}: prompt {n + 1}/{a.prompts}")
        elif a.worker == "vision":
            model = Qwen3VLForConditionalGeneration.from_pretrained(a.ckpt, dtype=torch.bfloat16).eval()
            ti.enable_vision_cache(model, c)
            rng = random.Random(a.seed)
            weights = [1.0 / (i + 1) for i in range(a.images)]
            order = rng.choices(range(a.images), weights=weights, k=a.prompts)
            visual = model.model.visual
            for n, img in enumerate(order):
                x = inputs_for(model.config, seed=1000 + img + 100_000 * a.seed)
                with torch.inference_mode():
                    visual(x["pixel_values"].to(torch.bfloat16), grid_thw=x["image_grid_thw"])
                if n % 100 == 99:
                    log(f"vision: {n + 1}/{a.prompts} images")
        elif a.worker == "chat":
            model = Qwen3VLForConditionalGeneration.from_pretrained(a.ckpt, dtype=torch.bfloat16).eval()
            rng = random.Random(a.seed)
            vocab = model.config.text_config.vocab_size - 8
            # hold_bytes=0: every step fetches its offloaded blocks, the access pattern of a cache whose RAM
            # cannot hold them (the one eviction decides), and the one the committed trace was recorded with
            chats = [(ti.TierdKVCache(c, window=64, block=16, hold_bytes=0), []) for _ in range(a.sessions)]
            for turn in range(a.prompts):
                order = list(enumerate(chats))
                if a.seed:  # seed 0: the committed trace's fixed order and lengths; another seed draws them
                    rng.shuffle(order)
                for s, (kv, ids) in order:
                    ids.extend(
                        rng.randrange(vocab) for _ in range(24 if a.seed == 0 else rng.randint(12, 36))
                    )
                    x = torch.tensor([ids])
                    with torch.inference_mode():
                        out = model.generate(input_ids=x, attention_mask=torch.ones_like(x),
                                             max_new_tokens=a.tokens, min_new_tokens=a.tokens,
                                             do_sample=False, **ti.cache_kwargs(kv))  # fmt: skip
                    ids[:] = out[0].tolist()
                    time.sleep(rng.uniform(0.1, 0.6))
                    log(f"chat {s}: turn {turn + 1}/{a.prompts}, {len(ids)} tokens, "
                        f"{kv.offloaded_blocks} blocks")  # fmt: skip
            for kv, _ in chats:
                kv.close()


def drain(c: Any, since: float, into: list) -> float:
    """Append the daemon's accesses after ``since`` to ``into``; the new ``since``."""
    from tierd.predict.log import from_row

    while True:
        rows = c.trace(since, limit=20000)["accesses"]
        if not rows:
            return since
        into += [from_row(r) for r in rows]
        since = into[-1].t


def run_workers(specs: list[list[str]], sock: Path, c: Any, since: float, into: list) -> float:
    """Run the model processes to their end, reading the access log every 2 s; the new ``since``."""
    procs = [subprocess.Popen([sys.executable, __file__, "--socket", str(sock), *s]) for s in specs]
    try:
        while any(p.poll() is None for p in procs):
            since = drain(c, since, into)
            time.sleep(2.0)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p in procs:
        if p.wait() != 0:
            raise SystemExit(f"a model process failed (rc {p.returncode})")
    return drain(c, since, into)


# -- one workload ------------------------------------------------------------------------------------
def record(kind: str, out: Path, tmp: Path, a: argparse.Namespace) -> None:
    from bench_qwen3vl import make_checkpoint

    import tierd_integration as ti
    from tierd import launch
    from tierd_client import Client

    t0 = time.perf_counter()
    ckpts: dict[str, int] = {}
    sizes = {"stream": [("m1", 450)], "multi": [("m1", 450), ("m2", 800)], "vision": [("m1", 450)],
             "chat": [("m1", 450)]}[kind]  # fmt: skip
    for name, mb in sizes:
        ckpts[name] = make_checkpoint(tmp / name, mb)[0]
    weights = sum(ckpts.values())
    if kind == "stream":
        ram = weights // 2
    elif kind == "multi":
        ram = int(weights * 0.7)
    elif kind == "vision":
        ram = 400 * 512 * 1024 // 4  # a quarter of the features (512 KiB per image here)
    else:  # 3 MiB for 4 chats x 8 turns (43% of their 224 blocks of 32 KiB), scaled with chats x turns
        ram = 3 * MIB * a.chat_sessions * a.chat_turns // 32
    ram = max(ram, 2 * MIB)
    log(f"{kind}: {weights / MIB:.0f} MiB of weights, RAM tier {ram / MIB:.1f} MiB")
    disk = str(3 * weights + (256 << 20))
    d = launch.start(tmp / "s.sock", "--state-dir", str(tmp / "state"), "--disk-bytes", disk,
                     ram_bytes=str(ram), log_path=tmp / "tierd.log")  # fmt: skip
    p1, p2 = a.multi_prompts
    try:
        with Client(d.socket) as c:
            if kind in ("stream", "multi"):
                for name in ckpts:
                    ti.ingest(c, tmp / name, name, durable=True)
            since = c.trace(limit=0)["now"]
            if kind == "stream":
                specs = [["--worker", "stream", "--ckpt", str(tmp / "m1"), "--namespace", "m1",
                          "--tokens", "24", "--prompts", str(a.stream_prompts)]]  # fmt: skip
            elif kind == "multi":
                specs = [
                    ["--worker", "stream", "--ckpt", str(tmp / "m1"), "--namespace", "m1", "--tokens", "24",
                     "--prompts", str(p1)],
                    ["--worker", "stream", "--ckpt", str(tmp / "m2"), "--namespace", "m2", "--tokens", "8",
                     "--prompts", str(p2)],
                ]  # fmt: skip
            elif kind == "vision":
                specs = [["--worker", "vision", "--ckpt", str(tmp / "m1"), "--images", "400",
                          "--prompts", str(a.vision_draws)]]  # fmt: skip
            else:
                specs = [["--worker", "chat", "--ckpt", str(tmp / "m1"), "--sessions", str(a.chat_sessions),
                          "--prompts", str(a.chat_turns), "--tokens", "12"]]  # fmt: skip
            specs = [[*s, "--seed", str(a.seed)] for s in specs]
            accesses: list = []
            run_workers(specs, d.socket, c, since, accesses)
            status = c.stats()
    finally:
        d.stop()
    save(out / f"{kind}.jsonl.zst", accesses)
    ctr = status["counters"]
    gets = sum(x.op == "get" for x in accesses)
    log(
        f"{kind}: {len(accesses)} accesses ({gets} gets), {ctr['demotions']} demotions, "
        f"{ctr['reads_disk']} disk reads, {time.perf_counter() - t0:.0f}s -> {out / f'{kind}.jsonl.zst'}"
    )


def counts(text: str) -> tuple[int, int]:
    try:
        x, y = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"two counts, comma-separated (e.g. 12,20), got {text!r}") from None
    if x < 1 or y < 1:
        raise argparse.ArgumentTypeError(f"counts must be >= 1, got {text!r}")
    return x, y


def positive(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a whole number, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default=",".join(KINDS), help=f"workloads to record [{','.join(KINDS)}]")
    ap.add_argument(
        "--out", default=str(Path(__file__).resolve().parent / "traces"), help="folder for the traces"
    )
    ap.add_argument("--stream-prompts", type=positive, default=20, help="stream: prompts of 24 tokens [20]")
    ap.add_argument(
        "--multi-prompts",
        type=counts,
        default=(12, 20),
        help="multi: prompts of the 4-layer model (24 tokens) and of the 18-layer one (8 tokens) [12,20]",
    )
    ap.add_argument(
        "--vision-draws", type=positive, default=8000, help="vision: Zipf draws of the 400 images [8000]"
    )
    ap.add_argument("--chat-sessions", type=positive, default=6, help="chat: chats interleaved [6]")
    ap.add_argument("--chat-turns", type=positive, default=10, help="chat: turns per chat [10]")
    ap.add_argument("--worker", choices=KINDS[:1] + KINDS[2:], help=argparse.SUPPRESS)
    ap.add_argument("--socket", help=argparse.SUPPRESS)
    ap.add_argument("--ckpt", help=argparse.SUPPRESS)
    ap.add_argument("--namespace", default="m1", help=argparse.SUPPRESS)
    ap.add_argument("--tokens", type=int, default=8, help=argparse.SUPPRESS)
    ap.add_argument("--prompts", type=int, default=4, help=argparse.SUPPRESS)
    ap.add_argument("--images", type=int, default=160, help=argparse.SUPPRESS)
    ap.add_argument("--sessions", type=int, default=4, help=argparse.SUPPRESS)
    ap.add_argument(
        "--seed",
        type=int,
        default=0,
        help="what the model processes are given: prompts, images, draws, chats [0: the committed traces]",
    )
    a = ap.parse_args()
    if a.worker:
        worker(a)
        return 0
    kinds = [k.strip() for k in a.only.split(",") if k.strip()]
    bad = [k for k in kinds if k not in KINDS]
    if bad:
        print(f"record_workloads: unknown workload {bad[0]!r}; known: {', '.join(KINDS)}", file=sys.stderr)
        return 2
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    for kind in kinds:
        tmp = Path(tempfile.mkdtemp(prefix=f"tierd-rec-{kind}-"))
        try:
            record(kind, out, tmp, a)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
