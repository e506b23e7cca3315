#!/usr/bin/env python3
"""Allocator simulation: tierd's best-fit allocator against a buddy allocator, on one replayed trace.

No daemon and no memory are involved: both allocators hand out offsets in an arena of the same size,
and the same trace of puts and deletes is replayed against each. The trace is what a vision-language
model's process does to the RAM tier:

1. weights: every tensor of a Qwen3-VL-2B-shaped model in bf16 (token embedding, per layer
   q/k/v/o, q/k norms, gate/up/down, RMSNorms; vision tower blocks, patch embedding, position
   embedding, mergers) is put once, in model order;
2. churn: KV-cache blocks of one fixed size are put and deleted at random, and vision features of
   random sizes (images of random resolution) are put with a Zipf-distributed lifetime, keeping
   the data held at ``--fill`` (90%) of the arena. The trace is made against an ideal allocator
   (no rounding, no holes), so "90% full" means the data alone would fill 90% of the arena.

A put that an allocator cannot place is counted as failed and the trace goes on (its later delete is
skipped). For each allocator the bench reports bytes lost to rounding (internal fragmentation),
external fragmentation 1 - largest_free/free over the churn (max, mean, final) and failed puts.

    python bench/bench_alloc.py                 # seed 1234, 200k churn steps
    python bench/bench_alloc.py --seed 7 --ops 200000 --json out.json
"""

from __future__ import annotations

import argparse
import bisect
import heapq
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from tierd.alloc import Allocator

MIB = 1 << 20
GIB = 1 << 30
BF16 = 2


# ---- the model -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelShape:
    """Qwen3-VL-2B-Instruct's published config (text + vision), enough to list its tensors."""

    vocab: int = 151936
    hidden: int = 2048
    intermediate: int = 6144
    layers: int = 28
    heads: int = 16
    kv_heads: int = 8
    head_dim: int = 128
    v_hidden: int = 1024
    v_intermediate: int = 4096
    v_depth: int = 24
    v_patch: int = 16
    v_temporal_patch: int = 2
    v_positions: int = 2304
    v_merge: int = 2  # spatial merge: 2x2 patches -> one LM token
    v_deepstack: int = 3  # extra merged feature levels handed to the LM


def model_tensors(m: ModelShape) -> list[tuple[str, int]]:
    """(name, bytes) of every stored weight in bf16, in checkpoint order (lm_head is tied)."""
    t: list[tuple[str, tuple[int, ...]]] = [("model.language_model.embed_tokens.weight", (m.vocab, m.hidden))]
    q, kv = m.heads * m.head_dim, m.kv_heads * m.head_dim
    for i in range(m.layers):
        p = f"model.language_model.layers.{i}."
        t += [
            (p + "self_attn.q_proj.weight", (q, m.hidden)),
            (p + "self_attn.k_proj.weight", (kv, m.hidden)),
            (p + "self_attn.v_proj.weight", (kv, m.hidden)),
            (p + "self_attn.o_proj.weight", (m.hidden, q)),
            (p + "self_attn.q_norm.weight", (m.head_dim,)),
            (p + "self_attn.k_norm.weight", (m.head_dim,)),
            (p + "mlp.gate_proj.weight", (m.intermediate, m.hidden)),
            (p + "mlp.up_proj.weight", (m.intermediate, m.hidden)),
            (p + "mlp.down_proj.weight", (m.hidden, m.intermediate)),
            (p + "input_layernorm.weight", (m.hidden,)),
            (p + "post_attention_layernorm.weight", (m.hidden,)),
        ]
    t.append(("model.language_model.norm.weight", (m.hidden,)))
    v = "model.visual."
    t += [
        (v + "patch_embed.proj.weight", (m.v_hidden, 3, m.v_temporal_patch, m.v_patch, m.v_patch)),
        (v + "patch_embed.proj.bias", (m.v_hidden,)),
        (v + "pos_embed.weight", (m.v_positions, m.v_hidden)),
    ]
    for i in range(m.v_depth):
        p = f"{v}blocks.{i}."
        t += [
            (p + "norm1.weight", (m.v_hidden,)), (p + "norm1.bias", (m.v_hidden,)),
            (p + "norm2.weight", (m.v_hidden,)), (p + "norm2.bias", (m.v_hidden,)),
            (p + "attn.qkv.weight", (3 * m.v_hidden, m.v_hidden)), (p + "attn.qkv.bias", (3 * m.v_hidden,)),
            (p + "attn.proj.weight", (m.v_hidden, m.v_hidden)), (p + "attn.proj.bias", (m.v_hidden,)),
            (p + "mlp.linear_fc1.weight", (m.v_intermediate, m.v_hidden)),
            (p + "mlp.linear_fc1.bias", (m.v_intermediate,)),
            (p + "mlp.linear_fc2.weight", (m.v_hidden, m.v_intermediate)),
            (p + "mlp.linear_fc2.bias", (m.v_hidden,)),
        ]  # fmt: skip
    merged = m.v_hidden * m.v_merge**2
    for name, norm in [("merger.", m.v_hidden)] + [
        (f"deepstack_merger_list.{i}.", merged) for i in range(m.v_deepstack)
    ]:
        p = v + name
        t += [
            (p + "norm.weight", (norm,)), (p + "norm.bias", (norm,)),
            (p + "linear_fc1.weight", (merged, merged)), (p + "linear_fc1.bias", (merged,)),
            (p + "linear_fc2.weight", (m.hidden, merged)), (p + "linear_fc2.bias", (m.hidden,)),
        ]  # fmt: skip
    return [(name, int(np.prod(shape)) * BF16) for name, shape in t]


def kv_block_bytes(m: ModelShape, tokens: int) -> int:
    """One layer's K and V for a block of ``tokens`` tokens, bf16."""
    return 2 * tokens * m.kv_heads * m.head_dim * BF16


def vision_feature_bytes(m: ModelShape, rng: np.random.Generator) -> int:
    """Features of one image of random resolution: main + deepstack levels, tokens x hidden, bf16."""
    unit = m.v_patch * m.v_merge  # 32 pixels per LM token side
    h = int(rng.integers(256 // unit, 1536 // unit + 1)) * unit
    w = int(rng.integers(256 // unit, 1536 // unit + 1)) * unit
    tokens = (h // unit) * (w // unit)
    return (1 + m.v_deepstack) * tokens * m.hidden * BF16


# ---- the trace -------------------------------------------------------------------------------------
PUT, DEL = 0, 1
KINDS = ("weight", "kv", "vision")


@dataclass
class Trace:
    ops: list[tuple[int, int, int, int]] = field(default_factory=list)  # (op, id, bytes, kind)
    weights_ops: int = 0
    weights_bytes: int = 0


def make_trace(
    capacity: int,
    churn_ops: int,
    fill: float,
    kv_bytes: int,
    vision_share: float,
    zipf_a: float,
    life_scale: int,
    life_cap: int,
    m: ModelShape,
    rng: np.random.Generator,
) -> Trace:
    """Weights, then ``churn_ops`` steps: expire due vision features; then put (a KV block, or a vision
    feature with probability ``vision_share``) while the data is below ``fill`` of the arena, else
    delete a random KV block. Sizes are requested bytes: the trace does not depend on an allocator."""
    tr = Trace()
    next_id = 0
    for _name, n in model_tensors(m):
        tr.ops.append((PUT, next_id, n, 0))
        next_id += 1
        tr.weights_bytes += n
    tr.weights_ops = len(tr.ops)
    live = tr.weights_bytes
    target = fill * capacity
    kv_live: list[int] = []  # ids, random deletion by swap-remove
    vision_due: list[tuple[int, int, int]] = []  # heap of (step due, id, bytes)
    size_of: dict[int, int] = {}
    for step in range(churn_ops):
        while vision_due and vision_due[0][0] <= step:
            _, vid, n = heapq.heappop(vision_due)
            tr.ops.append((DEL, vid, n, 2))
            live -= n
        if live < target:
            if rng.random() < vision_share:
                n = vision_feature_bytes(m, rng)
                life = int(min(rng.zipf(zipf_a), life_cap)) * life_scale
                heapq.heappush(vision_due, (step + life, next_id, n))
                tr.ops.append((PUT, next_id, n, 2))
            else:
                n = kv_bytes
                kv_live.append(next_id)
                size_of[next_id] = n
                tr.ops.append((PUT, next_id, n, 1))
            live += n
            next_id += 1
        elif kv_live:
            j = int(rng.integers(len(kv_live)))
            kv_live[j], kv_live[-1] = kv_live[-1], kv_live[j]
            kid = kv_live.pop()
            n = size_of.pop(kid)
            tr.ops.append((DEL, kid, n, 1))
            live -= n
    return tr


# ---- the allocators --------------------------------------------------------------------------------
class Alloc(Protocol):
    capacity: int

    def alloc(self, nbytes: int) -> int | None: ...
    def free(self, start: int) -> int: ...
    def size_for(self, nbytes: int) -> int: ...
    def largest_free(self) -> int: ...
    def used(self) -> int: ...


class BestFit:
    """tierd.alloc.Allocator behind the bench's small interface."""

    name = "tierd best-fit"

    def __init__(self, capacity: int) -> None:
        self.a = Allocator(capacity)
        self.capacity = self.a.capacity

    def alloc(self, nbytes: int) -> int | None:
        return self.a.alloc(nbytes)

    def free(self, start: int) -> int:
        return self.a.free(start)

    def size_for(self, nbytes: int) -> int:
        return self.a.size_for(nbytes)

    def largest_free(self) -> int:
        return self.a.largest_free()

    def used(self) -> int:
        return self.a.used_bytes

    def holes(self) -> int:
        return self.a.stats().free_holes

    def check(self) -> None:
        self.a.check()


class Buddy:
    """A binary buddy allocator over ``[0, capacity)``, for comparison only.

    Blocks are 64 B x 2^k, aligned to their size. An arena that is not a power of two is covered by
    aligned power-of-two top-level blocks (its binary decomposition); a block never merges beyond
    its top-level block. Free blocks of each order are kept in a set plus a min-heap (lazy
    deletion), so allocation takes the lowest-addressed free block of the smallest order that fits.
    """

    name = "buddy (power of two)"
    MIN = 64

    def __init__(self, capacity: int) -> None:
        units = capacity // self.MIN
        self.capacity = units * self.MIN
        self.max_order = units.bit_length()
        self.free_set: list[set[int]] = [set() for _ in range(self.max_order + 1)]
        self.free_heap: list[list[int]] = [[] for _ in range(self.max_order + 1)]
        self.top_starts: list[int] = []
        self.top_orders: list[int] = []
        off = 0
        for order in range(self.max_order, -1, -1):
            if units & (1 << order):
                self.top_starts.append(off)
                self.top_orders.append(order)
                self._push(order, off)
                off += 1 << order
        self.used_units: dict[int, int] = {}  # start unit -> order
        self._used = 0

    @staticmethod
    def order_for(nbytes: int) -> int:
        units = max(1, -(-nbytes // Buddy.MIN))
        return (units - 1).bit_length()

    def size_for(self, nbytes: int) -> int:
        return self.MIN << self.order_for(nbytes)

    def _push(self, order: int, start: int) -> None:
        self.free_set[order].add(start)
        heapq.heappush(self.free_heap[order], start)

    def _pop(self, order: int) -> int | None:
        s, h = self.free_set[order], self.free_heap[order]
        while h:
            start = heapq.heappop(h)
            if start in s:
                s.remove(start)
                return start
        return None

    def _top_order(self, start: int) -> int:
        return self.top_orders[bisect.bisect_right(self.top_starts, start) - 1]

    def alloc(self, nbytes: int) -> int | None:
        order = self.order_for(nbytes)
        k = order
        while k <= self.max_order and not self.free_set[k]:
            k += 1
        if k > self.max_order:
            return None
        start = self._pop(k)
        assert start is not None
        while k > order:  # split, keeping the lower half
            k -= 1
            self._push(k, start + (1 << k))
        self.used_units[start] = order
        self._used += self.MIN << order
        return start * self.MIN

    def free(self, start: int) -> int:
        unit = start // self.MIN
        order = self.used_units.pop(unit)
        freed = self.MIN << order
        self._used -= freed
        top = self._top_order(unit)
        while order < top:
            buddy = unit ^ (1 << order)
            if buddy not in self.free_set[order]:
                break
            self.free_set[order].remove(buddy)  # its heap entry goes lazily
            unit = min(unit, buddy)
            order += 1
        self._push(order, unit)
        return freed

    def largest_free(self) -> int:
        for k in range(self.max_order, -1, -1):
            if self.free_set[k]:
                return self.MIN << k
        return 0

    def used(self) -> int:
        return self._used

    def holes(self) -> int:
        return sum(len(s) for s in self.free_set)

    def check(self) -> None:
        spans = sorted(
            [(u, 1 << o, "used") for u, o in self.used_units.items()]
            + [(u, 1 << o, "free") for o, s in enumerate(self.free_set) for u in s]
        )
        pos = 0
        for u, n, _ in spans:
            assert u == pos, f"gap or overlap at unit {pos}"
            assert u % n == 0, "misaligned block"
            pos = u + n
        assert pos * self.MIN == self.capacity


# ---- replay ----------------------------------------------------------------------------------------
def replay(a: Any, tr: Trace, samples: int) -> dict[str, Any]:
    where: dict[int, tuple[int, int, int]] = {}  # id -> (offset, requested bytes, kind)
    live_req = 0
    waste = 0  # sum over live regions of (region size - requested)
    fails = {k: 0 for k in KINDS}
    fails_fragmented = 0  # enough free bytes in total, but no hole large enough
    puts = {k: 0 for k in KINDS}
    frag: list[float] = []
    waste_max = 0
    every = max(1, (len(tr.ops) - tr.weights_ops) // samples)
    series: list[dict[str, float]] = []
    after_weights: dict[str, Any] = {}
    t0 = time.perf_counter()
    cap = a.capacity
    for i, (op, oid, n, kind) in enumerate(tr.ops):
        if op == PUT:
            puts[KINDS[kind]] += 1
            off = a.alloc(n)
            if off is None:
                fails[KINDS[kind]] += 1
                if cap - a.used() >= a.size_for(n):
                    fails_fragmented += 1
            else:
                where[oid] = (off, n, kind)
                live_req += n
                waste += a.size_for(n) - n
                waste_max = max(waste_max, waste)
        else:
            got = where.pop(oid, None)
            if got is not None:  # None: its put had failed
                a.free(got[0])
                live_req -= got[1]
                waste -= a.size_for(got[1]) - got[1]
        if i + 1 == tr.weights_ops:
            after_weights = {
                "placed": tr.weights_ops - fails["weight"],
                "failed": fails["weight"],
                "waste_bytes": waste,
                "waste_pct_of_requested": 100 * waste / max(1, live_req),
                "used_pct": 100 * a.used() / cap,
            }
        elif i >= tr.weights_ops:
            free = cap - a.used()
            f = 1.0 - a.largest_free() / free if free else 0.0
            frag.append(f)
            if (i - tr.weights_ops) % every == 0:
                series.append(
                    {
                        "op": i - tr.weights_ops,
                        "ext_frag": round(f, 4),
                        "used_pct": round(100 * a.used() / cap, 2),
                        "live_pct": round(100 * live_req / cap, 2),
                    }
                )
    elapsed = time.perf_counter() - t0
    a.check()
    churn_puts = puts["kv"] + puts["vision"]
    churn_fails = fails["kv"] + fails["vision"]
    free = cap - a.used()
    return {
        "allocator": a.name,
        "capacity_bytes": cap,
        "weights": after_weights,
        "churn_puts": churn_puts,
        "failed_puts": dict(fails),
        "failed_churn_puts": churn_fails,
        "failed_churn_pct": 100 * churn_fails / max(1, churn_puts),
        "failed_fragmented": fails_fragmented,
        "internal_waste_final_bytes": waste,
        "internal_waste_final_pct": 100 * waste / max(1, live_req),
        "internal_waste_max_bytes": waste_max,
        "ext_frag_max": max(frag) if frag else 0.0,
        "ext_frag_mean": float(np.mean(frag)) if frag else 0.0,
        "ext_frag_final": frag[-1] if frag else 0.0,
        "live_requested_final_pct": 100 * live_req / cap,
        "live_final_by_kind_bytes": {
            k: sum(n for _, n, kd in where.values() if KINDS[kd] == k) for k in KINDS
        },
        "used_final_pct": 100 * a.used() / cap,
        "free_final_bytes": free,
        "largest_free_final_bytes": a.largest_free(),
        "holes_final": a.holes(),
        "replay_s": elapsed,
        "series": series,
    }


# ---- report ----------------------------------------------------------------------------------------
def mib(n: float) -> str:
    return f"{n:,.0f} B" if abs(n) < MIB else f"{n / MIB:,.1f} MiB"


def report(r: dict[str, Any]) -> str:
    p = r["params"]
    res = r["results"]
    names = [x["allocator"] for x in res]
    rows: list[tuple[str, list[str]]] = [
        (f"weights placed (of {p['weight_tensors']})", [f"{x['weights']['placed']}" for x in res]),
        (
            "weights: rounding waste",
            [
                f"{mib(x['weights']['waste_bytes'])} ({x['weights']['waste_pct_of_requested']:.2f}%)"
                for x in res
            ],
        ),
        ("arena used after weights", [f"{x['weights']['used_pct']:.1f}%" for x in res]),
        ("churn puts (kv + vision)", [f"{x['churn_puts']}" for x in res]),
        (
            "failed puts: kv / vision",
            [f"{x['failed_puts']['kv']} / {x['failed_puts']['vision']}" for x in res],
        ),
        ("failed churn puts", [f"{x['failed_churn_puts']} ({x['failed_churn_pct']:.2f}%)" for x in res]),
        ("  of which free bytes sufficed", [f"{x['failed_fragmented']}" for x in res]),
        (
            "internal frag (rounding), final",
            [
                f"{mib(x['internal_waste_final_bytes'])} ({x['internal_waste_final_pct']:.2f}% of data)"
                for x in res
            ],
        ),
        ("internal frag, max", [mib(x["internal_waste_max_bytes"]) for x in res]),
        ("external frag 1-largest/free, max", [f"{x['ext_frag_max']:.3f}" for x in res]),
        ("external frag, mean over churn", [f"{x['ext_frag_mean']:.3f}" for x in res]),
        ("external frag, final", [f"{x['ext_frag_final']:.3f}" for x in res]),
        ("data held at the end (of arena)", [f"{x['live_requested_final_pct']:.1f}%" for x in res]),
        (
            "  of it kv / vision",
            [
                f"{mib(x['live_final_by_kind_bytes']['kv'])} / {mib(x['live_final_by_kind_bytes']['vision'])}"
                for x in res
            ],
        ),
        ("arena allocated at the end", [f"{x['used_final_pct']:.1f}%" for x in res]),
        ("largest free hole at the end", [mib(x["largest_free_final_bytes"]) for x in res]),
        ("free holes at the end", [f"{x['holes_final']}" for x in res]),
        ("replay time", [f"{x['replay_s']:.2f} s" for x in res]),
    ]
    w0 = max(len(k) for k, _ in rows)
    ws = [max(len(n), *(len(v[i]) for _, v in rows)) for i, n in enumerate(names)]
    out = [
        "tierd allocator simulation",
        f"seed {p['seed']} (set with --seed), arena {mib(p['capacity_bytes'])} "
        f"({p['capacity_bytes'] / GIB:.3f} GiB), fill target {p['fill'] * 100:.0f}% of the arena",
        f"model: Qwen3-VL-2B-shaped, {p['weight_tensors']} weight tensors, {mib(p['weights_bytes'])} bf16 "
        f"({100 * p['weights_bytes'] / p['capacity_bytes']:.1f}% of the arena)",
        f"churn: {p['churn_ops']} steps -> {p['trace_ops'] - p['weight_tensors']} ops; KV blocks of "
        f"{mib(p['kv_bytes'])} ({p['kv_tokens']} tokens, one layer's K+V); vision features "
        f"{100 * p['vision_share']:.0f}% of puts, 1-36 MiB (random resolution, main + deepstack), lifetime "
        f"min(Zipf(a={p['zipf_a']}), {p['life_cap']}) x {p['life_scale']} steps",
        "",
        "".ljust(w0) + "  " + "  ".join(n.rjust(w) for n, w in zip(names, ws, strict=True)),
    ]
    for k, v in rows:
        out.append(k.ljust(w0) + "  " + "  ".join(x.rjust(w) for x, w in zip(v, ws, strict=True)))
    out.append("")
    out.append("external fragmentation over the churn (sampled):")
    s0 = res[0]["series"]
    step = max(1, len(s0) // 10)
    cw = max(24, *(len(n) + 2 for n in names))
    hdr = "  op".ljust(10) + "".join(n.rjust(cw) for n in names)
    out.append(hdr)
    for j in range(0, len(s0), step):
        line = f"  {s0[j]['op']:<8}"
        for x in res:
            s = x["series"][j] if j < len(x["series"]) else None
            cell = f"{s['ext_frag']:.3f} @ {s['used_pct']:.1f}%" if s else "-"
            line += cell.rjust(cw)
        out.append(line)
    out.append("  (value @ share of the arena allocated)")
    return "\n".join(out)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Replay a VLM-like put/delete trace against tierd's best-fit "
        "allocator and a buddy allocator of the same arena size."
    )
    p.add_argument("--seed", type=int, default=1234, help="random seed of the trace (default 1234)")
    p.add_argument("--ops", type=int, default=200_000, help="churn steps after the weights (default 200000)")
    p.add_argument("--quick", action="store_true", help="30000 churn steps")
    p.add_argument(
        "--arena-mib",
        type=int,
        default=0,
        help="arena size in MiB (default: the weights take --weights-share of it)",
    )
    p.add_argument(
        "--weights-share",
        type=float,
        default=0.6,
        help="share of the arena the weights take when --arena-mib is not given (default 0.6)",
    )
    p.add_argument("--fill", type=float, default=0.9, help="data held during the churn, share of the arena")
    p.add_argument("--kv-tokens", type=int, default=256, help="tokens per KV block (default 256 -> 1 MiB)")
    p.add_argument(
        "--vision-share",
        type=float,
        default=0.1,
        help="share of churn puts that are vision features (default 0.1)",
    )
    p.add_argument("--zipf-a", type=float, default=1.5, help="Zipf exponent of vision feature lifetimes")
    p.add_argument("--life-scale", type=int, default=20, help="steps per unit of Zipf lifetime (default 20)")
    p.add_argument("--life-cap", type=int, default=1000, help="longest lifetime in Zipf units (default 1000)")
    p.add_argument("--samples", type=int, default=200, help="fragmentation samples kept in the series")
    p.add_argument("--json", metavar="OUT", help="also write the results as JSON to OUT")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    ops = 30_000 if args.quick else args.ops
    m = ModelShape()
    weights_bytes = sum(n for _, n in model_tensors(m))
    if args.arena_mib:
        capacity = args.arena_mib * MIB
    else:
        capacity = -(-int(weights_bytes / args.weights_share) // MIB) * MIB
    kv_bytes = kv_block_bytes(m, args.kv_tokens)
    rng = np.random.default_rng(args.seed)
    t0 = time.perf_counter()
    tr = make_trace(
        capacity,
        ops,
        args.fill,
        kv_bytes,
        args.vision_share,
        args.zipf_a,
        args.life_scale,
        args.life_cap,
        m,
        rng,
    )
    trace_s = time.perf_counter() - t0
    results = [replay(cls(capacity), tr, args.samples) for cls in (BestFit, Buddy)]
    r = {
        "params": {
            "seed": args.seed, "capacity_bytes": capacity, "fill": args.fill, "churn_ops": ops,
            "trace_ops": len(tr.ops), "weight_tensors": tr.weights_ops, "weights_bytes": tr.weights_bytes,
            "kv_tokens": args.kv_tokens, "kv_bytes": kv_bytes, "vision_share": args.vision_share,
            "zipf_a": args.zipf_a, "life_scale": args.life_scale, "life_cap": args.life_cap,
            "trace_s": trace_s,
        },
        "results": results,
    }  # fmt: skip
    print(report(r))
    if args.json:
        Path(args.json).write_text(json.dumps(r, indent=2) + "\n")
        print(f"\nJSON written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
