"""What a client maps and names: the daemon's RAM arenas (read-only for gets; its own uid's also
read-write for puts) and the handle of a sealed version."""

from __future__ import annotations

import ctypes
import mmap
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np
    import torch


@dataclass(frozen=True, slots=True)
class Handle:
    """One sealed version of an entry: what put returns and get accepts. Treat it as opaque."""

    key: str
    version: int

    def __str__(self) -> str:
        return f"{self.key}@v{self.version}"


class Arena:
    """The client's mappings of one of the daemon's memfds: read-only for gets and, for its own
    uid's arena only (``writable``: the daemon sent that fd O_RDWR, every other one O_RDONLY, so
    the kernel refuses a writable mapping of them), read-write for puts.

    The daemon pre-faults its own uid's arena (``backed``), so its pages exist; a mapping here still
    needs page-table entries. The read-write mapping is made on the first put, with MAP_POPULATE
    when the arena is backed (about 40 ms per GiB of arena, once), so every put then copies at
    memcpy speed; an arena that is not backed gets its pages as puts first write them. The read-only
    mapping is made on the first get without it: a got tensor's pages are mapped as they are first
    read, so a process pays only for the entries it touches. The numpy arrays over a mapping keep it
    alive as long as any tensor on it lives.
    """

    def __init__(self, fd: int, size: int, *, writable: bool = True, backed: bool = True) -> None:
        self.fd = fd
        self.size = size
        self.writable = writable
        self.backed = backed
        self._ro: np.ndarray | None = None
        self._rw: np.ndarray | None = None

    def _map(self, prot: int) -> np.ndarray:
        import numpy as np

        if prot & mmap.PROT_WRITE:
            populate = mmap.MAP_POPULATE if self.backed else 0
            m = mmap.mmap(self.fd, self.size, flags=mmap.MAP_SHARED | populate, prot=prot)
            return np.frombuffer(m, np.uint8)
        m = mmap.mmap(self.fd, self.size, flags=mmap.MAP_SHARED, prot=prot)
        # A numpy array over read-only memory that numpy and torch accept without warnings; the
        # kernel, not a flag, keeps the bytes read-only. The ctypes buffer holds the mmap alive.
        addr = np.frombuffer(m, np.uint8).ctypes.data
        buf: Any = (ctypes.c_uint8 * self.size).from_address(addr)
        buf._mmap = m
        return np.frombuffer(buf, np.uint8)

    @property
    def ro(self) -> np.ndarray:
        if self._ro is None:
            self._ro = self._map(mmap.PROT_READ)
        return self._ro

    @property
    def rw(self) -> np.ndarray:
        if self._rw is None:
            self._rw = self._map(mmap.PROT_READ | mmap.PROT_WRITE)
        return self._rw

    def close(self) -> None:
        # The mappings go when the last array over them does; the fd can go now.
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def contains(self, t: torch.Tensor) -> bool:
        """Whether a tensor's bytes lie in the read-only mapping (a zero-copy view of the arena)."""
        if self._ro is None:
            return False
        base = self._ro.ctypes.data
        ptr = t.untyped_storage().data_ptr()
        return base <= ptr < base + self.size
