"""Least recently used first: the default order in which RAM copies are demoted."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from typing import Any, TypeVar

from tierd.policy.base import Policy, register

T = TypeVar("T")


@register("lru")
class LRU(Policy[T]):
    name = "lru"

    def __init__(self, capacity: int = 0, **_: Any) -> None:
        self._order: OrderedDict[int, T] = OrderedDict()

    def on_put(self, version: int, item: T, new: bool = False) -> None:
        self._order[version] = item
        self._order.move_to_end(version)

    def on_hit(self, version: int) -> None:
        if version in self._order:
            self._order.move_to_end(version)

    def on_remove(self, version: int) -> None:
        self._order.pop(version, None)

    def candidates(self) -> Iterator[T]:
        """Coldest first. A snapshot: the caller may move items while iterating."""
        return iter(list(self._order.values()))

    def __len__(self) -> int:
        return len(self._order)
