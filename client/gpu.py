"""The client half of the GPU tier: the slabs a client maps (read-only) and the events it waits on.

A WELCOME from a daemon with a GPU tier names its backend and every slab (``space`` = the slab's
generation, never reused), with one fd each, plus the event table's fd for the simulated device.
The client maps a slab on the first get that reads from it; a get's GOT names, per item, the slab,
the offset and the event of a copy still in flight::

    GOT(..., space, offset, event)
      -> base = slabs[space]                              mapped once, READ-ONLY
      -> tensor = view of base[offset : offset + nbytes]  (no byte is copied)
      -> wait(event) before the tensor is read            simulated: until the event table's slot
                                                          reaches the copy's seq; CUDA: the current
                                                          stream waits on the IPC event

A client that reads before waiting reads the slab's old bytes (tests/test_gpu_tier.py shows it on
the simulated device). ``get(..., tier="gpu")`` waits by default; ``wait=False`` leaves it to the
caller (:meth:`Client.wait_gpu`), so a model's compute stream waits only for what it reads.

Backends: the simulated device's half is here (its slabs are memfds: a numpy array over a
read-only mmap); CUDA's is :mod:`tierd_client.gpu_cuda`, the only client module that imports
cuda bindings, loaded when a daemon says its backend is cuda.
"""

from __future__ import annotations

import os
import struct
import time
from typing import TYPE_CHECKING, Any

from tierd.errors import DaemonTimeout, ProtocolError
from tierd_client.arena import Arena

if TYPE_CHECKING:
    import numpy as np

    from tierd import protocol

EVENT = struct.Struct("<IQ")  # the simulated device's (slot, seq)
EVENT_SLOTS = 4096


class GpuSlabs:
    """The daemon's GPU slabs as this client sees them, and how it waits on their copies."""

    def __init__(self, info: protocol.GpuInfo) -> None:
        self.backend = info.backend
        self.device = info.device
        self.slabs: dict[int, Any] = {}  # space -> mapping (Arena for simulated, CUDA import)
        self._events: np.ndarray | None = None
        self._events_arena: Arena | None = None
        self._cuda: Any = None
        if self.backend == "cuda":
            from tierd_client.gpu_cuda import CudaImporter

            self._cuda = CudaImporter(self.device)
        elif self.backend != "simulated":
            raise ProtocolError(f"the daemon's GPU tier runs on an unknown backend {self.backend!r}")

    def update(self, info: protocol.GpuInfo, fds: list[int]) -> None:
        """Take a WELCOME's slab list and fds (slabs, then the event table's when ``info.events``):
        new slabs are kept unmapped until read; slabs gone from the list are forgotten (their
        memory goes when the last tensor over them does)."""
        need = len(info.slabs) + (1 if info.events else 0)
        if len(fds) != need:
            for fd in fds:
                os.close(fd)
            raise ProtocolError("the daemon's WELCOME did not carry its GPU slabs")
        listed = {s.space for s in info.slabs}
        for space in [s for s in self.slabs if s not in listed]:
            self._close(self.slabs.pop(space))
        for s, fd in zip(info.slabs, fds, strict=False):
            if s.space in self.slabs:
                os.close(fd)
            elif self._cuda is not None:
                self.slabs[s.space] = self._cuda.slab(fd, s.nbytes)
            else:
                self.slabs[s.space] = Arena(fd, s.nbytes, writable=False, backed=False)
        if info.events:
            fd = fds[-1]
            if self._events_arena is None:
                self._events_arena = Arena(fd, EVENT_SLOTS * 8, writable=False, backed=False)
                self._events = self._events_arena.ro.view("<u8")
            else:
                os.close(fd)

    def __contains__(self, space: int) -> bool:
        return space in self.slabs

    def view(self, space: int, offset: int, nbytes: int) -> tuple[Any, Any]:
        """A uint8 tensor over ``nbytes`` of a slab, and the object that holds its bytes mapped
        for as long as any view of the tensor lives (the lease ends when it is collected)."""
        slab = self.slabs[space]
        if self._cuda is not None:
            return self._cuda.view(slab, offset, nbytes)
        import torch

        region = slab.ro[offset : offset + nbytes]
        return torch.from_numpy(region), region

    def ready(self, event: bytes) -> bool:
        """Whether the copy behind ``event`` is done (simulated device; CUDA: always True, since
        the wait is handed to the stream by :meth:`wait`)."""
        if not event or self._cuda is not None:
            return True
        if self._events is None:
            raise ProtocolError("the daemon sent a GPU event but no event table")
        slot, seq = EVENT.unpack(event)
        return int(self._events[slot % EVENT_SLOTS]) >= seq

    def wait(self, events: list[bytes], timeout: float | None) -> None:
        """Make the bytes behind ``events`` safe to read: simulated, block until each copy is done
        (backing off from 20 us to 1 ms between looks); CUDA, make the current stream wait."""
        events = [e for e in events if e]
        if not events:
            return
        if self._cuda is not None:
            for ev in dict.fromkeys(events):
                self._cuda.stream_wait(ev)
            return
        deadline = None if timeout is None else time.monotonic() + timeout
        pause = 20e-6
        for ev in events:
            while not self.ready(ev):
                if deadline is not None and time.monotonic() > deadline:
                    raise DaemonTimeout(f"a GPU copy did not complete within {timeout}s")
                time.sleep(pause)
                pause = min(pause * 2, 1e-3)

    @staticmethod
    def _close(slab: Any) -> None:
        close = getattr(slab, "close", None)
        if close is not None:
            close()

    def close(self) -> None:
        for slab in self.slabs.values():
            self._close(slab)
        self.slabs.clear()
        if self._events_arena is not None:
            self._events_arena.close()
