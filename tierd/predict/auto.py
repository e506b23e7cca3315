"""``auto``: the candidates, ``none`` (hints only) among them, scored side by side on the live
stream by what each would save net of what it costs; the best is followed.

Shadow scoring: after a get, every candidate predicts (``shadow_k`` keys; those with confidence
>= ``min_confidence``, what the prefetcher would act on). A prediction of a key a client has
hinted (within ``hint_horizon`` gets) is neither a win nor a cost: the daemon loads it for the
hint anyway and the prediction costs nothing there (``tierd.prefetch``). Of the others:

- a gain, the key's bytes, when the same client gets it within the next ``horizon`` gets and the
  get was served from below RAM (a disk read the prediction would have saved), or from RAM while
  the followed candidate had predicted it (its prefetch may be why it was there: every candidate
  that predicted it shares the credit, so an equal one is not shut out);
- a cost, the key's bytes, when it is not read within the horizon (a wasted disk read), and the
  candidate's measured CPU time per access (observe + predict) at ``disk_gbps``, the disk time the
  same seconds would read.

A candidate's score is (gain - waste - CPU) / bytes read, over about the last ``window`` gets:
the share of the read bytes it saves, net. ``none`` scores 0 by definition. ``auto`` starts on
``none`` and moves only to a candidate that leads the followed one by ``margin`` after ``min_gets``
gets of evidence, so it neither flaps between equals nor pays for a predictor that only repeats
the hints.

Bounded work: scoring every candidate on every access costs their sum (about 20-45 us per access
for sequence + learned here). ``auto`` keeps its own mean within ``cost_budget_us``: it scores in
bursts of ``burst`` accesses and between them runs only the followed candidate, with the pause
sized from the measured cost of a burst (never less than one burst in ``1 / min_duty``). The
shadow candidates therefore learn from the bursts only, while the followed one sees everything.
Measured (``bench/bench_predict.py --per-access``): see docs/benchmarks.md.
``cost_budget_us=None`` scores every access (offline replay and unit tests, where time is free).

Training is passed through to the ``learned`` candidate (``wants_training`` / ``train`` /
``install``), but only while it is followed or its score (untrained, its candidate tables alone)
beats ``none``: a training costs seconds of CPU that a model on a small machine needs more. Its
model is used as soon as installed, and scored like the others.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Any

from tierd.predict import learned, sequence  # noqa: F401  (its default candidates: registered on import)
from tierd.predict.base import DEFAULT_MIN_CONFIDENCE, Predictor, make_predictor, register
from tierd.predict.log import Access

#: sizes remembered per key (for a predicted key's bytes); cleared when it grows past this
SIZES_KEPT = 1 << 16
HINTS_KEPT = 1 << 14
#: auto's own work per access between bursts (about 1.1 us measured here, following none)
SKIP_OVERHEAD_NS = 1000.0


class _Score:
    """One candidate's decayed sums (halved every ``window`` gets)."""

    __slots__ = ("cpu_ns", "expiry", "gain", "made", "n_access", "pending", "used", "waste")

    def __init__(self) -> None:
        self.gain = 0.0  # bytes of reads its predictions would have saved
        self.waste = 0.0  # bytes it predicted that were not read within the horizon
        self.made = 0.0  # predictions made (not of hinted keys)
        self.used = 0.0  # of those, read within the horizon
        self.cpu_ns = 0.0  # time in observe + predict
        self.n_access = 0.0  # accesses timed
        self.pending: dict[tuple[int, str], int] = {}  # (client, key) -> last get number it may come
        self.expiry: deque[tuple[int, int, str, int]] = deque()  # (until, client, key, nbytes)

    def halve(self) -> None:
        self.gain *= 0.5
        self.waste *= 0.5
        self.made *= 0.5
        self.used *= 0.5
        self.cpu_ns *= 0.5
        self.n_access *= 0.5

    def us_per_access(self) -> float:
        return self.cpu_ns / self.n_access / 1e3 if self.n_access else 0.0

    def precision(self) -> float | None:
        return self.used / self.made if self.made else None


@register
class AutoPredictor(Predictor):
    name = "auto"

    def __init__(
        self,
        *,
        candidates: tuple[str, ...] = ("none", "sequence", "learned"),
        window: int = 2000,
        horizon: int = 32,
        hint_horizon: int = 64,
        shadow_k: int = 2,
        min_confidence: float = DEFAULT_MIN_CONFIDENCE,
        margin: float = 0.02,
        min_gets: int = 32,
        disk_gbps: float = 1.5,
        cost_budget_us: float | None = 5.0,
        burst: int = 256,
        min_duty: float = 1 / 32,
        options: dict[str, dict[str, Any]] | None = None,
    ) -> None:
        if not candidates or "auto" in candidates:
            raise ValueError(f"auto: candidates must be other predictors, got {candidates!r}")
        opts = options or {}
        if "none" not in candidates:
            candidates = ("none", *candidates)  # the baseline every other one must beat
        self._children: dict[str, Predictor] = {n: make_predictor(n, **opts.get(n, {})) for n in candidates}
        self._scores = {n: _Score() for n in candidates}
        self._using = "none"
        self._window = window
        self._horizon = horizon
        self._hint_horizon = hint_horizon
        self._k = shadow_k
        self._min_conf = min_confidence
        self._margin = margin
        self._min_gets = min_gets
        self._ns_per_byte = 1.0 / disk_gbps  # 1 GB/s = 1 byte per ns
        self._budget_ns = None if cost_budget_us is None else cost_budget_us * 1e3
        self._burst = burst
        self._min_duty = min_duty
        self._gets = 0  # gets scored
        self._read_bytes = 0.0  # bytes those gets read (decayed like the scores)
        self._switches = 0
        self._last: tuple[int, str, float] | None = None
        self._last_preds: dict[str, list[tuple[str, float]]] = {}
        self._sizes: dict[str, int] = {}
        self._hinted: dict[str, int] = {}  # key -> get number when hinted
        # burst schedule: accesses left in this burst, accesses to skip after it
        self._left = burst
        self._skip = 0
        self._burst_ns = 0  # shadow time in this burst
        self._accesses = 0
        self._shadowed = 0
        self._drain_until = 0  # after a burst: keep checking outstanding predictions until this get

    @property
    def using(self) -> str:
        return self._using

    # ---- per access ------------------------------------------------------------------------------
    def observe(self, a: Access) -> None:
        self._accesses += 1
        if self._skip > 0:
            self._skip -= 1
            followed = self._children[self._using]
            followed.observe(a)
            if a.op == "get" and self._gets < self._drain_until:
                self._gets += 1
                self._settle(a)
            elif a.op == "hint":
                self._hint(a)
            if self._skip == 0:
                self._left = self._burst
            return
        self._shadowed += 1
        t_all = time.perf_counter_ns()
        self._shadow(a)
        if self._budget_ns is not None:
            self._burst_ns += time.perf_counter_ns() - t_all
            self._left -= 1
            if self._left <= 0:
                self._pause()

    def _shadow(self, a: Access) -> None:
        if a.nbytes:
            if len(self._sizes) >= SIZES_KEPT:
                self._sizes.clear()
            self._sizes[a.key] = a.nbytes
        if a.op == "hint":
            self._hint(a)
        is_get = a.op == "get"
        if is_get:
            self._gets += 1
            self._settle(a)
        g = self._gets
        perf = time.perf_counter_ns
        hinted = self._hinted
        for name, p in self._children.items():
            sc = self._scores[name]
            t = perf()
            p.observe(a)
            preds = p.predict(a, self._k) if is_get and name != "none" else []
            sc.cpu_ns += perf() - t
            sc.n_access += 1
            if not is_get:
                continue
            self._last_preds[name] = preds
            for key, conf in preds:
                if conf < self._min_conf or key == a.key:
                    continue
                h = hinted.get(key)
                if h is not None and g - h <= self._hint_horizon:
                    continue  # the hint loads it: the prediction neither wins nor costs
                pk = (a.client, key)
                if pk not in sc.pending:
                    sc.made += 1.0
                    until = g + self._horizon
                    sc.pending[pk] = until
                    sc.expiry.append((until, a.client, key, self._sizes.get(key, 0)))
        if is_get:
            self._last = (a.client, a.key, a.t)
            if g % self._window == 0:
                self._read_bytes *= 0.5
                for sc in self._scores.values():
                    sc.halve()
            if g >= self._min_gets and g % 8 == 0:
                self._choose()

    def _hint(self, a: Access) -> None:
        if len(self._hinted) >= HINTS_KEPT:
            self._hinted.pop(next(iter(self._hinted)))
        self._hinted[a.key] = self._gets

    def _settle(self, a: Access) -> None:
        """A get: the predictions it bears out, and those that expired before it."""
        g = self._gets
        self._hinted.pop(a.key, None)
        self._read_bytes += a.nbytes
        missed = a.tier not in ("ram", "gpu")
        followed_hit = not missed and (a.client, a.key) in self._scores[self._using].pending
        pk = (a.client, a.key)
        for sc in self._scores.values():
            if sc.pending.pop(pk, None) is not None:
                sc.used += 1.0
                if missed or followed_hit:
                    sc.gain += a.nbytes
            exp = sc.expiry
            while exp and exp[0][0] < g:
                until, client, key, nbytes = exp.popleft()
                if sc.pending.get((client, key)) == until:
                    del sc.pending[(client, key)]
                    sc.waste += nbytes

    def _pause(self) -> None:
        """The end of a burst: skip enough accesses to keep the mean cost within the budget."""
        assert self._budget_ns is not None
        per_access = self._burst_ns / self._burst
        followed = self._scores[self._using].us_per_access() * 1e3
        # aim at 80% of the budget (the first burst and the bursts' spread take the rest), less
        # what an access costs between bursts: the followed candidate and auto's own bookkeeping
        spare = max(0.8 * self._budget_ns - followed - SKIP_OVERHEAD_NS, 0.0)
        duty = 1.0 if per_access <= spare else max(self._min_duty, spare / per_access)
        self._skip = round(self._burst * (1.0 / duty - 1.0))
        self._burst_ns = 0
        self._left = self._burst
        self._drain_until = self._gets + self._horizon

    # ---- the choice ------------------------------------------------------------------------------
    def score(self, name: str) -> float:
        """Net bytes saved per byte read (gain - waste - CPU time as disk bytes); 0 for ``none``."""
        if name == "none" or self._read_bytes <= 0:
            return 0.0
        sc = self._scores[name]
        gets = max(self._gets_in_window(), 1.0)
        cpu_bytes = sc.cpu_ns / max(sc.n_access, 1.0) * gets / self._ns_per_byte
        return (sc.gain - sc.waste - cpu_bytes) / self._read_bytes

    def _gets_in_window(self) -> float:
        # accesses timed approximate the gets scored (hints and puts are timed too: a small over-count
        # of the CPU cost, on the cautious side)
        return self._scores["none"].n_access

    def _choose(self) -> None:
        cur = self.score(self._using)
        best, best_score = self._using, cur
        for name in self._scores:
            s = self.score(name)
            if s > best_score:
                best, best_score = name, s
        if best != self._using and best_score >= cur + self._margin:
            self._using = best
            self._switches += 1

    def predict(self, a: Access, k: int) -> list[tuple[str, float]]:
        if k <= 0 or self._using == "none":
            return []
        if k <= self._k and self._last == (a.client, a.key, a.t) and self._skip == 0:
            return self._last_preds.get(self._using, [])[:k]
        return self._children[self._using].predict(a, k)

    def stats(self) -> dict[str, Any]:
        scores: dict[str, Any] = {}
        for name, sc in self._scores.items():
            prec = sc.precision()
            scores[name] = {
                "score": round(self.score(name), 4),
                "hit_rate": round(sc.gain / self._read_bytes, 4) if self._read_bytes else 0.0,
                "precision": None if prec is None else round(prec, 4),
                "wasted_bytes": int(sc.waste),
                "us_per_access": round(sc.us_per_access(), 2),
            }
        return {
            "name": self.name,
            "using": self._using,
            "switches": self._switches,
            "gets": self._gets,
            "shadowed_share": round(self._shadowed / self._accesses, 4) if self._accesses else 1.0,
            "scores": scores,
            "candidates": {name: p.stats() for name, p in self._children.items()},
        }

    def wants_training(self) -> bool:
        """A training is worth its CPU only for a candidate that could be followed: the one followed
        now, or one whose untrained score already beats ``none`` (a streaming model's hints leave
        every candidate at or below 0, and then nothing is trained)."""
        return any(
            p.wants_training() and (name == self._using or self.score(name) > 0)
            for name, p in self._children.items()
        )

    def train(self, history: list[Access]) -> object:
        return {name: p.train(history) for name, p in self._children.items()}

    def install(self, model: object) -> None:
        if model is None:
            return
        if not isinstance(model, dict):
            raise TypeError(f"auto: install() takes what auto.train() returned, got {type(model).__name__}")
        for name, m in model.items():
            self._children[name].install(m)
