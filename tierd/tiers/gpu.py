"""The GPU tier: device memory owned by the daemon, in slabs, shared with clients by fd.

It sits ABOVE the home tier (``tiers = "gpu,ram,disk"``): puts land in RAM as always, and a copy
reaches the GPU by promotion (``get(key, tier="gpu")``, ``pin(key, "gpu")``, a put of a CUDA
tensor). Its device is one of :mod:`tierd.gpu`'s backends (:class:`~tierd.gpu.device.Device`)::

    daemon                                         client (tierd_client.gpu)
    ------                                         ------
    slabs: multiples of the device's granularity,  WELCOME (or HELLO arenas_only) names every
      at most the tier's capacity in all; one        slab (space = its generation) with its fd;
      Allocator per slab; a slab belongs to one      the client imports the slabs it reads from,
      uid (the one whose entries it holds), is       maps them READ-ONLY, and serves each lease as
      made when that uid's slabs are full and        a view of one uint8 base per slab
      freed as soon as it is empty
    promotion ram -> gpu: device.upload on the     GOT(..., space, offset, event): the client
      H2D copy stream; the GOT reply goes out         waits on ``event`` (or makes its stream wait)
      before the copy is done, carrying its event     before the tensor is read
    demotion gpu -> ram: device.download (waits
      for the upload first)

A location is ``generation * STRIDE + offset``. Generations are never reused while the daemon runs,
so a client never reads a new slab through an old mapping: a space it does not know makes it fetch
the slab list again, and a slab gone from the list is one it may drop once its tensors are gone.

The rest of the daemon treats this like any memory tier (allocate, free, ceiling, quota-free), with
one difference: its memory is not host-visible (``host_visible = False``), so moves copy through
:meth:`upload` / :meth:`download` instead of ``view``. A copy in flight keeps its version protected
(:mod:`tierd.moves`), so neither the source nor the slab region is reused under it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from tierd.alloc import Allocator, round_up
from tierd.gpu.device import Copy, Device, DeviceError, DeviceOOM, Slab
from tierd.protocol import MAX_SLABS
from tierd.tiers.memory import MapHandle, MemoryTier, Space

#: location = generation * STRIDE + offset (a slab is far smaller than 1 TiB)
STRIDE = 1 << 40
#: the largest slab made for small entries (entries larger than that get a slab of their own size)
MAX_SLAB = 256 << 20


@dataclass(eq=False)
class _Held:
    slab: Slab
    uid: int
    alloc: Allocator


class GpuTier(MemoryTier):
    host_visible: ClassVar[bool] = False

    def __init__(self, device: Device, capacity: int, *, name: str = "gpu") -> None:
        self.name = name
        self.device = device
        gran = device.granularity
        capacity -= capacity % gran
        if capacity <= 0:
            raise DeviceError(f"the GPU tier needs at least one {gran >> 20} MiB granule (gpu_bytes)")
        free = device.free_bytes()
        if free < capacity:
            raise DeviceError(
                f"gpu_bytes: {capacity / 2**30:.2f} GiB asked but device {device.index} has "
                f"{free / 2**30:.2f} GiB free of {device.total_bytes / 2**30:.2f} GiB; lower --gpu-bytes"
            )
        self._capacity = capacity
        #: size of a slab made for entries smaller than it
        self.slab_bytes = min(MAX_SLAB, max(gran, round_up(capacity // 8, gran)))
        self.ceiling = capacity
        self._held: dict[int, _Held] = {}  # generation -> slab
        self._used = 0
        self._slab_total = 0
        self._pending: dict[int, Copy] = {}  # location -> its upload, until freed
        self.slabs_made = 0
        self.slabs_freed = 0
        self.device_oom = 0
        #: GB/s of the copy path measured at start (:meth:`measure_copies`), for status
        self.copy_gbps: dict[str, float] = {}
        self._closed = False

    # -- slabs -----------------------------------------------------------------------------------
    def _at(self, location: int) -> tuple[_Held, int]:
        gen, offset = divmod(location, STRIDE)
        return self._held[gen], offset

    def split(self, location: int) -> tuple[int, int]:
        return divmod(location, STRIDE)

    def _new_slab(self, size: int, owner: int) -> _Held | None:
        n = max(self.slab_bytes, round_up(size, self.device.granularity))
        if self._slab_total + n > self._capacity or len(self._held) >= MAX_SLABS:
            return None
        try:
            slab = self.device.create_slab(n)
        except DeviceOOM:
            self.device_oom += 1
            return None
        h = _Held(slab, owner, Allocator(n))
        self._held[slab.generation] = h
        self._slab_total += n
        self.slabs_made += 1
        return h

    # -- the memory tier interface ---------------------------------------------------------------
    @property
    def capacity_bytes(self) -> int:
        return self._capacity

    @property
    def used_bytes(self) -> int:
        return self._used

    def region_bytes(self, nbytes: int) -> int:
        return round_up(max(nbytes, 1))

    def reserve(self, nbytes: int, owner: int = 0) -> int | None:
        size = self.region_bytes(nbytes)
        if self._used + size > self._capacity:
            return None
        for gen, h in self._held.items():
            if h.uid == owner:
                offset = h.alloc.alloc(nbytes)
                if offset is not None:
                    self._used += size
                    return gen * STRIDE + offset
        new = self._new_slab(size, owner)
        if new is None:
            return None
        offset = new.alloc.alloc(nbytes)
        assert offset is not None
        self._used += size
        return new.slab.generation * STRIDE + offset

    def free(self, location: int) -> int:
        h, offset = self._at(location)
        size = h.alloc.free(offset)
        self._used -= size
        self._pending.pop(location, None)
        if h.alloc.used_bytes == 0:  # an empty slab goes back at once
            del self._held[h.slab.generation]
            self._slab_total -= h.slab.nbytes
            self.device.free_slab(h.slab)
            self.slabs_freed += 1
        return size

    def view(self, offset: int, nbytes: int) -> memoryview:
        raise TypeError("GPU memory is not host-visible: use upload / download")

    def upload(self, location: int, src: memoryview) -> Copy:
        """Queue the copy of ``src`` into a region (on the loop: it only queues)."""
        h, offset = self._at(location)
        c = self.device.upload(h.slab, offset, src)
        self._pending[location] = c
        return c

    def event_of(self, location: int) -> bytes:
        """The event a reader of ``location`` waits on: the upload's, until it has finished."""
        c = self._pending.get(location)
        return c.event if c is not None and not c.done.done() else b""

    def download(self, location: int, dst: memoryview) -> None:
        """Copy a region out into host memory (blocking: run it in an executor); waits for the
        region's upload first."""
        h, offset = self._at(location)
        c = self._pending.get(location)
        if c is not None:
            c.done.result()
        self.device.download(h.slab, offset, dst).done.result()

    def map_handles(self, uid: int) -> list[MapHandle]:
        """Every slab, read-only for every uid: no client writes device memory (puts go through RAM)."""
        dev = self.device
        held = self._held.items()
        return [MapHandle(dev.client_fd(h.slab), h.slab.nbytes, g, False, False) for g, h in held]

    def event_fd(self) -> int:
        return self.device.event_fd()

    def measure_copies(self, nbytes: int = 32 << 20) -> dict[str, float]:
        """Time one host -> device and one device -> host copy of ``nbytes`` through a slab of its
        own (blocking: run it off the loop, once, at start); GB/s for status. On the simulated
        device the deliberate delay is part of what is measured."""
        import time

        n = round_up(nbytes, self.device.granularity)
        try:
            slab = self.device.create_slab(n)
        except DeviceOOM:
            return {}
        try:
            buf = memoryview(bytearray(n))
            t0 = time.perf_counter()
            self.device.upload(slab, 0, buf).done.result()
            t1 = time.perf_counter()
            self.device.download(slab, 0, buf).done.result()
            t2 = time.perf_counter()
        finally:
            self.device.free_slab(slab)
        self.copy_gbps = {"h2d": round(n / (t1 - t0) / 1e9, 2), "d2h": round(n / (t2 - t1) / 1e9, 2)}
        return self.copy_gbps

    def register_host(self, buf: Any) -> float:
        """Pin the host memory ``buf`` (the RAM tier's arena) for the device's copies; seconds taken."""
        import numpy as np

        return self.device.register_host(int(np.frombuffer(buf, np.uint8).ctypes.data), len(buf))

    def space(self) -> Space:
        free = self._capacity - self._used
        largest = max((h.alloc.largest_free() for h in self._held.values()), default=0)
        largest = max(largest, self._capacity - self._slab_total)
        return Space(self._capacity, free, min(free, largest))

    def check(self) -> None:
        for h in self._held.values():
            h.alloc.check()
            assert h.alloc.used_bytes > 0, "an empty slab was kept"
        assert sum(h.alloc.used_bytes for h in self._held.values()) == self._used
        assert sum(h.slab.nbytes for h in self._held.values()) == self._slab_total <= self._capacity

    def stats(self) -> dict[str, Any]:
        return {
            "capacity_bytes": self._capacity,
            "used_bytes": self._used,
            "free_bytes": self._capacity - self._used,
            "slab_bytes": self._slab_total,
            "slabs": len(self._held),
            "slabs_made": self.slabs_made,
            "slabs_freed": self.slabs_freed,
            "device_oom": self.device_oom,
            "copy_gbps": self.copy_gbps,
            "device": self.device.describe(),
        }

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.device.close()
