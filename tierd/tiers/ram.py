"""The RAM tier: one memfd arena shared with every client.

Layout and life of the arena::

    daemon                                  client (each)
    ------                                  -------------
    fd = memfd_create("tierd-ram")          receives fd over SCM_RIGHTS in WELCOME
    ftruncate + posix_fallocate(capacity)   mmap(fd, PROT_READ)            -> views for get
    mmap(MAP_POPULATE): every page is       mmap(fd, PROT_READ|PROT_WRITE) -> copies for put
      allocated and zeroed at start, so       (MAP_POPULATE on the first put: page tables once,
      a put never pays first-touch            then every put copies at memcpy speed)
    Allocator hands out regions             writes into a region between PUT and SEAL,
    [0, capacity) at 64-byte alignment      reads leased regions afterwards

A memfd has no name in any filesystem: nothing is ever left in /dev/shm, whoever dies. Its pages
live as long as some process holds the fd or a mapping, so a client's tensors stay readable memory
even if the daemon is killed.

A region is in one of three states: free (in the allocator), writing (reserved by a PUT, owned by
one connection until SEAL or ABORT), sealed (immutable bytes of one entry version). The manager
returns a region to the allocator only when its entry is gone and no lease remains.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import mmap
import os
from collections.abc import Callable
from typing import Any

from tierd.alloc import Allocator
from tierd.tiers.memory import MapHandle, MemoryTier, Space

PAGE = mmap.PAGESIZE


class ArenaError(RuntimeError):
    """The arena could not be created (not enough memory for the requested size)."""


class RamTier(MemoryTier):
    def __init__(self, capacity: int, *, name: str = "ram") -> None:
        self.name = name
        capacity -= capacity % PAGE
        if capacity <= 0:
            raise ArenaError("the RAM tier needs at least one page")
        self.fd = os.memfd_create("tierd-ram", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(self.fd, capacity)
            # Allocate (and zero) every page now, so the memory is really ours and no put pays
            # first-touch faults; fails here, clearly, when the machine cannot back the arena.
            os.posix_fallocate(self.fd, 0, capacity)
            # Every client gets this fd: sealed, no one can shrink the arena under the daemon (a
            # SIGBUS on its next touch) or grow it.
            fcntl.fcntl(self.fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
        except OSError as e:
            os.close(self.fd)
            if e.errno in (errno.ENOSPC, errno.ENOMEM):
                raise ArenaError(
                    f"cannot allocate a {capacity / 2**30:.2f} GiB RAM tier: not enough memory "
                    f"({e.strerror}); lower --ram-bytes"
                ) from None
            raise
        # Touch every page now (MAP_POPULATE): fallocate reserves pages but the kernel zeroes each
        # on its first fault, which would otherwise land on the first put at ~1 GB/s.
        self.mmap = mmap.mmap(self.fd, capacity, flags=mmap.MAP_SHARED | mmap.MAP_POPULATE)
        self.alloc = Allocator(capacity)
        self._capacity = capacity
        self._closed = False
        #: the tier's working size: its capacity, lowered while memory pressure holds it down
        #: (``allocate`` keeps every allocation under it). While it is below capacity a freed
        #: region's pages go back to the kernel at once, so that what the tier holds is what it uses.
        self.ceiling = capacity
        #: told the bytes whenever pages of a freed region go back (the daemon counts them)
        self.on_release: Callable[[int], None] = lambda n: None

    @property
    def capacity_bytes(self) -> int:
        return self._capacity

    @property
    def used_bytes(self) -> int:
        return self.alloc.used_bytes

    def reserve(self, nbytes: int) -> int | None:
        return self.alloc.alloc(nbytes)

    def free(self, offset: int) -> int:
        """Give the region back; returns the bytes freed."""
        size = self.alloc.free(offset)
        if self.ceiling < self._capacity:
            from tierd.pages import release_pages

            self.on_release(release_pages(self.mmap, offset, size))
        return size

    def region_bytes(self, nbytes: int) -> int:
        return self.alloc.size_for(nbytes)

    def view(self, offset: int, nbytes: int) -> memoryview:
        return memoryview(self.mmap)[offset : offset + nbytes]

    def map_handle(self) -> MapHandle:
        return MapHandle(self.fd, self._capacity)

    def space(self) -> Space:
        s = self.alloc.stats()
        return Space(s.capacity_bytes, s.free_bytes, s.largest_free_bytes)

    def check(self) -> None:
        self.alloc.check()

    def stats(self) -> dict[str, Any]:
        s = self.alloc.stats()
        return {
            "capacity_bytes": s.capacity_bytes,
            "used_bytes": s.used_bytes,
            "free_bytes": s.free_bytes,
            "largest_free_bytes": s.largest_free_bytes,
            "free_holes": s.free_holes,
            "regions": s.regions,
            "fragmentation": round(s.fragmentation, 4),
        }

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(BufferError):  # a view still exported: the mapping goes with the process
            self.mmap.close()
        os.close(self.fd)
