"""The memory tier interface: byte-addressable memory that the daemon hands out in regions.

Contract (what every memory tier keeps; tests/test_tier_contract.py runs it against each one)::

    allocate(n) -> offset | None     a fresh region of region_bytes(n) bytes, aligned, disjoint from
                                      every other live region; None when no hole is large enough OR
                                      when taking it would put used_bytes above ``ceiling``
                                      (over_ceiling=True waives the ceiling, never the capacity)
    view(offset, n) -> memoryview    the daemon's read/write view of a live region's first n bytes
    free(offset) -> bytes            the region goes back; its bytes may be reused at once
    region_bytes(n)                  what allocate(n) takes from used_bytes (n rounded up)
    ceiling                          the working size: capacity_bytes, lowered under memory
                                      pressure (placement sets it; allocate enforces it)
    map_handle() -> MapHandle        what a client needs to map the tier (an fd and its size)
    space() -> (capacity, free, largest free hole)   for TierFull messages
    check()                          assert the tier's own bookkeeping is consistent (tests)

Region life: free -> allocated (allocate) -> free (free). Nothing else: the tier does not know
whether a region is being written, sealed or leased. The manager frees a region only when no lease
and no move holds it (:mod:`tierd.manager`), so a tier never has to defend a leased region.

The ceiling is enforced here, in ``allocate``, and nowhere else: every allocation of every memory
tier goes through it, so no path (put, promotion, demotion into a lower memory tier) can take memory
that the pressure monitor just gave back. Placement passes ``over_ceiling=True`` only for a demand
request when nothing can be demoted (a read must not fail because the machine is short of memory).

Everything here runs on the daemon's loop except ``view`` copies, which run in executors; ``allocate``
and ``free`` are O(log holes) and allocate nothing beyond the region's bookkeeping.
"""

from __future__ import annotations

from abc import abstractmethod
from typing import ClassVar, NamedTuple

from tierd.tiers.base import Tier


class MapHandle(NamedTuple):
    """What a client needs to map a memory tier: an fd (sent over SCM_RIGHTS) and its length."""

    fd: int
    nbytes: int


class Space(NamedTuple):
    capacity_bytes: int
    free_bytes: int
    largest_free_bytes: int


class MemoryTier(Tier):
    kind: ClassVar[str] = "memory"
    #: the working size (see the module docstring); implementations start it at capacity_bytes
    ceiling: int

    def allocate(self, nbytes: int, *, over_ceiling: bool = False) -> int | None:
        """Offset of a fresh region for ``nbytes``; None when there is no hole or the ceiling is hit."""
        if (
            not over_ceiling
            and self.ceiling < self.capacity_bytes
            and self.used_bytes + self.region_bytes(nbytes) > self.ceiling
        ):
            return None
        return self.reserve(nbytes)

    @abstractmethod
    def reserve(self, nbytes: int) -> int | None:
        """The allocator itself, ceiling aside: offset of a region, or None when no hole fits.
        Only :meth:`allocate` calls it."""

    @abstractmethod
    def free(self, offset: int) -> int:
        """Give a live region back; returns the bytes freed (its region_bytes)."""

    @abstractmethod
    def region_bytes(self, nbytes: int) -> int:
        """Bytes a region for ``nbytes`` takes (alignment included)."""

    @abstractmethod
    def view(self, offset: int, nbytes: int) -> memoryview:
        """The daemon's writable view of a live region (for copies in and out)."""

    @abstractmethod
    def map_handle(self) -> MapHandle:
        """What a client maps to read (and write, for puts) this tier's regions."""

    @abstractmethod
    def space(self) -> Space:
        """Capacity, free bytes and the largest free hole (what TierFull reports)."""

    @abstractmethod
    def check(self) -> None:
        """Assert the tier's bookkeeping is consistent (Manager.check calls it)."""
