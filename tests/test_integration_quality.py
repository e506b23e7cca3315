"""Quality and memory of a random Qwen3-VL served by a real tierd (CPU).

- int8 weights: a checkpoint ingested with ``codec="int8"`` is stored int8 on disk; after a restart
  every weight comes back through the int8 decode, and the model still picks the plain model's top-1
  token at nearly every position and generates the same greedy tokens.
- memory: streaming a model larger than the RAM tier, the model process's own memory (USS, which
  leaves out the shared arena) grows by about one window of blocks at most, not by the weights.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import torch

from tierd_client import Client
from tierd_integration import detach, from_pretrained, ingest, make_random_checkpoint, sample_inputs
from tierd_integration.checkpoint import make_config
from tierd_integration.weights import checkpoint_names

ROOT = Path(__file__).resolve().parents[1]
MiB = 1 << 20


def plain_model(ckpt: Path):
    from transformers import Qwen3VLForConditionalGeneration

    return Qwen3VLForConditionalGeneration.from_pretrained(ckpt).eval()


# -- int8 ---------------------------------------------------------------------------------------------
INT8_SEEDS = range(4)  # 4 inputs with an 8x8-patch image: 25 positions each, 100 in all
INT8_GRID = (8, 8)
INT8_NEW_TOKENS = 8
# Measured (small checkpoint, seed 0): top-1 agreement 98/100 positions, and all 4 greedy sequences
# identical. Checkpoint seeds 1-3 gave 100, 96 and 98 of 100. Random weights are a harsh case: the
# logits are nearly flat (std ~0.23, median top-1/top-2 margin ~0.06, smallest ~1e-4) while int8
# moves them by up to ~0.025, so the odd near-tie flips. 0.9 leaves room for two or three times the
# worst flip rate measured, and is far above chance (1/1024 over this vocabulary).
INT8_MIN_TOP1 = 0.9


def test_int8_weights_from_disk_keep_top1(start_daemon, tmp_path: Path) -> None:
    from tierd.codecs.int8 import error_bound

    ckpt = make_random_checkpoint(tmp_path / "small-vl", size="small", seed=0)
    plain = plain_model(ckpt)
    d = start_daemon(ram_bytes="64MiB", disk_bytes="64MiB")
    with Client(socket=d.socket) as c:
        r = ingest(c, ckpt, "q8", codec="int8", progress=False)
        assert r["put"] == r["tensors"] == len(checkpoint_names(ckpt))
        stats = [c.stat(e["key"]) for e in c.ls("q8/")]
        assert len(stats) == r["tensors"]
        assert all(s["durable"] and s["encoding"] == "int8" for s in stats)
        assert sum(s["stored_bytes"] for s in stats) < 0.3 * sum(s["nbytes"] for s in stats)
    d.stop()

    # Restart on the same state dir: the RAM copies (the original float32 bytes) are gone, so every
    # weight is promoted from its int8 disk copy on first use.
    d = start_daemon(ram_bytes="64MiB", disk_bytes="64MiB")
    with Client(socket=d.socket) as c:
        assert all(e["tiers"] == ["disk"] for e in c.ls("q8/"))
        model = from_pretrained(ckpt, c, namespace="q8", mode="resident")
        assert c.stats()["counters"]["puts"] == 0  # nothing re-ingested: the int8 entries are used
        assert all(c.arena.contains(p) for p in model.parameters())

        # The weights are the int8 decode: changed, and within the codec's stated per-row error.
        e = error_bound("float32")
        ref = dict(plain.named_parameters())
        changed = 0
        for name, p in model.named_parameters():
            w = ref[name].detach()
            changed += int((p != w).sum())
            if w.dim() >= 2:
                rows, got = w.reshape(w.shape[0], -1), p.reshape(w.shape[0], -1)
                bound = e * rows.abs().amax(dim=1, keepdim=True) + 2.0**-120
                assert bool(((got - rows).abs() <= bound).all()), name
        assert changed > 0

        agree = positions = same_seqs = 0
        for seed in INT8_SEEDS:
            inputs = sample_inputs(plain, seed=seed, grid=INT8_GRID)
            with torch.no_grad():
                want = plain(**inputs).logits[0].argmax(-1)
                got = model(**inputs).logits[0].argmax(-1)
                gen_want = plain.generate(**inputs, max_new_tokens=INT8_NEW_TOKENS, do_sample=False)
                gen_got = model.generate(**inputs, max_new_tokens=INT8_NEW_TOKENS, do_sample=False)
            agree += int((want == got).sum())
            positions += want.numel()
            same_seqs += int(torch.equal(gen_want, gen_got))
        top1 = agree / positions
        print(
            f"\nint8 from disk: top-1 agreement {agree}/{positions} = {top1:.3f}; "
            f"greedy sequences identical {same_seqs}/{len(INT8_SEEDS)}"
        )
        assert positions >= 64
        assert top1 >= INT8_MIN_TOP1
        # Greedy decoding follows one argmax per step, and a flip changes everything after it: allow
        # one sequence of the four to diverge (measured: none does).
        assert same_seqs >= len(INT8_SEEDS) - 1
        detach(model)
        assert c.stats()["leases"] == 0


# -- memory growth while streaming -------------------------------------------------------------------
PREFETCH_DEPTH = 2
NEW_TOKENS = 4
# Activations, KV cache (16 layers x 2 x ~30 positions x 128 floats: < 1 MiB), logits, the allocator's
# and the interpreter's own noise. Measured growth of the streaming model: ~5 MiB at its peak.
SLACK = 16 * MiB

WORKER = r"""
import gc, json, sys
import psutil, torch
from tierd_client import Client
from tierd_integration import from_pretrained, sample_inputs
from tierd_integration.checkpoint import make_config
from transformers import Qwen3VLForConditionalGeneration

sock, ckpt, new_tokens, depth = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
me = psutil.Process()
uss = lambda: me.memory_full_info().uss  # private pages only: the shared arena is not counted
# Warm up the code paths (lazy imports, op dispatch) on a tiny plain model, so they are not measured.
torch.manual_seed(0)
warm = Qwen3VLForConditionalGeneration(make_config("tiny")).eval()
with torch.no_grad():
    warm.generate(**sample_inputs(warm, seed=1), max_new_tokens=2, do_sample=False)
del warm
gc.collect()
c = Client(socket=sock)
u0 = uss()
model = from_pretrained(ckpt, c, namespace="wide", prefetch_depth=depth)
built = uss() - u0
peak, in_arena = [0], []
def sample(mod, args, out):  # inside a block's forward: its weights are bound
    peak[0] = max(peak[0], uss() - u0)
    in_arena.append(all(c.arena.contains(p) for p in mod.parameters()))
for layer in model.model.language_model.layers:
    layer.mlp.register_forward_hook(sample)
inputs = sample_inputs(model, seed=1)
with torch.no_grad():
    out = model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False)
after = uss() - u0
# Control: the same model as plain tensors in this process, so the measurement sees copied weights.
u1 = uss()
plain = Qwen3VLForConditionalGeneration.from_pretrained(ckpt).eval()
with torch.no_grad():
    ref = plain.generate(**inputs, max_new_tokens=new_tokens, do_sample=False)
print(json.dumps({
    "mode": model._tierd_binding.mode, "built": built, "peak": max(peak[0], after), "after": after,
    "sampled": len(in_arena), "in_arena": all(in_arena), "plain": uss() - u1,
    "same_tokens": torch.equal(out, ref),
}), flush=True)
"""


def make_wide_checkpoint(out: Path) -> Path:
    """A "small" Qwen3-VL with a wider, deeper text model: ~140 MiB of float32 weights, 16 blocks of
    ~8 MiB, so one window of blocks is a small part of the whole."""
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    cfg = make_config("small").to_dict()
    hidden = 384
    text = {**cfg["text_config"], "hidden_size": hidden, "intermediate_size": 4 * hidden}
    text.update(num_hidden_layers=16, num_attention_heads=hidden // 16, num_key_value_heads=hidden // 64)
    vision = {**cfg["vision_config"], "out_hidden_size": hidden}
    ids = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")
    config = Qwen3VLConfig(
        text_config=text, vision_config=vision, tie_word_embeddings=True, **{k: cfg[k] for k in ids}
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = Qwen3VLForConditionalGeneration(config).eval()
    model.save_pretrained(out, max_shard_size="20MB")
    return out


def test_streaming_memory_growth_is_bounded(start_daemon, tmp_path: Path) -> None:
    ckpt = make_wide_checkpoint(tmp_path / "wide-vl")
    names = checkpoint_names(ckpt)
    sizes = {n: torch.Size(shape).numel() * 4 for n, (_, shape) in names.items()}
    assert all(dt == "F32" for dt, _ in names.values())
    blocks: dict[str, int] = {}
    pattern = re.compile(r"^(model\.language_model\.layers\.\d+|model\.visual\.blocks\.\d+)\.")
    for n in names:
        m = pattern.match(n)
        if m:
            blocks[m.group(1)] = blocks.get(m.group(1), 0) + sizes[n]
    weights = sum(sizes.values())
    window = (PREFETCH_DEPTH + 1) * max(blocks.values())  # the bound block and the prefetched ones
    bound = window + SLACK
    assert weights > 128 * MiB and bound < weights / 3  # the bound means something

    # A RAM tier smaller than the weights, with a disk tier: streaming, blocks promoted from disk.
    d = start_daemon(ram_bytes="64MiB", disk_bytes="512MiB")
    with Client(socket=d.socket) as c:
        r = ingest(c, ckpt, "wide", progress=False)
        assert r["put"] == r["tensors"] == len(names)
        assert c.stats()["tiers"][0]["capacity_bytes"] < weights
        proc = subprocess.run(
            [sys.executable, "-c", WORKER, str(d.socket), str(ckpt), str(NEW_TOKENS), str(PREFETCH_DEPTH)],
            capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONWARNINGS": "ignore"},
            timeout=120,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-4000:]
        res = json.loads(proc.stdout.strip().splitlines()[-1])
        assert c.stats()["leases"] == 0  # the worker's leases ended with it
    print(
        f"\nstreaming {weights / MiB:.1f} MiB of weights through a 64 MiB RAM tier: process USS growth "
        f"built {res['built'] / MiB:.1f} MiB, peak {res['peak'] / MiB:.1f} MiB, after generate "
        f"{res['after'] / MiB:.1f} MiB (bound {bound / MiB:.1f} MiB = window {window / MiB:.1f} + slack "
        f"{SLACK / MiB:.0f}); plain model in the process: {res['plain'] / MiB:.1f} MiB"
    )
    assert res["mode"] == "streaming"
    assert res["same_tokens"]
    assert res["sampled"] == 16 * NEW_TOKENS and res["in_arena"]  # every block forward used arena views
    assert res["built"] < bound
    assert res["peak"] < bound
    # The control: the same weights copied into the process are seen (most of them), so the bound
    # above is not met merely because USS misses them.
    assert res["plain"] > 0.8 * weights
