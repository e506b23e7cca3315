"""A shadow cache: keys and sizes only, run by one policy at a given capacity.

Fed the reference stream (a put makes a new version of its key resident; a get is a hit when the
key's current version is resident, else a miss that brings it in), it counts the bytes requested
and missed: the byte miss ratio that policy would have had at that capacity. Evictions take the
policy's candidates in order until the new copy fits. Used by ``auto`` (one per candidate policy,
on the live stream) and by offline replay (:mod:`tierd.policy.simulate`).
"""

from __future__ import annotations

from collections import deque
from typing import Any

from tierd.policy.base import Policy

#: keys remembered at least (their versions, for a miss to bring back the same one)
MAX_KEYS = 1 << 16


class SimItem:
    """What a policy sees of an entry in a shadow cache."""

    __slots__ = ("key", "nbytes", "tags", "uid", "version")

    def __init__(self, key: str, nbytes: int, tags: list[str], uid: int, version: int) -> None:
        self.key, self.nbytes, self.tags, self.uid, self.version = key, nbytes, tags, uid, version


class Shadow:
    def __init__(self, policy: Policy[Any], capacity: int, window: int = 8192) -> None:
        self.policy = policy
        self.capacity = capacity
        self.used = 0
        self.resident: dict[int, SimItem] = {}
        self.current: dict[str, SimItem] = {}  # key -> its current version (resident or not)
        #: evicted items, oldest first: the keys forgotten first when ``current`` grows past its cap
        self._gone: deque[SimItem] = deque()
        self._next = 1
        self.gets = 0
        self.requested = 0
        self.missed = 0
        #: (requested, missed) totals after each of the last ``window`` gets, and the totals before
        #: the first of them: the bytes over any last ``k`` gets are two look-ups
        self._cum: deque[tuple[int, int]] = deque([(0, 0)], maxlen=window + 1)

    def ref(self, key: str, nbytes: int, tags: list[str], owner: int, op: str) -> bool | None:
        """One reference; for a get, whether it hit."""
        cur = self.current.get(key)
        if op == "put":
            if cur is not None:
                self._evict(cur)
            item = SimItem(key, nbytes, tags, owner, self._next)
            self._next += 1
            self.current[key] = item
            self._admit(item, new=True)
            return None
        hit = cur is not None and cur.version in self.resident
        if cur is None:
            cur = SimItem(key, nbytes, tags, owner, self._next)
            self._next += 1
            self.current[key] = cur
        cur.uid = owner
        if not hit:
            self._admit(cur, new=False)
        if cur.version in self.resident:
            self.policy.on_hit(cur.version)
        n = cur.nbytes
        self.gets += 1
        self.requested += n
        miss = 0 if hit else n
        self.missed += miss
        self._cum.append((self.requested, self.missed))
        return hit

    def _evict(self, item: SimItem) -> None:
        if self.resident.pop(item.version, None) is not None:
            self.used -= item.nbytes
            self.policy.on_remove(item.version)
            self._gone.append(item)
            cap = max(MAX_KEYS, 4 * len(self.resident))
            while len(self.current) > cap and self._gone:  # a long-lived daemon sees endless new keys
                old = self._gone.popleft()
                if self.current.get(old.key) is old and old.version not in self.resident:
                    del self.current[old.key]
            if len(self._gone) > 2 * cap:
                self._gone = deque(x for x in self._gone if self.current.get(x.key) is x)

    def _admit(self, item: SimItem, new: bool) -> None:
        if item.nbytes > self.capacity:
            return
        if self.used + item.nbytes > self.capacity:
            for victim in self.policy.candidates():
                if victim.version in self.resident:
                    self._evict(victim)
                if self.used + item.nbytes <= self.capacity:
                    break
        self.resident[item.version] = item
        self.used += item.nbytes
        self.policy.on_put(item.version, item, new=new)

    def reset_window(self) -> None:
        """Score from now on only (its policy changed: a new model)."""
        self._cum.clear()
        self._cum.append((self.requested, self.missed))

    def byte_miss_ratio(self) -> float | None:
        return self.missed / self.requested if self.requested else None

    def recent(self, k: int) -> tuple[int, int]:
        """Bytes requested and missed over the last ``k`` gets (at most :attr:`recent_gets`).

        Shadows fed the same references (``auto``'s) see the same gets, so their last ``k`` are the
        same gets: a paired comparison."""
        k = min(k, len(self._cum) - 1)
        r1, m1 = self._cum[-1]
        r0, m0 = self._cum[-1 - k]
        return r1 - r0, m1 - m0

    def batches(self, n: int, size: int) -> list[tuple[int, int]]:
        """Bytes requested and missed in each of the last ``n`` runs of ``size`` gets, newest first
        (``n * size`` must be at most :attr:`recent_gets`): ``n + 1`` look-ups."""
        cum = self._cum
        marks = [cum[-1 - j * size] for j in range(n + 1)]
        return [(marks[j][0] - marks[j + 1][0], marks[j][1] - marks[j + 1][1]) for j in range(n)]

    def holds(self, key: str) -> bool:
        """Whether ``key``'s current version is resident."""
        cur = self.current.get(key)
        return cur is not None and cur.version in self.resident

    def bytes_not_in(self, other: Shadow) -> int:
        """Bytes resident here whose key's current version is not resident in ``other``: what a cache
        holding ``other``'s contents would have to read to hold these. O(resident)."""
        return sum(it.nbytes for it in self.resident.values() if not other.holds(it.key))

    def recent_byte_miss_ratio(self) -> float | None:
        """Over the last ``window`` gets (since :meth:`reset_window`, if fewer)."""
        req, miss = self.recent(self.recent_gets)
        return miss / req if req else None

    @property
    def recent_gets(self) -> int:
        return len(self._cum) - 1

    @property
    def recent_requested(self) -> int:
        return self.recent(self.recent_gets)[0]
