"""The predictor interface, the trivial ``none`` predictor and ``make_predictor``.

A predictor sees every access in order (``observe``) and, after a get, names the keys it expects
to be read next (``predict``) with a confidence in [0, 1], most useful first. The daemon prefetches
the first few whose confidence clears its threshold, within a RAM budget for speculative bytes.

Contract, for every predictor here:
- ``observe`` and ``predict`` are cheap (tens of microseconds; well under a millisecond) and run
  on the daemon's loop. ``predict`` never returns ``a.key`` and never the same key twice.
- Heavy work (model fitting) happens only in ``train(history)``, which the daemon runs in a worker
  thread: it must not read or write the predictor's live state. ``install(model)`` then swaps the
  result in, quickly, on the caller's thread. ``wants_training()`` says whether it is time.
- ``stats()`` returns plain JSON-able data for ``tierctl status``.

The daemon guards every call (an exception or a slow predictor turns prefetching off for a while);
the predictors here do not rely on that, but they do not catch their own bugs either.
"""

from __future__ import annotations

from typing import Any

from tierd.predict.log import Access

PREDICTOR_NAMES = ("none", "sequence", "learned", "auto")
DEFAULT_MIN_CONFIDENCE = 0.2
"""Predictions below this confidence are not worth a prefetch (replay's default; the daemon's choice)."""


class Predictor:
    """The interface, and a predictor that predicts nothing (``none``)."""

    name = "none"

    def observe(self, a: Access) -> None:
        """Every access (get, hint, put), in order."""

    def predict(self, a: Access, k: int) -> list[tuple[str, float]]:
        """Up to k keys likely read next after access ``a`` (normally just observed), with a
        confidence in [0, 1], most useful (soonest, most likely) first; never ``a.key``."""
        return []

    def stats(self) -> dict[str, Any]:
        return {"name": self.name}

    def wants_training(self) -> bool:
        return False

    def train(self, history: list[Access]) -> object:
        """Fit a model on ``history`` (oldest first). Runs in a worker thread: no live state."""
        return None

    def install(self, model: object) -> None:
        """Swap in what ``train`` returned (None: nothing to do)."""


class NonePredictor(Predictor):
    name = "none"


def make_predictor(name: str, **opts: Any) -> Predictor:
    """A fresh predictor by name (one of PREDICTOR_NAMES); ``opts`` go to its constructor."""
    if name == "none":
        if opts:
            raise TypeError(f"predictor 'none' takes no options, got {', '.join(sorted(opts))}")
        return NonePredictor()
    if name == "sequence":
        from tierd.predict.sequence import SequencePredictor

        return SequencePredictor(**opts)
    if name == "learned":
        from tierd.predict.learned import LearnedPredictor

        return LearnedPredictor(**opts)
    if name == "auto":
        from tierd.predict.auto import AutoPredictor

        return AutoPredictor(**opts)
    raise ValueError(f"unknown predictor {name!r} (known: {', '.join(PREDICTOR_NAMES)})")
