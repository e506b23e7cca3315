"""``auto``: the candidates run side by side on the live stream; the best measured one is used.

Shadow scoring: after each get, every candidate predicts (``shadow_k`` keys; those with confidence
>= ``min_confidence``, what the prefetcher would act on); a later get by the same client within
the next ``horizon`` gets of a key a candidate predicted counts as covered for that candidate.
Each candidate's score is its covered share of the last ``window`` gets (its hit rate, had it been
the one prefetching), with its precision (predictions read / made) beside it for ``stats``.
``auto`` uses the best; it switches only when another leads by ``margin`` after ``min_gets`` gets
of evidence, so it does not flap between two that are equally good.

Training is passed through to the ``learned`` candidate (``wants_training`` / ``train`` /
``install``); its model is used as soon as installed, and scored like the others.
"""

from __future__ import annotations

from collections import deque
from typing import Any

from tierd.predict import learned, sequence  # noqa: F401  (its default candidates: registered on import)
from tierd.predict.base import DEFAULT_MIN_CONFIDENCE, Predictor, make_predictor, register
from tierd.predict.log import Access


class _Score:
    __slots__ = ("covered", "made", "outcomes", "pending", "used")

    def __init__(self, window: int) -> None:
        self.outcomes: deque[int] = deque(maxlen=window)
        self.covered = 0  # sum of outcomes
        self.made = 0.0  # predictions made (decayed), for precision
        self.used = 0.0  # of those, read within the horizon
        self.pending: dict[int, dict[str, int]] = {}  # client -> key -> last get number it may come

    def record(self, hit: bool) -> None:
        if len(self.outcomes) == self.outcomes.maxlen:
            self.covered -= self.outcomes[0]
        self.outcomes.append(1 if hit else 0)
        self.covered += 1 if hit else 0

    def hit_rate(self) -> float:
        return self.covered / len(self.outcomes) if self.outcomes else 0.0

    def precision(self) -> float | None:
        return self.used / self.made if self.made else None


@register
class AutoPredictor(Predictor):
    name = "auto"

    def __init__(
        self,
        *,
        candidates: tuple[str, ...] = ("sequence", "learned"),
        window: int = 2000,
        horizon: int = 8,
        shadow_k: int = 2,
        min_confidence: float = DEFAULT_MIN_CONFIDENCE,
        margin: float = 0.01,
        min_gets: int = 200,
        options: dict[str, dict[str, Any]] | None = None,
    ) -> None:
        if not candidates or "auto" in candidates:
            raise ValueError(f"auto: candidates must be other predictors, got {candidates!r}")
        opts = options or {}
        self._children: dict[str, Predictor] = {n: make_predictor(n, **opts.get(n, {})) for n in candidates}
        self._scores = {n: _Score(window) for n in candidates}
        self._using = candidates[0]
        self._horizon = horizon
        self._k = shadow_k
        self._min_conf = min_confidence
        self._margin = margin
        self._min_gets = min_gets
        self._gets = 0
        self._switches = 0
        self._last: tuple[int, str, float] | None = None
        self._last_preds: dict[str, list[tuple[str, float]]] = {}

    @property
    def using(self) -> str:
        return self._using

    def observe(self, a: Access) -> None:
        for p in self._children.values():
            p.observe(a)
        if a.op != "get":
            return
        self._gets += 1
        g = self._gets
        for name, p in self._children.items():
            sc = self._scores[name]
            pend = sc.pending.get(a.client)
            hit = False
            if pend:
                if pend.pop(a.key, None) is not None:
                    hit = True
                    sc.used += 1.0
                for k in [k for k, until in pend.items() if until <= g]:
                    del pend[k]
            sc.record(hit)
            preds = p.predict(a, self._k)
            self._last_preds[name] = preds
            if not preds:
                continue
            pend = sc.pending.setdefault(a.client, {})
            for key, conf in preds:
                if conf >= self._min_conf and key != a.key:
                    if key not in pend:
                        sc.made += 1.0
                    pend[key] = g + self._horizon
            if sc.made > 8192:
                sc.made *= 0.5
                sc.used *= 0.5
            if len(sc.pending) > 1024:  # clients that went away
                sc.pending.pop(next(iter(sc.pending)))
        self._last = (a.client, a.key, a.t)
        if g >= self._min_gets:
            self._choose()

    def _choose(self) -> None:
        cur = self._scores[self._using].hit_rate()
        best, best_rate = self._using, cur
        for name, sc in self._scores.items():
            r = sc.hit_rate()
            if r > best_rate:
                best, best_rate = name, r
        if best != self._using and best_rate >= cur + self._margin:
            self._using = best
            self._switches += 1

    def predict(self, a: Access, k: int) -> list[tuple[str, float]]:
        if k <= 0:
            return []
        if k <= self._k and self._last == (a.client, a.key, a.t):
            return self._last_preds.get(self._using, [])[:k]
        return self._children[self._using].predict(a, k)

    def stats(self) -> dict[str, Any]:
        scores: dict[str, Any] = {}
        for name, sc in self._scores.items():
            prec = sc.precision()
            scores[name] = {
                "hit_rate": round(sc.hit_rate(), 4),
                "precision": None if prec is None else round(prec, 4),
                "gets": len(sc.outcomes),
            }
        return {
            "name": self.name,
            "using": self._using,
            "switches": self._switches,
            "scores": scores,
            "candidates": {name: p.stats() for name, p in self._children.items()},
        }

    def wants_training(self) -> bool:
        return any(p.wants_training() for p in self._children.values())

    def train(self, history: list[Access]) -> object:
        return {name: p.train(history) for name, p in self._children.items()}

    def install(self, model: object) -> None:
        if model is None:
            return
        if not isinstance(model, dict):
            raise TypeError(f"auto: install() takes what auto.train() returned, got {type(model).__name__}")
        for name, m in model.items():
            self._children[name].install(m)
