"""Offline eviction replay: each policy's byte miss ratio on a recorded trace at a capacity.

Used by ``bench/bench_eviction.py``. The model, kept simple on purpose: a demand cache of
``capacity`` bytes (no prefetching; hints are ignored), fed the trace's puts and gets in order
(:class:`~tierd.policy.shadow.Shadow`). A get of a key not resident is a miss of its bytes, and
brings it in. The byte miss ratio is missed bytes over requested bytes, over the gets of the
evaluation part only.

Train, then evaluate: every policy is fed the whole trace from its first reference, as a daemon's
policy is fed everything from start-up; the first ``train_fraction`` of the references warms every
cache and is the only data the learned policy is trained on (once; the model is installed when the
evaluation part starts, LRU order before it, and it is not retrained on what it is scored on), and
only the gets after it are counted. ``auto`` is no exception: its live orders and its shadow caches
observe the training part too (it chooses between lru and s3fifo there already, as a daemon that
has run that long would have), and its learned candidate gets the same model at the same point
(that shadow's score restarts then, as in the daemon). It chooses among its candidates by its
shadows as the daemon does (synchronously here, so a replay is deterministic).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from tierd.policy import auto, learned, make_policy
from tierd.policy.features import tag_code
from tierd.policy.shadow import Shadow
from tierd.predict.log import Access

POLICIES = ("lru", "s3fifo", "learned", "auto")


@dataclass
class EvictionResult:
    policy: str
    capacity: int
    gets: int
    requested_bytes: int
    missed_bytes: int
    byte_miss_ratio: float
    miss_ratio: float
    seconds: float
    detail: dict[str, Any]


class _Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def refs_of(trace: list[Access]) -> list[tuple[float, str, int, tuple[str, ...], int, str]]:
    """The puts and gets of a trace (hints dropped), with each key's size carried to later rows."""
    sizes: dict[str, int] = {}
    out = []
    for a in trace:
        if a.op not in ("put", "get"):
            continue
        n = a.nbytes or sizes.get(a.key, 0)
        sizes[a.key] = n
        out.append((a.t, a.key, n, a.tags, a.client, a.op))
    return out


def replay(
    trace: list[Access],
    capacity: int,
    policies: tuple[str, ...] = POLICIES,
    *,
    train_fraction: float = 0.5,
    seed: int = 0,
) -> list[EvictionResult]:
    refs = refs_of(trace)
    split = int(len(refs) * train_fraction)
    model = None
    if any(p in ("learned", "auto") for p in policies):
        train_refs = [(t, k, n, tag_code(tags), o, op) for t, k, n, tags, o, op in refs[:split]]
        model = learned.train(train_refs, capacity, seed=seed)
    out = []
    for name in policies:
        clock = _Clock()
        opts: dict[str, Any] = {"clock": clock, "train_every": 1 << 62, "seed": seed}
        if name == "auto":
            p = make_policy("auto", capacity=capacity, sync=True, options={"learned": opts})
        else:
            p = make_policy(name, capacity=capacity, **(opts if name == "learned" else {}))
        if isinstance(p, auto.Auto):  # its learned shadow reads the same clock
            for sh in p.shadows.values():
                if isinstance(sh.policy, learned.Learned):
                    sh.policy.clock = clock
        sh = Shadow(p, capacity, window=1 << 30)
        t0 = time.perf_counter()
        gets = misses = 0
        for i, (t, key, n, tags, owner, op) in enumerate(refs):
            if i == split:
                sh.gets = sh.requested = sh.missed = 0
                gets = misses = 0
                if model is not None:  # trained on what came before, used on what comes after
                    p.install(model)
            clock.t = t
            hit = sh.ref(key, n, list(tags), owner, op)
            if hit is not None:
                gets += 1
                misses += not hit
        ratio = sh.byte_miss_ratio()
        out.append(EvictionResult(
            policy=name, capacity=capacity, gets=gets, requested_bytes=sh.requested,
            missed_bytes=sh.missed, byte_miss_ratio=ratio if ratio is not None else 0.0,
            miss_ratio=misses / gets if gets else 0.0, seconds=time.perf_counter() - t0, detail=p.stats(),
        ))  # fmt: skip
    return out
