"""The CUDA backend of the device interface: CUDA virtual memory, copy streams, IPC events.

WRITTEN AND REVIEWED, NEVER RUN: no session that wrote it had a GPU. ``scripts/gpu-check.sh`` runs
the CUDA half of tests/test_gpu_tier.py and a small bench on a machine that has one.

::

    start     cuInit; the device's primary context retained and made current (on every thread
              that calls the driver: the loop's executor threads and the two completion threads)
              refuse: no driver / no device N / no virtual memory management / no POSIX-fd export
    slab      cuMemCreate(n, pinned device memory, requestedHandleTypes = POSIX fd)
              cuMemExportToShareableHandle -> fd (sent to clients over SCM_RIGHTS)
              cuMemAddressReserve + cuMemMap + cuMemSetAccess(READWRITE) in the daemon, for copies
    copies    cuMemcpyHtoDAsync / cuMemcpyDtoHAsync on one stream per direction (non-blocking
              streams: the daemon's copies never wait for the default stream), then
              cuEventRecord of an event created CU_EVENT_INTERPROCESS | CU_EVENT_DISABLE_TIMING,
              whose cuIpcGetEventHandle (64 bytes) is the copy's ``event``; a completion thread
              per stream cuEventSynchronize-s events in order and sets each copy's ``done``
    free      cuMemUnmap + cuMemAddressFree + cuMemRelease; the physical memory lives on while a
              client still maps its import (the driver counts references)

What CUDA enforces, and what it does not: an exported POSIX fd carries the whole allocation; the
access a client gets is what it asks for in its own cuMemSetAccess. tierd's client maps every slab
read-only, but a hostile process holding the fd could map it read-write. Across uids the simulated
device's guarantee (the kernel refuses a writable mapping) is therefore NOT given by CUDA: on a
GPU, serve uids that do not trust each other from separate daemons.

Host memory: a copy from pageable memory is staged by the driver; :meth:`register_host` pins the
RAM tier's arena (cuMemHostRegister, portable) in 256 MiB pieces at start so that H2D copies run
at the pinned-copy bound.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import ctypes
import logging
import os
import queue
import threading
import time
from typing import Any

from tierd.gpu.device import Copy, Device, DeviceError, DeviceOOM, Slab

log = logging.getLogger("tierd.gpu")
REGISTER_PIECE = 256 << 20
#: CUipcEventHandle is 64 opaque bytes (the bindings expose them through getPtr())
IPC_HANDLE_BYTES = 64


def _driver() -> Any:
    try:
        from cuda.bindings import driver
    except ImportError as e:
        raise DeviceError(f"the CUDA backend needs cuda-bindings (pip install 'tierd[gpu]'): {e}") from None
    return driver


class _Cuda:
    """Calls into the driver that raise on failure with the error's name and text."""

    def __init__(self, drv: Any) -> None:
        self.drv = drv

    def __call__(self, fn: str, *args: Any) -> Any:
        drv = self.drv
        out = getattr(drv, fn)(*args)
        err, rest = out[0], out[1:]
        if err != drv.CUresult.CUDA_SUCCESS:
            _, name = drv.cuGetErrorName(err)
            _, text = drv.cuGetErrorString(err)
            name = name.decode() if isinstance(name, bytes) else str(name)
            text = text.decode() if isinstance(text, bytes) else str(text)
            if err == drv.CUresult.CUDA_ERROR_OUT_OF_MEMORY:
                raise DeviceOOM(f"{fn}: {name}: {text}")
            raise DeviceError(f"{fn}: {name}: {text}")
        if not rest:
            return None
        return rest[0] if len(rest) == 1 else rest


def _pcie_link(index: int) -> dict[str, int]:
    """The device's current PCIe generation and width from NVML; empty where NVML cannot say."""
    try:
        import pynvml
    except ImportError:
        return {}
    try:
        pynvml.nvmlInit()
        try:
            h = pynvml.nvmlDeviceGetHandleByIndex(index)
            return {
                "pcie_gen": int(pynvml.nvmlDeviceGetCurrPcieLinkGeneration(h)),
                "pcie_width": int(pynvml.nvmlDeviceGetCurrPcieLinkWidth(h)),
            }
        finally:
            pynvml.nvmlShutdown()
    except pynvml.NVMLError:
        return {}


class _Completions:
    """One thread per copy stream: waits on each recorded event in order, then sets its future."""

    def __init__(self, name: str, cu: _Cuda, ctx: Any) -> None:
        self._cu, self._ctx = cu, ctx
        self._q: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._t = threading.Thread(target=self._run, name=name, daemon=True)
        self._t.start()

    def add(self, event: Any, fut: concurrent.futures.Future[None], after: Any = None) -> None:
        self._q.put((event, fut, after))

    def _run(self) -> None:
        self._cu("cuCtxSetCurrent", self._ctx)
        while (job := self._q.get()) is not None:
            event, fut, after = job
            try:
                self._cu("cuEventSynchronize", event)
                if after is not None:
                    after()
            except BaseException as e:  # noqa: BLE001  # handed to the waiter, who raises it
                fut.set_exception(e)
                continue
            fut.set_result(None)

    def close(self) -> None:
        self._q.put(None)
        self._t.join(timeout=30)


class CudaDevice(Device):
    backend = "cuda"

    def __init__(self, index: int = 0) -> None:
        drv = _driver()
        cu = self._cu = _Cuda(drv)
        self.index = index
        try:
            cu("cuInit", 0)
        except DeviceError as e:
            raise DeviceError(f"CUDA driver not usable: {e}") from None
        except Exception as e:  # noqa: BLE001  # no libcuda: the bindings raise their own loader error
            raise DeviceError(f"no CUDA driver on this machine ({type(e).__name__}: {e})") from None
        count = cu("cuDeviceGetCount")
        if not 0 <= index < count:
            raise DeviceError(f"gpu_device: no CUDA device {index} (this machine has {count})")
        self._dev = cu("cuDeviceGet", index)
        attr = drv.CUdevice_attribute
        vmm = attr.CU_DEVICE_ATTRIBUTE_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED
        posix_fd = attr.CU_DEVICE_ATTRIBUTE_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR_SUPPORTED
        if not cu("cuDeviceGetAttribute", vmm, self._dev):
            raise DeviceError(f"CUDA device {index} has no virtual memory management (cuMemCreate)")
        if not cu("cuDeviceGetAttribute", posix_fd, self._dev):
            raise DeviceError(f"CUDA device {index} cannot export memory as a POSIX fd (driver too old?)")
        self._ctx = cu("cuDevicePrimaryCtxRetain", self._dev)
        cu("cuCtxSetCurrent", self._ctx)
        raw = cu("cuDeviceGetName", 256, self._dev)
        self._name = raw.split(b"\0", 1)[0].decode(errors="replace") if isinstance(raw, bytes) else str(raw)
        self._total = int(cu("cuDeviceTotalMem", self._dev))
        prop = drv.CUmemAllocationProp()
        prop.type = drv.CUmemAllocationType.CU_MEM_ALLOCATION_TYPE_PINNED
        prop.location.type = drv.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
        prop.location.id = index
        prop.requestedHandleTypes = drv.CUmemAllocationHandleType.CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR
        self._prop = prop
        gran = int(cu("cuMemGetAllocationGranularity", prop,
                      drv.CUmemAllocationGranularity_flags.CU_MEM_ALLOC_GRANULARITY_RECOMMENDED))  # fmt: skip
        self.granularity = max(gran, 2 << 20)
        access = drv.CUmemAccessDesc()
        access.location = prop.location
        access.flags = drv.CUmemAccess_flags.CU_MEM_ACCESS_FLAGS_PROT_READWRITE
        self._access = access
        flags = drv.CUstream_flags.CU_STREAM_NON_BLOCKING
        self._h2d = cu("cuStreamCreate", flags)
        self._d2h = cu("cuStreamCreate", flags)
        self._ev_flags = drv.CUevent_flags.CU_EVENT_INTERPROCESS | drv.CUevent_flags.CU_EVENT_DISABLE_TIMING
        self._done_h2d = _Completions("tierd-gpu-h2d", cu, self._ctx)
        self._done_d2h = _Completions("tierd-gpu-d2h", cu, self._ctx)
        self._gen = 0
        self._slabs: dict[int, Slab] = {}
        self._registered: list[int] = []
        self._lock = threading.Lock()
        self._closed = False

    def _current(self) -> None:
        self._cu("cuCtxSetCurrent", self._ctx)  # per calling thread (executor threads vary)

    # -- the device interface --------------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        drv = self._cu.drv
        self._current()
        attr = drv.CUdevice_attribute
        out: dict[str, Any] = {"backend": self.backend, "name": self._name, "index": self.index,
                               "total_bytes": self._total, "free_bytes": self.free_bytes(),
                               "granularity": self.granularity}  # fmt: skip
        with contextlib.suppress(DeviceError):
            bus = attr.CU_DEVICE_ATTRIBUTE_PCI_BUS_ID
            out["pci_bus"] = int(self._cu("cuDeviceGetAttribute", bus, self._dev))
        out.update(_pcie_link(self.index))
        return out

    @property
    def total_bytes(self) -> int:
        return self._total

    def free_bytes(self) -> int:
        self._current()
        free, _total = self._cu("cuMemGetInfo")
        return int(free)

    def create_slab(self, nbytes: int) -> Slab:
        if nbytes <= 0 or nbytes % self.granularity:
            raise ValueError(f"a slab is a positive multiple of {self.granularity} bytes, not {nbytes}")
        cu, drv = self._cu, self._cu.drv
        self._current()
        handle = cu("cuMemCreate", nbytes, self._prop, 0)  # DeviceOOM when the device is full
        ptr = None
        try:
            posix_fd = drv.CUmemAllocationHandleType.CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR
            fd = int(cu("cuMemExportToShareableHandle", handle, posix_fd, 0))
            ptr = cu("cuMemAddressReserve", nbytes, self.granularity, 0, 0)
            cu("cuMemMap", ptr, nbytes, 0, handle, 0)
            cu("cuMemSetAccess", ptr, nbytes, [self._access], 1)
        except BaseException:
            if ptr is not None:
                cu("cuMemAddressFree", ptr, nbytes)
            cu("cuMemRelease", handle)
            raise
        with self._lock:
            self._gen += 1
            slab = Slab(self._gen, nbytes, fd, {"handle": handle, "ptr": ptr})
            self._slabs[slab.generation] = slab
        return slab

    def client_fd(self, slab: Slab) -> int:
        return slab.fd  # CUDA has no read-only fd: see the module docstring

    def free_slab(self, slab: Slab) -> None:
        if self._slabs.pop(slab.generation, None) is None:
            return
        cu = self._cu
        self._current()
        ptr, handle = slab.impl["ptr"], slab.impl["handle"]
        cu("cuMemUnmap", ptr, slab.nbytes)
        cu("cuMemAddressFree", ptr, slab.nbytes)
        cu("cuMemRelease", handle)
        os.close(slab.fd)

    def _copy(self, direction: str, slab: Slab, offset: int, host: memoryview) -> Copy:
        import numpy as np

        cu = self._cu
        self._current()
        n = len(host)
        if slab.generation not in self._slabs or offset < 0 or offset + n > slab.nbytes:
            raise ValueError(f"copy outside slab {slab.generation}: [{offset}, {offset + n})")
        host_ptr = np.frombuffer(host, np.uint8).ctypes.data
        dev_ptr = int(slab.impl["ptr"]) + offset
        event = cu("cuEventCreate", self._ev_flags)
        if direction == "h2d":
            stream, done = self._h2d, self._done_h2d
            cu("cuMemcpyHtoDAsync", dev_ptr, host_ptr, n, stream)
        else:
            stream, done = self._d2h, self._done_d2h
            cu("cuMemcpyDtoHAsync", host_ptr, dev_ptr, n, stream)
        cu("cuEventRecord", event, stream)
        ipc = cu("cuIpcGetEventHandle", event)
        fut: concurrent.futures.Future[None] = concurrent.futures.Future()
        # the event is destroyed once it has completed (clients that opened it keep their handle)
        done.add(event, fut, after=lambda: cu("cuEventDestroy", event))
        return Copy(ctypes.string_at(ipc.getPtr(), IPC_HANDLE_BYTES), fut)

    def upload(self, slab: Slab, offset: int, src: memoryview) -> Copy:
        return self._copy("h2d", slab, offset, src)

    def download(self, slab: Slab, offset: int, dst: memoryview) -> Copy:
        return self._copy("d2h", slab, offset, dst)

    def register_host(self, address: int, nbytes: int) -> float:
        """Pin host memory (the RAM arena) for fast copies, in pieces; returns the seconds it took."""
        drv = self._cu.drv
        self._current()
        t0 = time.perf_counter()
        for start in range(0, nbytes, REGISTER_PIECE):
            n = min(REGISTER_PIECE, nbytes - start)
            self._cu("cuMemHostRegister", address + start, n, drv.CU_MEMHOSTREGISTER_PORTABLE)
            self._registered.append(address + start)
        took = time.perf_counter() - t0
        log.info("pinned %.2f GiB of host memory for GPU copies in %.2fs", nbytes / 2**30, took)
        return took

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._done_h2d.close()
        self._done_d2h.close()
        self._current()
        for slab in list(self._slabs.values()):
            self.free_slab(slab)
        for address in self._registered:
            self._cu("cuMemHostUnregister", address)
        self._cu("cuDevicePrimaryCtxRelease", self._dev)
