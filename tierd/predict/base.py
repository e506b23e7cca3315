"""The predictor interface, the trivial ``none`` predictor, and the registry behind ``make_predictor``.

A predictor sees every access in order (``observe``) and, after a get, names the keys it expects
to be read next (``predict``) with a confidence in [0, 1], most useful first. The daemon prefetches
the first few whose confidence reaches ``DEFAULT_MIN_CONFIDENCE``, within a RAM budget for
speculative bytes; offline replay (``tierd.predict.simulate``) uses the same threshold.

Where each method runs in the daemon (``tierd.prefetch``):
- ``observe`` and ``predict`` run on one predictor thread, in access order, never on the event
  loop. They should be cheap (tens of microseconds): when the thread falls behind, accesses are
  dropped and counted, not queued without bound. ``predict`` never returns ``a.key`` and never the
  same key twice.
- ``train(history)`` runs in a separate, niced child process, on a fresh predictor built from the
  same name and options: it may read only its options and ``history`` (oldest first), and returns a
  picklable model. ``install(model)`` then swaps that model in on the predictor thread, so
  ``observe`` / ``predict`` never see a half-installed one. ``wants_training()`` (asked on the
  loop, every few thousand accesses) says whether it is time.
- ``stats()`` runs on the loop (``tierctl status``) and returns plain JSON-able data.

The daemon catches what these raise: an exception costs that access's predictions (counted in
``predictor_errors``), a failed training keeps the old model; the predictors here do not catch
their own bugs. A predictor registers itself by name with ``@register``; this module imports none
of them (``tierd.predict`` imports each, so importing the package registers them all).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from tierd.predict.log import Access

DEFAULT_MIN_CONFIDENCE = 0.2
"""Predictions below this confidence are not worth a prefetch: the daemon's threshold and offline
replay's default (README's prefetching table was measured at it)."""


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
        """Fit a model on ``history`` (oldest first). Runs in another process: no live state."""
        return None

    def install(self, model: object) -> None:
        """Swap in what ``train`` returned (None: nothing to do)."""


_REGISTRY: dict[str, Callable[..., Predictor]] = {}
P = TypeVar("P", bound=type[Predictor])


def register(cls: P) -> P:
    """Class decorator: make ``cls`` available to ``make_predictor`` under ``cls.name``."""
    if _REGISTRY.get(cls.name, cls) is not cls:
        raise ValueError(f"predictor name {cls.name!r} is already taken by {_REGISTRY[cls.name]!r}")
    _REGISTRY[cls.name] = cls
    return cls


def predictor_names() -> tuple[str, ...]:
    """The registered predictors' names, in registration order."""
    return tuple(_REGISTRY)


@register
class NonePredictor(Predictor):
    name = "none"


def make_predictor(name: str, **opts: Any) -> Predictor:
    """A fresh predictor by registered name; ``opts`` go to its constructor."""
    factory = _REGISTRY.get(name)
    if factory is None:
        raise ValueError(f"unknown predictor {name!r} (known: {', '.join(_REGISTRY)})")
    if factory is NonePredictor and opts:
        raise TypeError(f"predictor 'none' takes no options, got {', '.join(sorted(opts))}")
    return factory(**opts)
