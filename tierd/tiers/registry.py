"""The tier list, from the configuration's ``tiers`` setting: names, order and classes.

::

    tiers = "ram,disk"                                      the default: RAM, then LMDB
    tiers = "ram,host=mypkg.tiers:HostTier@2GiB,disk"       a third tier between them

Items are fastest first. Built-in names: ``gpu`` (:class:`~tierd.tiers.gpu.GpuTier` on the
device ``gpu_backend`` / ``gpu_device`` pick, sized by ``gpu_bytes``; put first on its own when
gpu_bytes > 0), ``ram`` (:class:`~tierd.tiers.ram.RamTier`, sized by
``ram_bytes``) and ``disk`` (:class:`~tierd.tiers.disk.DiskTier` in the state dir, sized by
``disk_bytes``; left out when that is 0). Any other item is ``NAME=MODULE:CLASS@SIZE``: a
:class:`~tierd.tiers.memory.MemoryTier` or :class:`~tierd.tiers.store.ChunkStore` subclass, built
as ``CLASS(size_in_bytes, name=NAME)``. That is all a new tier needs: the manager and placement
work over whatever list this returns.

Rules (a ConfigError names the one broken): names are unique; ``ram`` is first, or second after
``gpu`` (ram is the home tier: puts are written there, gets served from there unless they name the
GPU tier); memory tiers come before chunk stores; at most one chunk store (a move between two
stores is not written yet).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from tierd.config import ConfigError, TierSpec, parse_size, parse_tiers
from tierd.tiers.base import Tier

if TYPE_CHECKING:
    from tierd.config import Config


def _load_class(spec: TierSpec) -> type[Tier]:
    module, _, cls = spec.target.partition(":")
    try:
        found = getattr(importlib.import_module(module), cls)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"tiers: cannot load {spec.target!r} for tier {spec.name!r}: {e}") from None
    if not (isinstance(found, type) and issubclass(found, Tier)):
        raise ConfigError(f"tiers: {spec.target!r} is not a MemoryTier or ChunkStore class")
    return found


def build(cfg: Config, gpu: Tier | None = None) -> list[Tier]:
    """Build the configured tiers, fastest first; when one fails, those built are closed again.
    ``gpu``: the GPU tier opened already (:func:`gpu_tier`, before anything slow), else opened here."""
    from tierd.tiers.disk import DiskTier
    from tierd.tiers.ram import RamTier

    built: list[Tier] = []
    try:
        for spec in parse_tiers(cfg.tier_list()):
            if spec.name == "gpu":
                built.append(gpu if gpu is not None else gpu_tier(cfg))
                gpu = None
            elif spec.name == "ram":
                built.append(RamTier(cfg.ram_tier_bytes(), quota=cfg.ram_quota_bytes()))
            elif spec.name == "disk":
                disk_bytes = cfg.disk_tier_bytes()
                if disk_bytes:
                    built.append(DiskTier(cfg.state_path(), disk_bytes))
            else:
                built.append(_load_class(spec)(parse_size(spec.size), name=spec.name))  # type: ignore[call-arg]
        _check_order(built)
    except BaseException:
        for t in reversed(built):
            t.close()
        if gpu is not None:
            gpu.close()
        raise
    return built


def gpu_tier(cfg: Config) -> Tier:
    """The GPU tier on its device; a device that cannot be opened or is too small is a ConfigError
    (exit 2) naming the cause."""
    from tierd.gpu.backends import open_device
    from tierd.gpu.device import DeviceError
    from tierd.tiers.gpu import GpuTier

    options = {"delay_s": cfg.gpu_sim_delay_ms / 1000} if cfg.gpu_backend == "simulated" else {}
    try:
        device = open_device(cfg.gpu_backend, cfg.gpu_device, **options)
    except DeviceError as e:
        raise ConfigError(f"gpu_backend={cfg.gpu_backend}: {e}") from None
    try:
        return GpuTier(device, cfg.gpu_tier_bytes(device.total_bytes))
    except DeviceError as e:
        device.close()
        raise ConfigError(str(e)) from None


def _check_order(tiers: list[Tier]) -> None:
    kinds = [t.kind for t in tiers]
    if "chunks" in kinds and "memory" in kinds[kinds.index("chunks") :]:
        raise ConfigError(f"tiers: memory tiers must come before chunk stores ({[t.name for t in tiers]})")
    if kinds.count("chunks") > 1:
        raise ConfigError("tiers: at most one chunk store is supported for now")
