"""The memory tier interface: byte-addressable memory that the daemon hands out in regions.

Contract (what every memory tier keeps; tests/test_tier_contract.py runs it against each one)::

    allocate(n, owner=uid) -> loc    a fresh region of region_bytes(n) bytes, aligned, disjoint from
                                      every other live region, in memory that uid ``owner`` may
                                      write; None when no hole is large enough OR when taking it
                                      would put used_bytes above ``ceiling`` (over_ceiling=True
                                      waives the ceiling, never the capacity) or the owner's quota
    view(loc, n) -> memoryview       the daemon's read/write view of a live region's first n bytes
    free(loc) -> bytes               the region goes back; its bytes may be reused at once
    region_bytes(n)                  what allocate(n) takes from used_bytes (n rounded up)
    ceiling                          the working size: capacity_bytes, lowered under memory
                                      pressure (placement sets it; allocate enforces it)
    map_handles(uid) -> [MapHandle]  what a client of that uid maps: one fd per space of the tier,
                                      writable only for the uid's own space, read-only for others'
    split(loc) -> (space, offset)    where a location lies: the space (an index into map_handles)
                                      and the offset in it (what a client is told)
    over_quota(owner, n) -> bool     whether the owner's quota, not the tier, refuses n more bytes
    space() -> (capacity, free, largest free hole)   for TierFull messages
    check()                          assert the tier's own bookkeeping is consistent (tests)

Region life: free -> allocated (allocate) -> free (free). Nothing else: the tier does not know
whether a region is being written, sealed or leased. The manager frees a region only when no lease
and no move holds it (:mod:`tierd.manager`), so a tier never has to defend a leased region.

Trust (DESIGN invariant 9): a uid is a trust domain. A tier that clients map puts each uid's regions
in memory only that uid's clients may write (the RAM tier: a memfd per uid) and hands the other uids
read-only fds; a region's location names its space. A tier that is never mapped by clients (a lower
memory tier) may keep one space and ignore ``owner``.

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
    """What a client needs to map one space of a memory tier: an fd (sent over SCM_RIGHTS), its
    length, whether the fd lets it write (only its own uid's space), and whether the daemon backed
    every page at start (then mapping it with MAP_POPULATE costs page tables only)."""

    fd: int
    nbytes: int
    space: int = 0
    writable: bool = True
    backed: bool = False


class Space(NamedTuple):
    capacity_bytes: int
    free_bytes: int
    largest_free_bytes: int


class MemoryTier(Tier):
    kind: ClassVar[str] = "memory"
    #: whether ``view`` works (host memory); a device tier copies through upload / download
    #: instead (:class:`~tierd.tiers.gpu.GpuTier`)
    host_visible: ClassVar[bool] = True
    #: the working size (see the module docstring); implementations start it at capacity_bytes
    ceiling: int

    def allocate(self, nbytes: int, *, over_ceiling: bool = False, owner: int = 0) -> int | None:
        """Location of a fresh region for ``nbytes`` that uid ``owner`` may write; None when there
        is no hole, the ceiling is hit or the owner's quota is."""
        if (
            not over_ceiling
            and self.ceiling < self.capacity_bytes
            and self.used_bytes + self.region_bytes(nbytes) > self.ceiling
        ):
            return None
        return self.reserve(nbytes, owner)

    @abstractmethod
    def reserve(self, nbytes: int, owner: int = 0) -> int | None:
        """The allocator itself, ceiling aside: location of a region, or None when no hole fits.
        Only :meth:`allocate` calls it."""

    def split(self, location: int) -> tuple[int, int]:
        """(space, offset in it) of a location; a tier of one space returns (0, location)."""
        return 0, location

    def event_of(self, location: int) -> bytes:
        """What a reader of ``location`` waits on before reading (a device copy still in flight);
        empty when the bytes are there (always, for host memory)."""
        return b""

    def over_quota(self, owner: int, nbytes: int) -> bool:
        """Whether uid ``owner``'s quota, not the tier's room, refuses ``nbytes`` more (placement
        then makes room among that owner's entries only). A tier without quotas: never."""
        return False

    def set_quota(self, quota: int | None) -> None:
        """Change the per-uid quota (a reload); entries over a lowered quota stay until demoted."""

    def quota_bytes(self, owner: int) -> int:
        """The most this uid may hold in the tier (its capacity when there are no quotas)."""
        return self.capacity_bytes

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
    def map_handles(self, uid: int) -> list[MapHandle]:
        """What a client of ``uid`` maps to read this tier's regions (and write its own, for puts):
        one handle per space, in space order."""

    @abstractmethod
    def space(self) -> Space:
        """Capacity, free bytes and the largest free hole (what TierFull reports)."""

    @abstractmethod
    def check(self) -> None:
        """Assert the tier's bookkeeping is consistent (Manager.check calls it)."""
