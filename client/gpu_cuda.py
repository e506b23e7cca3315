"""The CUDA half of the client's GPU tier: import a slab's fd, map it read-only, wait on events.

WRITTEN AND REVIEWED, NEVER RUN: no session that wrote it had a GPU (``scripts/gpu-check.sh`` runs
it where there is one). The only client module that imports cuda bindings (DESIGN invariant 8).

::

    slab(fd)      cuMemImportFromShareableHandle(fd, POSIX fd) -> allocation handle (fd closed
                  after); cuMemAddressReserve + cuMemMap; cuMemSetAccess(PROT_READ) on this device
    view          a CUDA uint8 tensor over [base + offset, + nbytes), made through
                  __cuda_array_interface__ (torch does not copy it); the holder object keeps the
                  slab mapped while any tensor over it lives
    stream_wait   cuIpcOpenEventHandle (cached per handle) + cuStreamWaitEvent on torch's
                  current stream: the compute stream waits for the copy, the host does not

A failure to import (a driver without fd export, another device, a CUDA context that cannot be
made) raises GpuImportError naming the driver call and its error; the daemon is unaffected.
"""

from __future__ import annotations

import ctypes
import os
import weakref
from typing import Any

from tierd.errors import GpuImportError


class _Holder:
    """What a CUDA tensor over a slab holds: the slab's mapping stays while one lives."""

    def __init__(self, slab: Any, ptr: int, nbytes: int) -> None:
        self.slab = slab
        self.__cuda_array_interface__ = {
            "shape": (nbytes,),
            "typestr": "|u1",
            "data": (ptr, False),  # tierd maps the slab read-only: a write faults on the device
            "version": 3,
        }


class _Slab:
    def __init__(self, imp: CudaImporter, handle: Any, ptr: int, nbytes: int) -> None:
        self.imp, self.handle, self.ptr, self.nbytes = imp, handle, ptr, nbytes
        self._fin = weakref.finalize(self, imp.unmap, handle, ptr, nbytes)

    def close(self) -> None:
        """Forget it: the mapping goes when no tensor holds the slab any more."""


class CudaImporter:
    def __init__(self, device: int) -> None:
        try:
            from cuda.bindings import driver
        except ImportError as e:
            why = f"reading the GPU tier needs cuda-bindings (pip install tierd[gpu]): {e}"
            raise GpuImportError(why) from None
        self.drv = driver
        self.device = device
        try:
            self._call("cuInit", 0)
        except GpuImportError:
            raise
        except Exception as e:  # noqa: BLE001  # no libcuda: the bindings raise their own loader error
            raise GpuImportError(f"no CUDA driver in this process ({type(e).__name__}: {e})") from None
        dev = self._call("cuDeviceGet", device)
        # torch's own context on this device is the primary one: share it
        self._ctx = self._call("cuDevicePrimaryCtxRetain", dev)
        self._call("cuCtxSetCurrent", self._ctx)
        access = driver.CUmemAccessDesc()
        access.location.type = driver.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
        access.location.id = device
        access.flags = driver.CUmemAccess_flags.CU_MEM_ACCESS_FLAGS_PROT_READ
        self._access = access

    def _call(self, fn: str, *args: Any) -> Any:
        drv = self.drv
        out = getattr(drv, fn)(*args)
        err, rest = out[0], out[1:]
        if err != drv.CUresult.CUDA_SUCCESS:
            _, name = drv.cuGetErrorName(err)
            name = name.decode() if isinstance(name, bytes) else str(name)
            raise GpuImportError(f"cannot import the daemon's GPU slab: {fn} failed with {name}")
        if not rest:
            return None
        return rest[0] if len(rest) == 1 else rest

    def slab(self, fd: int, nbytes: int) -> _Slab:
        drv = self.drv
        self._call("cuCtxSetCurrent", self._ctx)
        try:
            posix_fd = drv.CUmemAllocationHandleType.CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR
            handle = self._call("cuMemImportFromShareableHandle", fd, posix_fd)
        finally:
            os.close(fd)  # the import holds the memory; the fd is not needed any more
        ptr = self._call("cuMemAddressReserve", nbytes, 0, 0, 0)
        self._call("cuMemMap", ptr, nbytes, 0, handle, 0)
        self._call("cuMemSetAccess", ptr, nbytes, [self._access], 1)
        return _Slab(self, handle, int(ptr), nbytes)

    def unmap(self, handle: Any, ptr: int, nbytes: int) -> None:
        self._call("cuMemUnmap", ptr, nbytes)
        self._call("cuMemAddressFree", ptr, nbytes)
        self._call("cuMemRelease", handle)

    def view(self, slab: _Slab, offset: int, nbytes: int) -> tuple[Any, Any]:
        """(tensor, holder): torch keeps the holder alive as long as the tensor's storage."""
        import torch

        holder = _Holder(slab, slab.ptr + offset, nbytes)
        return torch.as_tensor(holder, device=f"cuda:{self.device}"), holder

    def stream_wait(self, event: bytes) -> None:
        import torch

        handle = self.drv.CUipcEventHandle()
        ctypes.memmove(handle.getPtr(), event, len(event))  # the daemon's 64 opaque bytes
        ev = self._call("cuIpcOpenEventHandle", handle)
        try:
            stream = torch.cuda.current_stream(self.device).cuda_stream
            self._call("cuStreamWaitEvent", stream, ev, 0)
        finally:
            self._call("cuEventDestroy", ev)  # the wait is enqueued; the handle is not needed
