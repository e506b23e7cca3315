"""Offline replay of a trace through an LRU RAM cache with a predictor prefetching into it.

Used by ``tierctl trace replay FILE --predictor NAME`` and by ``bench/bench_predict.py``.

The model, kept simple on purpose:
- RAM holds ``ram_bytes`` of entries (sizes from ``Access.nbytes``), least recently used out
  first. A put makes its entry resident; a get of a resident entry is a hit.
- The disk is one FIFO queue at ``disk_gbps``: a demand miss waits for the reads queued before it
  (prefetches included) and then for its own read; that wait is stall, and it delays the client's
  later accesses (each client keeps the compute gaps of the trace between its accesses).
- After each get, the predictor's first ``depth`` keys with confidence >= ``min_confidence`` are
  prefetched if not resident, queued on the disk at the time of the get, as long as the
  speculative bytes (prefetched, not read yet) stay within ``prefetch_budget_bytes``. Room for a
  prefetch is made by evicting least recently used entries that are not themselves speculative;
  a prefetch never evicts one (it is skipped instead). A demand miss may evict them.
- A prefetched entry that is read before its read finished is not a hit: the get waits for the
  rest of the read (a partial stall, ``prefetch_late``). Prefetched bytes evicted before use, or
  still unused at the end of the trace, are ``wasted_bytes``.
- Every ``train_every`` accesses, a predictor that ``wants_training()`` is trained on the last
  ``train_window`` accesses and the model installed at once (the daemon trains in a worker
  thread, so there its model arrives a little later).

Hints in a trace are prefetched like a prediction with confidence 1 (for every predictor, "none"
included: they are the client's own request).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from typing import Any

from tierd.predict.base import DEFAULT_MIN_CONFIDENCE, Predictor, make_predictor
from tierd.predict.log import Access

__all__ = ["DEFAULT_MIN_CONFIDENCE", "ReplayResult", "format_result", "replay"]
MIB = 1 << 20


@dataclass
class ReplayResult:
    predictor: str
    accesses: int = 0
    """Gets replayed (puts and hints are not counted here)."""
    hits: int = 0
    """Gets served from RAM with no wait."""
    hit_rate: float = 0.0
    demand_misses: int = 0
    prefetch_issued: int = 0
    prefetch_used: int = 0
    """Prefetched entries read before being evicted (late ones included)."""
    prefetch_late: int = 0
    """Of those, read before their disk read had finished (a partial stall, not a hit)."""
    prefetch_skipped: int = 0
    """Predictions above the threshold not issued: over budget, or no room without evicting
    another speculative entry."""
    wasted_bytes: int = 0
    issued_bytes: int = 0
    disk_read_bytes: int = 0
    stall_s: float = 0.0
    makespan_s: float = 0.0
    """Time of the last access in the replay (trace time plus the client's accumulated stall)."""
    trained: int = 0
    train_s: float = 0.0
    predict_calls: int = 0
    predict_us_mean: float = 0.0
    """Wall time of observe() + predict() per get (the predictor's cost on the daemon's loop)."""
    predict_us_max: float = 0.0
    predictor_errors: int = 0
    predictor_stats: dict[str, Any] = field(default_factory=dict)
    lru_only: dict[str, Any] | None = None
    """The same trace with no predictor (LRU only), when asked for: its to_dict()."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class _Entry:
    __slots__ = ("nbytes", "ready", "spec")

    def __init__(self, nbytes: int, ready: float, spec: bool) -> None:
        self.nbytes = nbytes
        self.ready = ready
        self.spec = spec


class _Cache:
    def __init__(self, ram_bytes: int, r: ReplayResult) -> None:
        self.cap = ram_bytes
        self.used = 0
        self.spec_bytes = 0
        self.lru: OrderedDict[str, _Entry] = OrderedDict()
        self.r = r

    def _drop(self, key: str) -> None:
        e = self.lru.pop(key)
        self.used -= e.nbytes
        if e.spec:
            self.spec_bytes -= e.nbytes
            self.r.wasted_bytes += e.nbytes

    def insert(self, key: str, e: _Entry) -> bool:
        """For a demand read or a put: evicts anything, speculative entries included."""
        if key in self.lru:
            self._drop(key)
        if e.nbytes > self.cap:
            return False
        while self.used + e.nbytes > self.cap:
            self._drop(next(iter(self.lru)))
        self.lru[key] = e
        self.used += e.nbytes
        if e.spec:
            self.spec_bytes += e.nbytes
        return True

    def room_without_spec(self, nbytes: int) -> bool:
        """Evict non-speculative LRU entries until nbytes fit; False (nothing evicted) if they can't."""
        need = self.used + nbytes - self.cap
        if need <= 0:
            return True
        victims: list[str] = []
        freed = 0
        for k, e in self.lru.items():
            if e.spec:
                continue
            victims.append(k)
            freed += e.nbytes
            if freed >= need:
                break
        if freed < need:
            return False
        for k in victims:
            self._drop(k)
        return True


def replay(
    trace: list[Access],
    predictor: str | Predictor,
    *,
    ram_bytes: int,
    prefetch_budget_bytes: int,
    depth: int = 2,
    disk_gbps: float = 1.5,
    train_every: int = 2000,
    train_window: int = 30000,
    min_confidence: float = DEFAULT_MIN_CONFIDENCE,
    lru_only: bool = False,
) -> ReplayResult:
    """Replay ``trace`` (oldest first) with ``predictor`` (a name or an instance, fresh: it learns as
    it goes). With ``lru_only=True`` the result also carries the same replay with no predictor."""
    p = make_predictor(predictor) if isinstance(predictor, str) else predictor
    r = ReplayResult(predictor=p.name)
    cache = _Cache(ram_bytes, r)
    rate = disk_gbps * 1e9
    disk_free = 0.0
    skew: dict[int, float] = {}
    sizes: dict[str, int] = {}
    pred_total = 0.0
    history_start = 0
    live = p.name != "none"

    def disk_read(now: float, nbytes: int) -> float:
        nonlocal disk_free
        start = now if now > disk_free else disk_free
        disk_free = start + nbytes / rate
        r.disk_read_bytes += nbytes
        return disk_free

    def prefetch(now: float, key: str) -> None:
        if key in cache.lru:
            return
        n = sizes.get(key)
        if n is None or n > cache.cap:
            return
        if cache.spec_bytes + n > prefetch_budget_bytes or not cache.room_without_spec(n):
            r.prefetch_skipped += 1
            return
        cache.insert(key, _Entry(n, disk_read(now, n), True))
        r.prefetch_issued += 1
        r.issued_bytes += n

    for i, a0 in enumerate(trace):
        if train_every > 0 and live and i and i % train_every == 0:
            try:
                if p.wants_training():
                    t0 = time.perf_counter()
                    model = p.train(trace[max(history_start, i - train_window) : i])
                    p.install(model)
                    r.trained += 1
                    r.train_s += time.perf_counter() - t0
            except Exception:  # noqa: BLE001 - a predictor's failure is counted, not fatal
                r.predictor_errors += 1
        now = a0.t + skew.get(a0.client, 0.0)
        if now > r.makespan_s:
            r.makespan_s = now
        if a0.nbytes or a0.op == "put":
            sizes[a0.key] = a0.nbytes
        if a0.op == "put":
            cache.insert(a0.key, _Entry(a0.nbytes, now, False))
            _observe(p, a0, r)
            continue
        if a0.op == "hint":
            _observe(p, a0, r)
            prefetch(now, a0.key)
            continue
        if a0.op != "get":
            continue
        r.accesses += 1
        n = sizes.get(a0.key, a0.nbytes)
        e = cache.lru.get(a0.key)
        stall = 0.0
        if e is not None:
            if e.ready <= now:
                r.hits += 1
                tier = "ram"
            else:
                stall = e.ready - now  # its read is still under way
                r.prefetch_late += e.spec
                tier = "disk"
            if e.spec:
                e.spec = False
                cache.spec_bytes -= e.nbytes
                r.prefetch_used += 1
            cache.lru.move_to_end(a0.key)
        else:
            r.demand_misses += 1
            done = disk_read(now, n)
            stall = done - now
            cache.insert(a0.key, _Entry(n, done, False))
            tier = "disk"
        if stall:
            r.stall_s += stall
            skew[a0.client] = skew.get(a0.client, 0.0) + stall
        if not live:
            continue
        a = Access(a0.t, a0.client, a0.key, "get", tier, n, a0.tags)
        t0 = time.perf_counter()
        _observe(p, a, r)
        if depth <= 0:
            continue
        try:
            preds = p.predict(a, depth)
        except Exception:  # noqa: BLE001
            r.predictor_errors += 1
            continue
        dt = time.perf_counter() - t0
        pred_total += dt
        r.predict_calls += 1
        r.predict_us_max = max(r.predict_us_max, dt * 1e6)
        for key, conf in preds[:depth]:
            if conf >= min_confidence and key != a.key:
                prefetch(now, key)

    for e in cache.lru.values():
        if e.spec:
            r.wasted_bytes += e.nbytes
    r.hit_rate = r.hits / r.accesses if r.accesses else 0.0
    r.predict_us_mean = pred_total / r.predict_calls * 1e6 if r.predict_calls else 0.0
    try:
        r.predictor_stats = p.stats()
    except Exception:  # noqa: BLE001
        r.predictor_errors += 1
    if lru_only:
        base = replay(
            trace, "none", ram_bytes=ram_bytes, prefetch_budget_bytes=prefetch_budget_bytes,
            depth=depth, disk_gbps=disk_gbps, min_confidence=min_confidence,
        )  # fmt: skip
        r.lru_only = base.to_dict()
    return r


def _observe(p: Predictor, a: Access, r: ReplayResult) -> None:
    try:
        p.observe(a)
    except Exception:  # noqa: BLE001
        r.predictor_errors += 1


def _gib(n: float) -> str:
    return f"{n / (1 << 30):.2f} GiB" if n >= 1 << 30 else f"{n / MIB:.1f} MiB"


def format_result(r: ReplayResult) -> str:
    """A few lines for the CLI: the predictor's numbers and, when present, LRU only beside them."""
    cols: list[tuple[str, dict[str, Any]]] = [(r.predictor, r.to_dict())]
    if r.lru_only is not None:
        cols.append(("lru only", r.lru_only))
    rows: list[tuple[str, Any]] = [
        ("gets", lambda d: f"{d['accesses']}"),
        ("hits (ram)", lambda d: f"{d['hits']} ({d['hit_rate']:.1%})"),
        ("demand misses", lambda d: f"{d['demand_misses']}"),
        ("prefetch issued", lambda d: f"{d['prefetch_issued']} ({_gib(d['issued_bytes'])})"),
        ("prefetch used", lambda d: f"{d['prefetch_used']} ({d['prefetch_late']} late)"),
        ("wasted", lambda d: _gib(d["wasted_bytes"])),
        ("disk read", lambda d: _gib(d["disk_read_bytes"])),
        ("stall", lambda d: f"{d['stall_s']:.2f} s"),
        ("makespan", lambda d: f"{d['makespan_s']:.2f} s"),
    ]
    w = max(len(name) for name, _ in cols) + 4
    lines = [f"{'':<16}" + "".join(f"{name:>{max(w, 22)}}" for name, _ in cols)]
    for label, fmt in rows:
        lines.append(f"{label:<16}" + "".join(f"{fmt(d):>{max(w, 22)}}" for _, d in cols))
    using = r.predictor_stats.get("using")
    if using:
        shadow = ", ".join(f"{n} {v['hit_rate']:.1%}" for n, v in r.predictor_stats.get("scores", {}).items())
        lines.append(f"auto is using {using} (shadow hit rates, last window: {shadow})")
    if r.trained:
        lines.append(f"trained {r.trained}x in {r.train_s:.2f} s")
    if r.predict_calls:
        lines.append(
            f"observe+predict per get: {r.predict_us_mean:.0f} us mean, {r.predict_us_max:.0f} us max"
        )
    if r.predictor_errors:
        lines.append(f"predictor errors: {r.predictor_errors}")
    return "\n".join(lines)
