"""The simulated device: the device interface honestly implemented on the CPU, for CI and demos.

It is a test and demo tool (named so in ``--help`` and status), never picked by ``auto``. It keeps
the properties GPU-tier code depends on, so that code runs the same logic here as on CUDA::

    slab      a memfd of the slab's size (sparse: pages come as copies write them), sealed against
              shrink and grow, mode 0600; clients get an O_RDONLY reopen of it (through /proc), so
              the kernel refuses them a writable mapping: a client can read slabs, never write one
    copies    queued to one worker thread per direction (H2D, D2H), each started no earlier than
              ``delay`` after it was queued: the bytes land LATE, after the reply that names them
    events    a table of EVENT_SLOTS uint64 slots in a memfd that clients map read-only; a copy's
              event is (slot, seq) and the worker stores seq in the slot when the copy is done. A
              client waits until slot >= seq (copies of one direction finish in order, so a slot
              reused by a later copy only holds a larger seq). A client that reads without waiting
              reads the slab's old bytes: tests/test_gpu_tier.py shows it
    capacity  ``total_bytes`` of "device memory": a slab that would pass it is DeviceOOM

What it does not simulate: a separate address space (the daemon copies with memcpy through its own
mapping) and device speed (copies run at memcpy speed after the delay).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import fcntl
import mmap
import os
import queue
import struct
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from tierd.gpu.device import Copy, Device, DeviceError, DeviceOOM, Slab

#: how many events can be in flight before a slot is reused (a reuse only raises its seq)
EVENT_SLOTS = 4096
EVENT = struct.Struct("<IQ")  # slot, seq: what a client is sent
GRANULARITY = 2 << 20


def _memfd(name: str, nbytes: int) -> int:
    fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, nbytes)
        os.fchmod(fd, 0o600)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
    except OSError:
        os.close(fd)
        raise
    return fd


def _readonly(fd: int) -> int:
    return os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC)


class _Stream:
    """One copy direction: a worker thread running queued copies in order, each no earlier than
    ``delay`` seconds after it was queued."""

    def __init__(self, name: str, delay: float, signal: Callable[[int, int], None]) -> None:
        self.delay = delay
        self._signal = signal
        self._q: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._t = threading.Thread(target=self._run, name=name, daemon=True)
        self._t.start()

    def submit(self, fn: Callable[[], None], slot: int, seq: int) -> concurrent.futures.Future[None]:
        fut: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._q.put((time.monotonic() + self.delay, fn, slot, seq, fut))
        return fut

    def _run(self) -> None:
        while True:
            job = self._q.get()
            if job is None:
                return
            due, fn, slot, seq, fut = job
            wait = due - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            try:
                fn()
            except BaseException as e:  # noqa: BLE001  # handed to the waiter, who raises it
                self._signal(slot, seq)
                fut.set_exception(e)
                continue
            self._signal(slot, seq)
            fut.set_result(None)

    def close(self) -> None:
        self._q.put(None)
        self._t.join(timeout=30)


class SimulatedDevice(Device):
    backend = "simulated"
    granularity = GRANULARITY

    def __init__(self, *, index: int = 0, total_bytes: int = 4 << 30, delay_s: float = 0.02) -> None:
        if total_bytes < GRANULARITY:
            raise DeviceError("the simulated device needs at least one 2 MiB granule")
        self.index = index
        self._total = total_bytes - total_bytes % GRANULARITY
        self._used = 0
        self._lock = threading.Lock()
        self._gen = 0
        self._events_fd = _memfd(f"tierd-gpu-events-{index}", EVENT_SLOTS * 8)
        self._events_mm = mmap.mmap(self._events_fd, EVENT_SLOTS * 8)
        self._events = np.frombuffer(self._events_mm, np.uint64)
        self._events_ro = _readonly(self._events_fd)
        self._seq = 0
        self.h2d = _Stream("tierd-gpu-h2d", delay_s, self._signal)
        self.d2h = _Stream("tierd-gpu-d2h", delay_s, self._signal)
        self._slabs: dict[int, Slab] = {}
        self._closed = False

    # -- the device interface --------------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        return {
            "backend": self.backend,
            "name": "simulated device (a test and demo tool: memfd slabs, late copies)",
            "index": self.index,
            "total_bytes": self._total,
            "free_bytes": self.free_bytes(),
            "delay_ms": self.h2d.delay * 1000,
        }

    @property
    def total_bytes(self) -> int:
        return self._total

    def free_bytes(self) -> int:
        return self._total - self._used

    def create_slab(self, nbytes: int) -> Slab:
        if nbytes <= 0 or nbytes % GRANULARITY:
            raise ValueError(f"a slab is a positive multiple of {GRANULARITY} bytes, not {nbytes}")
        with self._lock:
            if self._used + nbytes > self._total:
                raise DeviceOOM(
                    f"simulated device {self.index}: {nbytes} bytes asked, {self._total - self._used} free"
                )
            self._used += nbytes
            self._gen += 1
            gen = self._gen
        try:
            fd = _memfd(f"tierd-gpu-slab-{gen}", nbytes)
        except OSError as e:
            with self._lock:
                self._used -= nbytes
            raise DeviceOOM(f"simulated device {self.index}: cannot make a slab: {e.strerror}") from None
        mm = mmap.mmap(fd, nbytes)
        slab = Slab(gen, nbytes, fd, {"mmap": mm, "ro_fd": _readonly(fd)})
        self._slabs[gen] = slab
        return slab

    def client_fd(self, slab: Slab) -> int:
        return int(slab.impl["ro_fd"])

    def free_slab(self, slab: Slab) -> None:
        if self._slabs.pop(slab.generation, None) is None:
            return
        with contextlib.suppress(BufferError):  # a view still exported: it goes with the process
            slab.impl["mmap"].close()
        os.close(slab.impl["ro_fd"])
        os.close(slab.fd)
        with self._lock:
            self._used -= slab.nbytes

    def _next_event(self) -> tuple[int, int, bytes]:
        self._seq += 1
        slot = self._seq % EVENT_SLOTS
        return slot, self._seq, EVENT.pack(slot, self._seq)

    def _signal(self, slot: int, seq: int) -> None:
        self._events[slot] = max(int(self._events[slot]), seq)

    def upload(self, slab: Slab, offset: int, src: memoryview) -> Copy:
        self._check(slab, offset, len(src))
        dst = memoryview(slab.impl["mmap"])[offset : offset + len(src)]
        slot, seq, ev = self._next_event()
        return Copy(ev, self.h2d.submit(lambda: _memcpy(dst, src), slot, seq))

    def download(self, slab: Slab, offset: int, dst: memoryview) -> Copy:
        self._check(slab, offset, len(dst))
        src = memoryview(slab.impl["mmap"])[offset : offset + len(dst)]
        slot, seq, ev = self._next_event()
        return Copy(ev, self.d2h.submit(lambda: _memcpy(dst, src), slot, seq))

    def _check(self, slab: Slab, offset: int, n: int) -> None:
        if slab.generation not in self._slabs or offset < 0 or offset + n > slab.nbytes:
            raise ValueError(f"copy outside slab {slab.generation}: [{offset}, {offset + n})")

    def event_fd(self) -> int:
        return self._events_ro

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.h2d.close()
        self.d2h.close()
        for slab in list(self._slabs.values()):
            self.free_slab(slab)
        del self._events
        with contextlib.suppress(BufferError):
            self._events_mm.close()
        os.close(self._events_ro)
        os.close(self._events_fd)


def _memcpy(dst: memoryview, src: memoryview) -> None:
    np.copyto(np.frombuffer(dst, np.uint8), np.frombuffer(src, np.uint8))
