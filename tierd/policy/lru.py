"""Least recently used first: the order in which RAM copies are demoted.

The policy sees entry versions come and go (``on_put`` when a RAM copy appears, ``on_hit`` on each
get, ``on_remove`` when the RAM copy goes) and yields ``candidates()`` coldest first. Whether a
candidate may move (leases, pins, moves in flight) is for placement to decide, not for the policy.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


class LRU(Generic[T]):
    name = "lru"

    def __init__(self) -> None:
        self._order: OrderedDict[int, T] = OrderedDict()

    def on_put(self, version: int, item: T) -> None:
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
