"""The device interface the GPU tier (:mod:`tierd.tiers.gpu`) runs on, whatever the device is.

A device owns physical memory in slabs and copies between host memory and slabs asynchronously::

    create_slab(n) -> Slab           n a multiple of ``granularity``; DeviceOOM when the device
                                      cannot back it (never a crash)
    slab.fd                          the daemon's exportable fd of the slab (sent to clients over
                                      SCM_RIGHTS; a client imports it and maps it read-only)
    client_fd(slab) -> fd            the fd a client is sent (read-only where the backend can say so)
    upload(slab, offset, src) -> Copy     host -> slab, queued on the H2D copy stream
    download(slab, offset, dst) -> Copy   slab -> host, queued on the D2H copy stream
    free_slab(slab)                  the daemon's handle goes; the memory lives while a client
                                      still maps it (then the client's unmap frees it)
    event_fd() -> fd | -1            an fd clients need to wait on events (simulated: the event
                                      table), -1 when events travel as handles alone (CUDA)

A :class:`Copy` is queued work that finishes later. Its ``event`` (bytes, opaque to everything but
the backend's client half, :mod:`tierd_client.gpu`) travels in the GOT reply: the client waits on
it before the tensor is used. Its ``done`` is a concurrent future set when the copy has finished,
which the daemon awaits (``asyncio.wrap_future``) before it reads, frees or overwrites the bytes.
Copies in one direction complete in the order they were queued.

What each backend enforces is stated in its module and in docs/tiers.md.
"""

from __future__ import annotations

import concurrent.futures
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

BACKENDS = ("auto", "cuda", "simulated")


class DeviceError(RuntimeError):
    """The device cannot be used (no driver, no such device, no fd export). Not recoverable by
    retrying: the daemon refuses to start with the message (exit 2)."""


class DeviceOOM(RuntimeError):
    """The device has no memory for one more slab now. Recoverable: the tier answers TierFull."""


@dataclass(eq=False)
class Slab:
    """One piece of physical device memory, created and freed whole."""

    #: never reused while the daemon runs: a client never mistakes a new slab for an old one
    generation: int
    nbytes: int
    #: the daemon's exportable fd (closed by free_slab)
    fd: int
    #: backend state (the simulated device's mapping; CUDA's allocation handle and address)
    impl: Any = None


@dataclass(eq=False)
class Copy:
    """A queued copy: ``event`` for clients, ``done`` for the daemon."""

    event: bytes
    done: concurrent.futures.Future[None]


class Device(ABC):
    #: "simulated" or "cuda": what status shows
    backend: str
    #: slab sizes are multiples of this
    granularity: int
    #: the device's index (``--gpu-device``)
    index: int = 0

    @abstractmethod
    def describe(self) -> dict[str, Any]:
        """Name, total and free memory and what else status shows about the device."""

    @property
    @abstractmethod
    def total_bytes(self) -> int:
        """The device's whole memory (``--gpu-bytes 25%`` is a share of this)."""

    @abstractmethod
    def free_bytes(self) -> int:
        """Device memory free now (the tier refuses to start when below its capacity)."""

    @abstractmethod
    def create_slab(self, nbytes: int) -> Slab:
        """A new slab of ``nbytes`` (a multiple of ``granularity``); DeviceOOM when it cannot."""

    @abstractmethod
    def client_fd(self, slab: Slab) -> int:
        """The fd to send a client for ``slab`` (kept by the device; closed with the slab)."""

    @abstractmethod
    def free_slab(self, slab: Slab) -> None:
        """Give the slab back (its memory lives on in processes that still map it)."""

    @abstractmethod
    def upload(self, slab: Slab, offset: int, src: memoryview) -> Copy:
        """Queue a host -> slab copy; ``src`` must stay unchanged until ``done``."""

    @abstractmethod
    def download(self, slab: Slab, offset: int, dst: memoryview) -> Copy:
        """Queue a slab -> host copy into ``dst``; its bytes are there once ``done``."""

    def event_fd(self) -> int:
        """An fd clients map to wait on events, or -1 when none is needed."""
        return -1

    def register_host(self, address: int, nbytes: int) -> float:
        """Pin host memory that copies come from and go to (the RAM arena), once, at start;
        returns the seconds it took. Nothing to do where the device copies with memcpy."""
        return 0.0

    @abstractmethod
    def close(self) -> None:
        """Stop the copy workers and free every slab still held. Idempotent."""
