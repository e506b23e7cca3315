"""What machine this daemon runs on: CPU, RAM, the state directory's device, NVIDIA GPUs.

:func:`report` is read once at start (off the loop: NVML's start-up takes a while on a GPU machine)
and shown by ``tierctl status`` and as ``tierd_machine_*`` / ``tierd_gpu_*`` metrics. It never
raises: what cannot be read is reported as unknown (None, or ``"none"`` for the GPUs), never an
error, so a container without /sys or a machine without an NVIDIA driver still starts.

Sources, all read-only:

- CPU: the first ``model name`` of /proc/cpuinfo; logical cores from the OS, physical from psutil.
- RAM: physical memory (sysconf), not a cgroup limit (status' ``pressure`` has that).
- State directory's device: its file system's device number (``st_dev``) names
  /sys/dev/block/MAJOR:MINOR; a partition is followed to its disk, whose ``queue/rotational`` says
  spinning or not, and whose name (``nvme*``) says NVMe. A device number with no block device behind
  it (tmpfs, overlayfs, a network file system) gives ``device: None`` and the file system's type
  from /proc/self/mountinfo.
- GPUs: NVML through ``pynvml`` (package nvidia-ml-py), imported here only, lazily. Not installed,
  no driver, or no GPU: ``gpus == []`` and ``gpu_note`` says which.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any


def cpu_model(cpuinfo: str = "/proc/cpuinfo") -> str | None:
    """The CPU's marketing name, or None where /proc/cpuinfo has none (some ARM kernels)."""
    try:
        text = Path(cpuinfo).read_text(errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() in ("model name", "Model", "cpu model"):
            return " ".join(value.split()) or None
    return None


def physical_cores() -> int | None:
    try:
        import psutil

        return psutil.cpu_count(logical=False)
    except (ImportError, OSError):
        return None


def _mount_of(dev: int, mountinfo: str = "/proc/self/mountinfo") -> dict[str, str] | None:
    """The mount (point, fs type, source) whose device number is ``dev``, the longest point first."""
    want = f"{os.major(dev)}:{os.minor(dev)}"
    best: dict[str, str] | None = None
    try:
        lines = Path(mountinfo).read_text(errors="replace").splitlines()
    except OSError:
        return None
    for line in lines:
        left, sep, right = line.partition(" - ")
        parts, rest = left.split(), right.split()
        if not sep or len(parts) < 5 or len(rest) < 2 or parts[2] != want:
            continue
        if best is None or len(parts[4]) > len(best["mount"]):
            best = {"mount": parts[4], "fstype": rest[0], "source": rest[1]}
    return best


def block_device(path: Path, sys_root: str = "/sys") -> dict[str, Any]:
    """The block device under ``path``'s file system: name, NVMe or not, rotational or not."""
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    out: dict[str, Any] = {"path": str(path), "device": None, "nvme": None, "rotational": None,
                           "model": None, "fstype": None}  # fmt: skip
    try:
        dev = os.stat(probe).st_dev
    except OSError:
        return out
    mount = _mount_of(dev)
    if mount is not None:
        out["fstype"] = mount["fstype"]
    found = sysfs_disk(dev, sys_root)
    if found is None:  # no block device behind this file system (tmpfs, overlay, nfs, ...)
        return out
    node, disk = found
    out["device"] = disk.name if disk == node else f"{disk.name} ({node.name})"
    out["nvme"] = disk.name.startswith("nvme")
    rot = _read(disk / "queue" / "rotational")
    out["rotational"] = None if rot is None else rot == "1"
    out["model"] = _read(disk / "device" / "model")
    return out


def sysfs_disk(dev: int, sys_root: str = "/sys") -> tuple[Path, Path] | None:
    """(the block device, the disk it is on) in sysfs for a file system's device number ``dev``
    (the same path twice unless it is a partition); None where no block device is behind it."""
    link = Path(sys_root, "dev", "block", f"{os.major(dev)}:{os.minor(dev)}")
    try:
        node = link.resolve(strict=True)
    except OSError:
        return None
    return node, node.parent if (node / "partition").exists() else node


def _read(path: Path) -> str | None:
    try:
        return path.read_text(errors="replace").strip() or None
    except OSError:
        return None


def gpus() -> tuple[list[dict[str, Any]], str]:
    """Every NVIDIA GPU NVML sees (index, name, memory, driver) and a note; ([], why) without one."""
    try:
        import pynvml
    except ImportError:
        return [], "none (nvidia-ml-py is not installed)"
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as e:  # no driver (NVMLError_LibraryNotFound), no device, ...
        return [], f"none ({e})"
    try:
        driver = _text(pynvml.nvmlSystemGetDriverVersion())
        out = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            mem = pynvml.nvmlDeviceGetMemoryInfo(h)
            out.append({"index": i, "name": _text(pynvml.nvmlDeviceGetName(h)),
                        "memory_bytes": int(mem.total), "driver": driver})  # fmt: skip
        return out, f"{len(out)} NVIDIA GPU(s), driver {driver}" if out else "none (NVML sees no GPU)"
    except pynvml.NVMLError as e:
        return [], f"none ({e})"
    finally:
        with contextlib.suppress(pynvml.NVMLError):
            pynvml.nvmlShutdown()


def _text(v: Any) -> str:
    return v.decode(errors="replace") if isinstance(v, bytes) else str(v)


def report(state_dir: Path) -> dict[str, Any]:
    """The whole report (``status``' ``hardware``); never raises."""
    gpu_list, note = gpus()
    return {
        "cpu_model": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "cpu_physical_cores": physical_cores(),
        "ram_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
        "state_device": block_device(state_dir),
        "gpus": gpu_list,
        "gpu_note": note,
    }
