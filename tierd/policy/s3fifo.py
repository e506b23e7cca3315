"""S3-FIFO (Yang et al., SOSP 2023): a small probationary FIFO, a main FIFO and a ghost list.

Chosen as the heuristic beside LRU because it is the strongest simple policy on the kind of
streams tierd sees: one-hit wonders (a vision feature read once, a KV block of a chat that never
returns) leave through the small queue without pushing out what is read again, and it needs no
tuning beyond the small queue's share. LFU with aging was the other choice; it keeps popular
entries too but lets a burst of new ones age slowly out, where S3-FIFO lets them go at once.

Bytes, not counts: the small queue holds up to ``SMALL_SHARE`` of the bytes tracked (the tier's
used bytes, which is its capacity when something must go). Each copy has a frequency 0..3 (a get
adds one; the read that a promotion was made for does not). To pick a victim: while the small
queue is over its share, its head goes: to the main queue when it was read while there
(frequency > 0), else out, its version remembered in the ghost list (as many as there are copies
tracked). Otherwise the main queue's head goes when its frequency is 0, else it is put back at the
tail with its frequency lowered by one. A version put back (a promotion) that is in the ghost list
goes straight to the main queue.

``candidates()`` first brings both heads to a copy the algorithm would evict (the moves above,
amortised O(1): each is paid for by an earlier get), then yields the queue to evict from, then
the other; within each, copies with frequency 0 come before the others, so when the first is held
(leased, pinned) the next is the one S3-FIFO would take after it.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from typing import Any, TypeVar

from tierd.policy.base import Item, Policy, register

T = TypeVar("T", bound=Item)
SMALL_SHARE = 0.10
MAX_FREQ = 3


@register("s3fifo")
class S3FIFO(Policy[T]):
    name = "s3fifo"

    def __init__(self, capacity: int = 0, **_: Any) -> None:
        self._small: OrderedDict[int, T] = OrderedDict()
        self._main: OrderedDict[int, T] = OrderedDict()
        self._freq: dict[int, int] = {}
        self._ghost: OrderedDict[int, None] = OrderedDict()
        self._small_bytes = 0
        self._bytes = 0

    def on_put(self, version: int, item: T, new: bool = False) -> None:
        if version in self._freq:
            return
        # a promotion is followed by the read that asked for it (or a prefetch's awaited read):
        # that one does not count as a reuse
        self._freq[version] = 0 if new else -1
        self._bytes += item.nbytes
        if version in self._ghost:
            del self._ghost[version]
            self._main[version] = item
        else:
            self._small[version] = item
            self._small_bytes += item.nbytes

    def on_hit(self, version: int) -> None:
        f = self._freq.get(version)
        if f is not None and f < MAX_FREQ:
            self._freq[version] = max(0, f + 1) if f >= 0 else 0

    def on_remove(self, version: int) -> None:
        if self._freq.pop(version, None) is None:
            return
        item = self._small.pop(version, None)
        if item is not None:
            self._small_bytes -= item.nbytes
            self._bytes -= item.nbytes
            # out of the probation queue: remembered, so a quick return goes to the main queue
            self._ghost[version] = None
            while len(self._ghost) > max(64, len(self._freq)):
                self._ghost.popitem(last=False)
        else:
            self._bytes -= self._main.pop(version).nbytes

    def _small_over(self) -> bool:
        return bool(self._small) and (self._small_bytes > SMALL_SHARE * self._bytes or not self._main)

    def _settle(self) -> None:
        """Move heads the algorithm would pass over until each queue's head is a victim."""
        small, main, freq = self._small, self._main, self._freq
        while small:
            v, item = next(iter(small.items()))
            if freq[v] <= 0:
                break
            del small[v]
            self._small_bytes -= item.nbytes
            freq[v] = 0
            main[v] = item
        for _ in range(len(main)):
            v = next(iter(main))
            if freq[v] <= 0:
                break
            freq[v] -= 1
            main.move_to_end(v)

    def candidates(self) -> Iterator[T]:
        self._settle()
        first, second = (self._small, self._main) if self._small_over() else (self._main, self._small)
        freq = self._freq
        order = [(v, i) for q in (first, second) for v, i in q.items()]
        for v, item in order:
            if freq.get(v, 1) <= 0:
                yield item
        for v, item in order:
            if freq.get(v, 0) > 0:
                yield item

    def __len__(self) -> int:
        return len(self._freq)

    def stats(self) -> dict[str, Any]:
        return {"name": self.name, "entries": len(self), "small": len(self._small), "main": len(self._main),
                "ghost": len(self._ghost)}  # fmt: skip
