"""The RAM tier: one memfd arena per uid, shared with that uid's clients read-write and with
other uids' clients read-only.

Layout and life of an arena::

    daemon                                  client (each)
    ------                                  -------------
    fd = memfd_create("tierd-ram-<uid>")    receives every arena's fd over SCM_RIGHTS in WELCOME:
    fchmod 0600, sealed (no shrink/grow)      its own uid's O_RDWR, the others' O_RDONLY (reopened
    the daemon uid's arena: posix_fallocate   through /proc, so a writable mapping is impossible and,
      + MAP_POPULATE of the whole capacity    with mode 0600, so is reopening it for writing)
      at start; other uids' arenas are      mmap(fd, PROT_READ)            -> views for get
      sparse until written                  mmap(own fd, PROT_READ|WRITE)  -> copies for put
    one Allocator per arena                 writes into a region between PUT and SEAL,
                                            reads leased regions afterwards

Every arena spans the tier's whole capacity in address space, but the tier holds at most
``capacity`` bytes of regions in all (and at most ``quota`` per uid), and at most ``capacity`` bytes
of pages: when a second arena is in use and the pages the arenas hold (st_blocks of each memfd) would
pass the capacity, the free holes of the others are punched first (``_fit_pages``).

A region goes on pages the memfd still holds when a free span of them fits (``Arena.resident_end``:
the smallest such hole, at either of its ends); a span whose pages were given back is taken only
when nothing resident fits: writing there faults and zeroes every page again, and while a
memory-pressure ceiling holds the tier down the next free gives as many back. (With plain best fit,
a 2B streaming run under pressure refaulted 8-9 GB of punched pages.) Which spans are punched is
kept by the daemon, which alone punches them (``Arena.punched``): asking the kernel
(``lseek(SEEK_HOLE)`` from the hole's start) walked the memfd's page index up to the next punched
page, the whole arena when there was none, on the event loop (3-4 s of loop time in a 2B streaming
run of 16 tokens).

A location is ``space * stride + offset``: the arena's index and the offset in it (``split``); the
rest of the daemon treats it as an opaque int.

A memfd has no name in any filesystem: nothing is ever left in /dev/shm, whoever dies. Its pages
live as long as some process holds the fd or a mapping, so a client's tensors stay readable memory
even if the daemon is killed.

A region is in one of three states: free (in the allocator), writing (reserved by a PUT, owned by
one connection until SEAL or ABORT), sealed (immutable bytes of one entry version). The manager
returns a region to the allocator only when its entry is gone and no lease remains.
"""

from __future__ import annotations

import bisect
import contextlib
import errno
import fcntl
import mmap
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from tierd.alloc import Allocator
from tierd.protocol import MAX_ARENAS
from tierd.tiers.memory import MapHandle, MemoryTier, Space

PAGE = mmap.PAGESIZE


class ArenaError(RuntimeError):
    """The arena could not be created (not enough memory for the requested size)."""


@dataclass(eq=False)
class Arena:
    """One uid's memfd, the daemon's mapping of it and the allocator of its regions."""

    space: int
    uid: int
    fd: int
    mmap: mmap.mmap
    alloc: Allocator
    backed: bool
    ro_fd: int = -1
    #: page spans this arena's memfd holds no pages for (never written, or punched since); kept by
    #: the daemon, which alone punches them, so that placing a region asks no system call
    punched: Spans = field(default_factory=lambda: Spans())

    def release(self, offset: int, length: int) -> int:
        """Punch the whole pages of free span ``[offset, offset + length)`` (``release_pages``) and
        record them as punched; returns the bytes released."""
        from tierd.pages import release_pages

        start = -(-offset // PAGE) * PAGE
        n = release_pages(self.mmap, offset, length)
        if n:
            self.punched.add(start, start + n)
        return n

    def written(self, offset: int, length: int) -> None:
        """Region ``[offset, offset + length)`` is to be written: its pages, partial ones at its ends
        included, will be faulted in."""
        self.punched.remove(offset - offset % PAGE, -(-(offset + length) // PAGE) * PAGE)

    def resident_end(self, start: int, hole: int, size: int) -> int | None:
        """The end of free hole ``[start, start + hole)`` where ``size`` bytes lie on pages the memfd
        still holds (nothing to fault in and zero), or None (``Allocator.alloc``'s ``prefer``)."""
        for at in (start, start + hole - size):
            if not self.punched.overlaps(at - at % PAGE, at + size):
                return at
        return None

    def pages(self) -> int:
        """Bytes of memory the memfd holds now (its allocated pages)."""
        return os.fstat(self.fd).st_blocks * 512

    def readonly_fd(self) -> int:
        """An fd of the same memory that cannot write: reopened O_RDONLY through /proc."""
        if self.ro_fd < 0:
            self.ro_fd = os.open(f"/proc/self/fd/{self.fd}", os.O_RDONLY | os.O_CLOEXEC)
        return self.ro_fd


def _memfd(uid: int, capacity: int, backed: bool) -> int:
    fd = os.memfd_create(f"tierd-ram-{uid}", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, capacity)
        # Only the daemon's uid may reopen it (through /proc/<pid>/fd) with other rights than the
        # fd it was given: a read-only fd stays read-only for other uids.
        os.fchmod(fd, 0o600)
        if backed:
            # Allocate (and zero) every page now, so the memory is really ours and no put pays
            # first-touch faults; fails here, clearly, when the machine cannot back the arena.
            os.posix_fallocate(fd, 0, capacity)
        # Sealed: no client holding the fd can shrink the arena under the daemon (a SIGBUS on
        # its next touch) or grow it.
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
    except OSError as e:
        os.close(fd)
        if e.errno in (errno.ENOSPC, errno.ENOMEM):
            raise ArenaError(
                f"cannot allocate a {capacity / 2**30:.2f} GiB RAM tier: not enough memory "
                f"({e.strerror}); lower --ram-bytes"
            ) from None
        raise
    return fd


class Spans:
    """Disjoint half-open integer spans, merged where they touch: add, remove, overlap test."""

    def __init__(self) -> None:
        self._starts: list[int] = []
        self._ends: list[int] = []

    def add(self, start: int, end: int) -> None:
        if end <= start:
            return
        lo = bisect.bisect_left(self._ends, start)  # first span ending at or after start
        hi = bisect.bisect_right(self._starts, end)  # spans from lo to hi touch [start, end)
        if lo < hi:
            start, end = min(start, self._starts[lo]), max(end, self._ends[hi - 1])
        self._starts[lo:hi] = [start]
        self._ends[lo:hi] = [end]

    def remove(self, start: int, end: int) -> None:
        if end <= start:
            return
        lo = bisect.bisect_right(self._ends, start)  # first span ending after start
        hi = bisect.bisect_left(self._starts, end)  # spans from lo to hi overlap [start, end)
        if lo >= hi:
            return
        keep_s, keep_e = [], []
        if self._starts[lo] < start:
            keep_s.append(self._starts[lo])
            keep_e.append(start)
        if self._ends[hi - 1] > end:
            keep_s.append(end)
            keep_e.append(self._ends[hi - 1])
        self._starts[lo:hi] = keep_s
        self._ends[lo:hi] = keep_e

    def overlaps(self, start: int, end: int) -> bool:
        i = bisect.bisect_right(self._ends, start)  # first span ending after start
        return i < len(self._starts) and self._starts[i] < end

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return iter(zip(self._starts, self._ends, strict=True))

    def total(self) -> int:
        return sum(e - s for s, e in self)


class RamTier(MemoryTier):
    def __init__(
        self, capacity: int, *, name: str = "ram", uid: int | None = None, quota: int | None = None
    ) -> None:
        self.name = name
        capacity -= capacity % PAGE
        if capacity <= 0:
            raise ArenaError("the RAM tier needs at least one page")
        self._capacity = capacity
        #: at most this many bytes of regions per uid (None: the whole capacity)
        self.quota: int | None = None
        self.set_quota(quota)
        self._closed = False
        self.arenas: list[Arena] = []
        self._by_uid: dict[int, Arena] = {}
        self._used = 0
        #: the tier's working size: its capacity, lowered while memory pressure holds it down
        #: (``allocate`` keeps every allocation under it). While it is below capacity a freed
        #: region's pages go back to the kernel when the arenas' pages would otherwise pass it; free
        #: pages within it stay, a pool that the next region written reuses without faults.
        self.ceiling = capacity
        #: told the bytes whenever pages of a freed region go back (the daemon counts them)
        self.on_release: Callable[[int], None] = lambda n: None
        # The daemon's own uid gets the first arena, backed and pre-faulted at start: the one-user
        # machine (daemon and models of one uid) puts at memcpy speed from the first put.
        self.arena(os.getuid() if uid is None else uid, backed=True)

    # -- arenas ----------------------------------------------------------------------------------
    def arena(self, uid: int, *, backed: bool = False) -> Arena:
        """The arena of ``uid``, made on first use (sparse: its pages come as they are written)."""
        a = self._by_uid.get(uid)
        if a is not None:
            return a
        if len(self.arenas) >= MAX_ARENAS:
            raise ArenaError(f"the RAM tier serves at most {MAX_ARENAS} uids")
        fd = _memfd(uid, self._capacity, backed)
        flags = mmap.MAP_SHARED | (mmap.MAP_POPULATE if backed else 0)
        # MAP_POPULATE: fallocate reserves pages but the kernel zeroes each on its first fault,
        # which would otherwise land on the first put at ~1 GB/s.
        mm = mmap.mmap(fd, self._capacity, flags=flags)
        a = Arena(len(self.arenas), uid, fd, mm, Allocator(self._capacity), backed)
        if not backed:
            a.punched.add(0, self._capacity)  # sparse: no page until written
        self.arenas.append(a)
        self._by_uid[uid] = a
        return a

    @property
    def mmap(self) -> mmap.mmap:
        """The first arena's mapping (the daemon uid's)."""
        return self.arenas[0].mmap

    @property
    def fd(self) -> int:
        return self.arenas[0].fd

    def split(self, location: int) -> tuple[int, int]:
        return divmod(location, self._capacity)

    def _at(self, location: int) -> tuple[Arena, int]:
        space, offset = divmod(location, self._capacity)
        return self.arenas[space], offset

    # -- the memory tier interface ---------------------------------------------------------------
    @property
    def capacity_bytes(self) -> int:
        return self._capacity

    @property
    def used_bytes(self) -> int:
        return self._used

    def set_quota(self, quota: int | None) -> None:
        cap = self._capacity
        self.quota = None if quota is None or quota >= cap else max(PAGE, quota - quota % PAGE)

    def quota_bytes(self, owner: int) -> int:
        return self._capacity if self.quota is None else self.quota

    def over_quota(self, owner: int, nbytes: int) -> bool:
        if self.quota is None:
            return False
        a = self._by_uid.get(owner)
        used = a.alloc.used_bytes if a is not None else 0
        return used + self.region_bytes(nbytes) > self.quota

    def reserve(self, nbytes: int, owner: int = 0) -> int | None:
        size = self.region_bytes(nbytes)
        if self._used + size > self._capacity or self.over_quota(owner, nbytes):
            return None
        a = self.arena(owner)
        offset = a.alloc.alloc(nbytes, prefer=a.resident_end)
        if offset is None:
            return None
        a.written(offset, size)
        self._used += size
        if len(self.arenas) > 1:
            self._fit_pages(a, size)
        return a.space * self._capacity + offset

    def _fit_pages(self, into: Arena, size: int) -> None:
        """Keep the pages of all arenas within the capacity once ``size`` more are written in
        ``into``: punch the free holes of the others (the emptiest first) until they fit."""
        over = sum(a.pages() for a in self.arenas) + size - self._capacity
        if over <= 0:
            return
        released = 0
        for a in sorted(self.arenas, key=lambda a: (a is into, a.alloc.used_bytes)):
            for start, hole in a.alloc.holes(min_size=PAGE):
                released += a.release(start, hole)
                if released >= over:
                    break
            a.backed = False
            if released >= over:
                break
        self.on_release(released)

    def free(self, location: int) -> int:
        """Give the region back; returns the bytes freed."""
        a, offset = self._at(location)
        size = a.alloc.free(offset)
        self._used -= size
        if self.ceiling < self._capacity and self.resident_bytes() > self.ceiling:
            # Pressure holds the tier down: its pages must not pass the ceiling. Pages of free
            # regions within it stay faulted in, a pool the next put or promotion reuses at once;
            # punching them there (as every free did) made each promotion refault and zero the
            # pages the demotion before it had just given back (26 GB of them in one 2B bench run).
            before = a.pages()
            a.release(offset, size)
            self.on_release(max(0, before - a.pages()))
        return size

    def release_free(self, min_size: int, limit: int | None = None) -> int:
        """Give the pages of free holes of ``min_size`` bytes or more back to the kernel (memory
        pressure), largest holes first, until ``limit`` bytes of pages have gone (None: every such
        hole); returns the bytes of pages actually released (holes already punched count nothing)."""
        released = 0
        for a in self.arenas:
            for start, size in a.alloc.holes(min_size=min_size):
                pos, end = start, start + size
                while pos < end:  # with a limit, a big hole goes in pieces of what is still needed
                    if limit is not None and released >= limit:
                        return released
                    n = end - pos if limit is None else min(end - pos, max(limit - released, min_size))
                    before = a.pages()
                    a.release(pos, n)
                    released += max(0, before - a.pages())
                    pos += n
        return released

    def resident_bytes(self) -> int:
        """Bytes of pages the arenas hold (what the tier costs the machine now)."""
        return sum(a.pages() for a in self.arenas)

    def region_bytes(self, nbytes: int) -> int:
        return self.arenas[0].alloc.size_for(nbytes)

    def view(self, location: int, nbytes: int) -> memoryview:
        a, offset = self._at(location)
        return memoryview(a.mmap)[offset : offset + nbytes]

    def map_handles(self, uid: int) -> list[MapHandle]:
        """Every arena for a client of ``uid``: its own read-write, the others read-only. Its own
        arena is made here when it has none, so that its first put needs no new fd."""
        self.arena(uid)
        return [
            MapHandle(a.fd, self._capacity, a.space, True, a.backed)
            if a.uid == uid
            else MapHandle(a.readonly_fd(), self._capacity, a.space, False, a.backed)
            for a in self.arenas
        ]

    def space(self) -> Space:
        free = self._capacity - self._used
        largest = max(a.alloc.largest_free() for a in self.arenas)
        return Space(self._capacity, free, min(free, largest))

    def check(self) -> None:
        for a in self.arenas:
            a.alloc.check()
        assert sum(a.alloc.used_bytes for a in self.arenas) == self._used

    def stats(self) -> dict[str, Any]:
        per = [a.alloc.stats() for a in self.arenas]
        free = self._capacity - self._used
        holes = sum(s.free_holes for s in per)
        largest = min(free, max(s.largest_free_bytes for s in per))
        return {
            "capacity_bytes": self._capacity,
            "used_bytes": self._used,
            "free_bytes": free,
            "largest_free_bytes": largest,
            "free_holes": holes,
            "regions": sum(s.regions for s in per),
            "fragmentation": round(1 - largest / free, 4) if free else 0.0,
            "quota_bytes": self.quota,
            "arenas": [
                {"uid": a.uid, "used_bytes": a.alloc.used_bytes, "resident_bytes": a.pages()}
                for a in self.arenas
            ],
        }

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for a in self.arenas:
            with contextlib.suppress(BufferError):  # a view still exported: the mapping goes with the process
                a.mmap.close()
            os.close(a.fd)
            if a.ro_fd >= 0:
                os.close(a.ro_fd)
