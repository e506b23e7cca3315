"""What an eviction policy is, and the registry of them by name.

A policy ranks the versions that have a copy in one memory tier; placement decides and moves. It
sees copies come and go (``on_put`` when a copy appears, ``new=True`` when that is a new version
being sealed rather than a promotion of a known one; ``on_hit`` on each get served from the tier;
``on_remove`` when the copy goes) and yields ``candidates()``: the order to demote in, first to go
first. Whether a candidate may move (leases, pins, moves in flight) is placement's business.

Items are the entries themselves (``tierd.entry.Entry``; replay uses a small stand-in): a policy
may read ``key``, ``nbytes``, ``tags`` and ``uid`` from them and nothing else.

Every method runs on the daemon's loop and is O(1) amortised, except ``candidates`` (a walk the
caller stops early) and what a policy documents otherwise. ``training_job`` / ``install`` let the
daemon fit a model in a child process (:mod:`tierd.policy.trainer`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, Generic, Protocol, TypeVar

T = TypeVar("T")


class Item(Protocol):
    """What a policy may read of an entry."""

    key: str
    nbytes: int
    tags: list[str]
    uid: int


class Policy(Generic[T]):
    """The base: every hook a no-op; subclasses keep an order."""

    name = "base"

    def on_put(self, version: int, item: T, new: bool = False) -> None:
        raise NotImplementedError

    def on_hit(self, version: int) -> None:
        raise NotImplementedError

    def on_remove(self, version: int) -> None:
        raise NotImplementedError

    def candidates(self) -> Iterator[T]:
        """First to go first. The caller may remove items while iterating (the walk may still yield
        one removed meanwhile: placement checks each item it is given)."""
        raise NotImplementedError

    def __len__(self) -> int:
        raise NotImplementedError

    def training_job(self) -> tuple[Callable[..., Any], tuple[Any, ...]] | None:
        """A picklable (function, args) whose result ``install`` takes, or None: no training due."""
        return None

    def install(self, model: Any) -> None:
        """Take what a training job returned (on the loop)."""

    def stats(self) -> dict[str, Any]:
        return {"name": self.name, "entries": len(self)}

    def close(self) -> None:
        """Stop any thread the policy owns."""


_REGISTRY: dict[str, Callable[..., Policy[Any]]] = {}


def register(name: str) -> Callable[[Callable[..., Policy[Any]]], Callable[..., Policy[Any]]]:
    def deco(cls: Callable[..., Policy[Any]]) -> Callable[..., Policy[Any]]:
        _REGISTRY[name] = cls
        return cls

    return deco


def make_policy(name: str, *, capacity: int = 0, **options: Any) -> Policy[Any]:
    """A fresh policy by name for a tier of ``capacity`` bytes; ValueError for an unknown name."""
    try:
        factory = _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown eviction policy {name!r}; known: {', '.join(sorted(_REGISTRY))}") from None
    return factory(capacity=capacity, **options)
