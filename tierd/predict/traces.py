"""Synthetic access traces (seeded) for the tests and ``bench/bench_predict.py``.

Each generator returns a ``Scenario``: the trace plus a RAM size of about the working set / 1.5
(``ram_ratio``) and a prefetch budget, so that plain LRU cannot simply hold everything.

Time model: a model process reads an entry, then computes on it for ``nbytes / compute_gbps``
(jittered); that gap is what a prefetch can hide a disk read behind. The defaults (compute at
~1 GB/s of weights, disk at 1.5 GB/s in the replay) are a small machine decoding a model that does
not fit in RAM.

- ``cyclic``: one model's decode: embed, L layers x W weights, lm_head, repeated every token.
- ``interleaved``: one serving process running two models at different rates (a fast small one
  decoding continuously, a big one answering requests that arrive at random), so their reads
  interleave in one client's stream. ``same_client=False`` gives each model its own client.
- ``vision``: a vision-feature cache: requests name 1-3 images drawn with Zipf popularity; an
  image seen for the first time is encoded and its tile features put; a later request gets them
  back tile by tile during a chunked prefill, then decodes for a while.
- ``random``: uniformly random keys of random sizes (nothing to predict).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tierd.predict.log import Access

MIB = 1 << 20
SCENARIO_NAMES = ("cyclic", "interleaved", "vision", "random")
EXTRA_SCENARIOS = ("interleaved-2clients", "vision-hashed", "cyclic-hinted")
"""Variants: the two models as two clients; image features keyed by content hash."""


@dataclass
class Scenario:
    name: str
    description: str
    trace: list[Access]
    ram_bytes: int
    prefetch_budget_bytes: int
    working_set_bytes: int


def _scenario(
    name: str, description: str, trace: list[Access], ram_ratio: float, budget_entries: int = 4
) -> Scenario:
    sizes: dict[str, int] = {}
    for a in trace:
        if a.op == "get":  # the working set is what is read back (a feature put once and never read
            sizes[a.key] = a.nbytes  # again is not part of it)
    ws = sum(sizes.values())
    biggest = max(sizes.values(), default=0)
    ram = int(ws / ram_ratio)
    budget = max(budget_entries * biggest, ram // 20)
    return Scenario(name, description, trace, ram, budget, ws)


def _weights(
    rng: np.random.Generator, ns: str, layers: int, per_layer: int, lo_mib: int, hi_mib: int
) -> list[tuple[str, int, tuple[str, ...]]]:
    """(key, nbytes, tags) in decode order: embed, layers x weights (same shapes in every layer), head."""
    names = ["attn_qkv", "attn_o", "mlp_gate", "mlp_up", "mlp_down", "norm", "w6", "w7"][:per_layer]
    shapes = [int(rng.integers(lo_mib, hi_mib + 1)) * MIB for _ in names]
    out: list[tuple[str, int, tuple[str, ...]]] = [(f"{ns}/embed_tokens", hi_mib * MIB, ("weight", ns))]
    for i in range(layers):
        for name, n in zip(names, shapes, strict=True):
            out.append((f"{ns}/layers.{i}.{name}", n, ("weight", ns)))
    out.append((f"{ns}/lm_head", hi_mib * MIB, ("weight", ns)))
    return out


def _decode_times(
    rng: np.random.Generator,
    weights: list[tuple[str, int, tuple[str, ...]]],
    *,
    t0: float,
    until: float | None,
    steps: int | None,
    compute_gbps: float,
    step_gap_s: float,
    tokens_per_request: int | None = None,
    request_gap_s: float = 0.0,
) -> list[tuple[float, str, int, tuple[str, ...]]]:
    """Reads of one decoding model: every step reads all weights in order, computing between reads."""
    out: list[tuple[float, str, int, tuple[str, ...]]] = []
    t = t0
    step = 0
    while (steps is None or step < steps) and (until is None or t < until):
        for key, n, tags in weights:
            out.append((t, key, n, tags))
            t += n / (compute_gbps * 1e9) * float(rng.uniform(0.85, 1.15))
        t += step_gap_s * float(rng.uniform(0.5, 1.5))
        step += 1
        if tokens_per_request and step % tokens_per_request == 0:
            t += float(rng.exponential(request_gap_s))
    return out


def _to_trace(events: list[tuple[float, int, str, str, int, tuple[str, ...]]]) -> list[Access]:
    events.sort(key=lambda e: e[0])
    return [Access(t, c, key, op, "-", n, tags) for t, c, key, op, n, tags in events]


def cyclic(
    seed: int = 0,
    *,
    layers: int = 24,
    weights_per_layer: int = 4,
    steps: int = 40,
    ram_ratio: float = 1.5,
    compute_gbps: float = 1.0,
    lo_mib: int = 8,
    hi_mib: int = 64,
) -> Scenario:
    rng = np.random.default_rng(seed)
    w = _weights(rng, "llm", layers, weights_per_layer, lo_mib, hi_mib)
    reads = _decode_times(
        rng, w, t0=0.0, until=None, steps=steps, compute_gbps=compute_gbps, step_gap_s=0.002
    )
    trace = _to_trace([(t, 1, key, "get", n, tags) for t, key, n, tags in reads])
    desc = f"one model decoding: {len(w)} weights ({layers} layers x {weights_per_layer}) x {steps} tokens"
    return _scenario("cyclic", desc, trace, ram_ratio)


def interleaved(
    seed: int = 0,
    *,
    same_client: bool = True,
    fast_layers: int = 12,
    slow_layers: int = 20,
    weights_per_layer: int = 4,
    fast_steps: int = 60,
    ram_ratio: float = 1.5,
    compute_gbps: float = 1.0,
    slow_compute_gbps: float = 0.6,
) -> Scenario:
    rng = np.random.default_rng(seed)
    wa = _weights(rng, "small", fast_layers, weights_per_layer, 4, 24)
    wb = _weights(rng, "big", slow_layers, weights_per_layer, 16, 64)
    ra = _decode_times(
        rng, wa, t0=0.0, until=None, steps=fast_steps, compute_gbps=compute_gbps, step_gap_s=0.002
    )
    end = ra[-1][0]
    rb = _decode_times(
        rng, wb, t0=float(rng.uniform(0, 0.5)), until=end, steps=None, compute_gbps=slow_compute_gbps,
        step_gap_s=0.004, tokens_per_request=8, request_gap_s=0.5,
    )  # fmt: skip
    cb = 1 if same_client else 2
    events = [(t, 1, key, "get", n, tags) for t, key, n, tags in ra]
    events += [(t, cb, key, "get", n, tags) for t, key, n, tags in rb]
    trace = _to_trace(events)
    where = "one client" if same_client else "two clients"
    desc = (
        f"two models in {where}: {len(wa)} weights decoding at {compute_gbps} GB/s, "
        f"{len(wb)} weights at {slow_compute_gbps} GB/s in random bursts of 8 tokens"
    )
    return _scenario("interleaved", desc, trace, ram_ratio)


def vision(
    seed: int = 0,
    *,
    images: int = 2000,
    zipf_s: float = 0.9,
    requests: int = 3000,
    max_tiles: int = 6,
    ram_ratio: float = 1.5,
    key_style: str = "numbered",
) -> Scenario:
    """``key_style``: "numbered" (vis/img00042/tile3) or "hashed" (vis/<12 hex digits>/tile3, a
    content hash as a real cache would use)."""
    if key_style not in ("numbered", "hashed"):
        raise ValueError(f"key_style must be numbered or hashed, got {key_style!r}")
    rng = np.random.default_rng(seed)
    ranks = np.arange(1, images + 1, dtype=np.float64)
    pop = ranks**-zipf_s
    pop /= pop.sum()
    order = rng.permutation(images)  # popularity rank -> image id, so ids say nothing
    tiles = rng.integers(1, max_tiles + 1, size=images)
    tile_bytes = [[int(rng.integers(1, 5)) * MIB for _ in range(int(tiles[i]))] for i in range(images)]
    names = [
        f"img{i:05d}" if key_style == "numbered" else format(int(rng.integers(1 << 47, 1 << 48)), "012x")
        for i in range(images)
    ]
    encoded: set[int] = set()
    events: list[tuple[float, int, str, str, int, tuple[str, ...]]] = []
    t = 0.0
    for _ in range(requests):
        n_img = int(rng.integers(1, 4))
        picks = rng.choice(images, size=n_img, replace=False, p=pop)
        for rank in picks:
            img = int(order[int(rank)])
            op = "get" if img in encoded else "put"
            encoded.add(img)
            for j, n in enumerate(tile_bytes[img]):
                events.append((t, 1, f"vis/{names[img]}/tile{j}", op, n, ("vision",)))
                # put: the encoder's time per tile; get: a chunk of prefill over the tile's tokens
                t += float(rng.uniform(0.04, 0.12)) if op == "put" else float(rng.uniform(0.02, 0.08))
        t += float(rng.uniform(0.3, 2.0))  # decoding the answer
    trace = _to_trace(events)
    desc = (
        f"vision features: {requests} requests of 1-3 of {images} images (Zipf s={zipf_s}), "
        f"1-{max_tiles} tiles of 1-4 MiB each; put when first encoded, got back later"
    )
    return _scenario("vision", desc, trace, ram_ratio)


def uniform_random(
    seed: int = 0, *, keys: int = 300, gets: int = 4000, ram_ratio: float = 1.5, compute_gbps: float = 1.0
) -> Scenario:
    rng = np.random.default_rng(seed)
    sizes = [int(rng.integers(1, 65)) * MIB for _ in range(keys)]
    events: list[tuple[float, int, str, str, int, tuple[str, ...]]] = []
    t = 0.0
    for k in rng.integers(0, keys, size=gets):
        n = sizes[int(k)]
        events.append((t, 1, f"rand/k{int(k)}", "get", n, ()))
        t += n / (compute_gbps * 1e9) * float(rng.uniform(0.85, 1.15))
    desc = f"uniform random gets of {keys} keys of 1-64 MiB"
    return _scenario("random", desc, _to_trace(events), ram_ratio)


def with_hints(s: Scenario, ahead: int = 4) -> Scenario:
    """``s`` with the model's own hints, as a streaming model sends them: before each get, a hint
    for the key its client gets ``ahead`` gets later (so the next ``ahead`` are always hinted).
    The predictors should find nothing to add."""
    gets: dict[int, list[int]] = {}
    for i, a in enumerate(s.trace):
        if a.op == "get":
            gets.setdefault(a.client, []).append(i)
    later: dict[int, Access] = {}
    for idx in gets.values():
        for j, i in enumerate(idx[:-ahead] if ahead else []):
            later[i] = s.trace[idx[j + ahead]]
    trace: list[Access] = []
    for i, a in enumerate(s.trace):
        nxt = later.get(i)
        if nxt is not None:
            trace.append(Access(a.t, a.client, nxt.key, "hint", "-", nxt.nbytes, nxt.tags))
        trace.append(a)
    return Scenario(f"{s.name}-hinted", f"{s.description}, each get hinted {ahead} gets ahead", trace,
                    s.ram_bytes, s.prefetch_budget_bytes, s.working_set_bytes)  # fmt: skip


def recorded(path: str | Path, name: str | None = None, ram_ratio: float = 1.5) -> Scenario:
    """A trace file written by ``tierctl trace record`` (or bench/record_qwen3vl_trace.py), with the
    RAM of the other scenarios: its working set / ``ram_ratio``."""
    from tierd.predict.log import read_trace

    trace = read_trace(path)
    if not any(a.op == "get" for a in trace):
        raise ValueError(f"{path}: the trace has no reads to replay")
    return _scenario(name or Path(path).name, f"recorded: {path}", trace, ram_ratio)


def make_scenario(name: str, seed: int = 0, **opts: Any) -> Scenario:
    """A scenario by name (SCENARIO_NAMES or EXTRA_SCENARIOS); opts go to its generator."""
    if name == "interleaved-2clients":
        s = interleaved(seed, same_client=False, **opts)
    elif name == "vision-hashed":
        s = vision(seed, key_style="hashed", **opts)
    elif name == "cyclic-hinted":
        s = with_hints(cyclic(seed, **opts))
    else:
        gens: dict[str, Callable[..., Scenario]] = {
            "cyclic": cyclic, "interleaved": interleaved, "vision": vision, "random": uniform_random
        }  # fmt: skip
        if name not in gens:
            known = ", ".join(SCENARIO_NAMES + EXTRA_SCENARIOS)
            raise ValueError(f"unknown scenario {name!r} (known: {known})")
        return gens[name](seed, **opts)
    s.name = name
    return s
