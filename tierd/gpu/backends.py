"""Choosing and opening the device behind ``--gpu-backend`` (a module of its own, so that the
interface in :mod:`tierd.gpu.device` imports no backend)."""

from __future__ import annotations

from typing import Any

from tierd.gpu.device import BACKENDS, Device, DeviceError


def open_device(backend: str, index: int = 0, **options: Any) -> Device:
    """The device for ``--gpu-backend`` (``auto``: CUDA, never the simulated one); DeviceError
    with the cause when it cannot be opened."""
    if backend not in BACKENDS:
        raise DeviceError(f"gpu_backend: {backend!r} is not one of {', '.join(BACKENDS)}")
    if backend == "simulated":
        from tierd.gpu.simulated import SimulatedDevice

        return SimulatedDevice(index=index, **options)
    from tierd.gpu.cuda import CudaDevice

    try:
        return CudaDevice(index)
    except DeviceError as e:
        if backend == "auto":
            raise DeviceError(
                f"{e} (gpu_backend=auto looks for CUDA only; --gpu-backend simulated runs the "
                "simulated test device instead)"
            ) from None
        raise
