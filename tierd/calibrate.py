"""Start-up calibration: what this machine's memory, disk and zstd can do, measured in about 1 s.

The daemon runs :func:`calibrate` once in a thread at start (numpy + zstandard only, no torch) and
hands the result to the codec policy (:mod:`tierd.codecs.policy`) and to ``status``. Until it is
done, :meth:`Calibration.assumed` stands in: numbers from a fast NVMe and a slow CPU, which keep the
policy on raw unless compression is overwhelming.

What is measured:

* memcpy: ``numpy.copyto`` into a warm destination, best of 3 (64 MiB by default; the daemon asks
  for 32 MiB at start, see below).
* disk: a temp file in the state directory (where the disk tier lives), 64 MiB by default, written
  with O_DIRECT + fsync and read back with O_DIRECT (no page cache either way), ``READS`` times,
  the fastest read counting (the disk's speed, not a slow moment of it). A read during which the
  disk (its sysfs ``stat``) moved bytes for others too counts them: the disk was shared, not slow.
  Where O_DIRECT is refused (tmpfs, some FUSE/overlay setups) the file is written buffered +
  fsync and read after ``posix_fadvise(DONTNEED)``; ``disk_mode`` says which (on tmpfs the "disk"
  is memory, and so are the numbers). The file is removed whatever happens. If the disk cannot be
  measured at all (read only, full), the assumed numbers are kept and ``notes`` says why.
* zstd (the ``zstd`` codec itself: level 1 + byte shuffle, in chunks of the disk tier's size,
  ``tiers.store.CHUNK_BYTES`` = 16 MiB): encode and decode GB/s on one core, and ratio, for
  gaussian fp16, bf16 and fp32 (std 0.02, like random-init weights), and the decode speed on zeros
  (what decoding costs per output byte when there is almost nothing to decompress). 32 MiB of
  data by default: decode speed falls with the data size until the data stops fitting in caches
  (fp16, measured here: 8 MiB 1.85 GB/s, 16 MiB 1.7, 32 MiB 1.6, 64 MiB 1.56), and a cold read
  decodes data that is in no cache.

The daemon calls it with 32 MiB for memcpy and 16 MiB for zstd (one chunk): the calibration's own
memory, about 70 MiB for a moment, must not be what pushes a small machine or a tight cgroup over
the edge at start. That costs a little accuracy (the zstd figures above are about 6% faster at
16 MiB than at 32), which leans the policy slightly toward zstd.
  Real checkpoints compress differently (trained weights, fp32 upcast from bf16, norms and RoPE
  tables compress better, some worse), which is why the policy measures a sample of each entry
  for its ratio; the speeds here are the per-byte cost, and gaussian data is near the slow end of
  zstd's decode speed (highly compressible data decodes faster), so using them is conservative.
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import secrets
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from tierd.codecs import decode_all, encode_all, get_codec
from tierd.codecs._bits import f32_to_bf16
from tierd.codecs.base import array_bytes
from tierd.codecs.zstd import LEVEL
from tierd.hardware import sysfs_disk
from tierd.tiers.store import CHUNK_BYTES

MIB = 1 << 20
DISK_BYTES = 64 * MIB
#: direct reads of the calibration file; the fastest counts. A shared or virtual disk's speed swings
#: from one second to the next (1.0-2.2 GB/s here within one benchmark run), and one reading taken
#: at a slow moment decides the codec of every entry put after it: below about 0.65 GB/s the codec
#: policy stores gaussian bf16 weights with zstd on 2 cores, whose decoding then takes the cores a
#: model computes on
READS = 3
ZSTD_BYTES = 32 * MIB
ZSTD_CHUNK = CHUNK_BYTES  # measure zstd on the chunks the disk tier writes
MEMCPY_BYTES = 64 * MIB
_IO_BLOCK = 8 * MIB
#: The dtypes whose zstd speed is measured (the policy uses the slowest for other dtypes).
ZSTD_DTYPES = ("float16", "bfloat16", "float32")


@dataclass
class ZstdRate:
    """zstd (level 1 + shuffle) on one core: ratio, and GB/s of raw (uncompressed) bytes."""

    ratio: float
    encode_gbps: float
    decode_gbps: float
    #: decode GB/s on all-zero data (ratio ~ 10^4): the cost per output byte alone (unshuffle and
    #: writing the output). With decode_gbps at ``ratio`` it gives the policy a two-point model of
    #: how decode speed grows with the ratio. None: not measured (the policy then uses decode_gbps).
    decode_zeros_gbps: float | None = None

    def decode_gbps_at(self, ratio: float) -> float:
        """Estimated decode GB/s per core for data that compresses ``ratio``:x.

        Time per raw byte = b + c / ratio, fitted through (self.ratio, decode_gbps) and (inf,
        decode_zeros_gbps). Below the calibrated ratio it returns decode_gbps (no extrapolation
        towards a speed that was not measured on the slow side either).
        """
        if (
            self.decode_zeros_gbps is None
            or ratio <= self.ratio
            or self.decode_zeros_gbps <= self.decode_gbps
        ):
            return self.decode_gbps
        b = 1 / self.decode_zeros_gbps
        c = (1 / self.decode_gbps - b) * self.ratio
        return 1 / (b + c / ratio)


@dataclass
class Calibration:
    memcpy_gbps: float
    disk_write_gbps: float
    disk_read_gbps: float
    #: per dtype ("float16", "bfloat16", "float32"); see :meth:`zstd_rate` for other dtypes
    zstd: dict[str, ZstdRate]
    #: "direct" (O_DIRECT both ways), "buffered" (fsync + fadvise DONTNEED), "assumed" (not measured)
    disk_mode: str = "direct"
    zstd_level: int = 1
    cores: int = 1
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    def zstd_rate(self, dtype: str) -> ZstdRate:
        """The measured rate for dtype, else the slowest decode measured (conservative)."""
        if dtype in self.zstd:
            return self.zstd[dtype]
        if not self.zstd:
            return _ASSUMED_ZSTD
        return min(self.zstd.values(), key=lambda r: r.decode_gbps)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["zstd"] = {k: asdict(v) for k, v in self.zstd.items()}
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Calibration:
        d = dict(d)
        d["zstd"] = {k: ZstdRate(**v) for k, v in d.get("zstd", {}).items()}
        return cls(**d)

    @classmethod
    def assumed(cls) -> Calibration:
        """Stand-in before (or instead of) a measurement: a fast disk, a slow zstd (MACHINE.md)."""
        return cls(
            memcpy_gbps=8.0,
            disk_write_gbps=1.3,
            disk_read_gbps=1.9,
            zstd={d: _ASSUMED_ZSTD for d in ZSTD_DTYPES},
            disk_mode="assumed",
            cores=_cores(),
            notes=["assumed numbers, not measured"],
        )


_ASSUMED_ZSTD = ZstdRate(ratio=1.09, encode_gbps=0.2, decode_gbps=0.5)


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _gbps(nbytes: int, seconds: float) -> float:
    return nbytes / max(seconds, 1e-9) / 1e9


# ---- memcpy ---------------------------------------------------------------------------------------
def measure_memcpy(nbytes: int = MEMCPY_BYTES, reps: int = 3) -> float:
    src = np.ones(nbytes, np.uint8)
    dst = np.zeros(nbytes, np.uint8)  # np.zeros is lazily mapped: the first copy warms it
    np.copyto(dst, src)
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t)
    return _gbps(nbytes, best)


# ---- disk -----------------------------------------------------------------------------------------
def _open_direct(path: str, flags: int) -> int:
    """os.open with O_DIRECT; OSError where the filesystem refuses it (tests replace this)."""
    direct = getattr(os, "O_DIRECT", 0)
    if not direct:
        raise OSError(errno.EINVAL, "O_DIRECT is not available on this platform")
    return os.open(path, flags | direct, 0o600)


def _write_all(fd: int, buf: mmap.mmap, nbytes: int, block: int) -> float:
    """Write nbytes from buf (block bytes, reused); returns the seconds spent varying the buffer."""
    view = memoryview(buf)
    u64 = np.frombuffer(buf, np.uint64)
    spent = 0.0
    try:
        for off in range(0, nbytes, block):
            t = time.perf_counter()
            u64 += np.uint64(0x9E3779B97F4A7C15)  # every block (and page) differs: no dedup shortcut
            spent += time.perf_counter() - t
            n = min(block, nbytes - off)
            done = 0
            while done < n:
                done += os.pwrite(fd, view[done:n], off + done)
    finally:
        del u64
        view.release()
    return spent


def _read_all(fd: int, buf: mmap.mmap, nbytes: int, block: int) -> None:
    for off in range(0, nbytes, block):
        n = min(block, nbytes - off)
        done = 0
        while done < n:
            # preadv into the page-aligned buffer: O_DIRECT needs aligned memory
            with memoryview(buf) as v:
                got = os.preadv(fd, [v[done:n]], off + done)
            if got <= 0:
                raise OSError(errno.EIO, f"short read at {off + done} of the calibration file")
            done += got


def _timed_read(fd: int, buf: mmap.mmap, nbytes: int, block: int) -> float:
    t = time.perf_counter()
    _read_all(fd, buf, nbytes, block)
    return time.perf_counter() - t


class DiskSpeed(NamedTuple):
    """What :func:`measure_disk` found."""

    write_gbps: float
    read_gbps: float
    mode: str
    #: bytes the device moved for others (other processes, the daemon's own writes) during the
    #: direct read that counted; its speed is the device's total over that read (see below)
    others_bytes: int = 0


def device_counter(directory: str | os.PathLike[str]) -> Callable[[], int] | None:
    """A function returning the bytes the disk under ``directory`` has read and written so far (its
    sysfs ``stat``: sectors of 512 bytes), or None where no block device is behind it."""
    try:
        found = sysfs_disk(os.stat(directory).st_dev)
        if found is None:
            return None
        stat = found[1] / "stat"
        stat.read_text()
    except OSError:
        return None

    def moved() -> int:
        f = stat.read_text().split()
        return (int(f[2]) + int(f[6])) * 512

    return moved


def measure_disk(
    directory: str | os.PathLike[str],
    nbytes: int = DISK_BYTES,
    counter: Callable[[], int] | None = None,
) -> DiskSpeed:
    """Write and read speed of a temp file in ``directory``; the file is always removed.

    ``counter`` (None: :func:`device_counter` of ``directory``) gives the bytes the disk has moved
    so far: a direct read during which it moved more than that read (another process loading a
    checkpoint, the daemon's first puts) counts the device's total, since the disk was shared, not
    slow. Without this, one calibration at a daemon's start measured 0.66 GB/s on a disk reading
    1.7-2.0 GB/s just before and after, and the codec policy stored a model's weights with zstd.
    """
    if counter is None:
        counter = device_counter(directory)
    block = min(_IO_BLOCK, nbytes)
    nbytes = max(block, nbytes // block * block)
    path = os.path.join(os.fspath(directory), f".tierd-calibrate-{os.getpid()}-{secrets.token_hex(4)}.tmp")
    buf = mmap.mmap(-1, block)  # anonymous mapping: page aligned, as O_DIRECT wants
    try:
        buf.write(np.random.default_rng().bytes(block))
        mode = "direct"
        try:
            try:
                fd = _open_direct(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
            except OSError:
                mode = "buffered"
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                t = time.perf_counter()
                try:
                    spent = _write_all(fd, buf, nbytes, block)
                except OSError as exc:
                    if mode != "direct" or exc.errno != errno.EINVAL:
                        raise
                    # opened with O_DIRECT but the writes are refused: do it buffered
                    os.close(fd)
                    fd = -1
                    mode = "buffered"
                    fd = os.open(path, os.O_WRONLY | os.O_TRUNC, 0o600)
                    t = time.perf_counter()
                    spent = _write_all(fd, buf, nbytes, block)
                os.fsync(fd)
                write_s = time.perf_counter() - t - spent
            finally:
                if fd >= 0:
                    os.close(fd)

            read_mode = mode
            read_s = -1.0
            others = 0
            if mode == "direct":
                with contextlib.suppress(OSError):  # refused: measured buffered below
                    fd = _open_direct(path, os.O_RDONLY)
                    try:
                        best = 0.0
                        for _ in range(READS):
                            before = counter() if counter is not None else 0
                            s = max(_timed_read(fd, buf, nbytes, block), 1e-9)
                            extra = max(0, counter() - before - nbytes) if counter is not None else 0
                            if (nbytes + extra) / s > best:
                                best, read_s, others = (nbytes + extra) / s, s, extra
                    finally:
                        os.close(fd)
            if read_s < 0:
                read_mode = "buffered"
                fd = os.open(path, os.O_RDONLY)
                try:
                    # the pages are clean after fsync, so DONTNEED drops them from the page cache
                    with contextlib.suppress(AttributeError, OSError):
                        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                    read_s = _timed_read(fd, buf, nbytes, block)
                finally:
                    os.close(fd)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
    finally:
        buf.close()
    mode = "direct" if mode == read_mode == "direct" else "buffered"
    return DiskSpeed(_gbps(nbytes, write_s), _gbps(nbytes + others, read_s), mode, others)


# ---- zstd -----------------------------------------------------------------------------------------
def gaussian_bytes(
    dtype: str, nbytes: int, seed: int = 0, std: float = 0.02, normals: np.ndarray | None = None
) -> np.ndarray:
    """nbytes of gaussian values (std ``std``) as raw bytes of dtype float16/bfloat16/float32.

    ``normals``: standard normal float32 values to use (at least nbytes / item size of them)
    instead of drawing new ones (drawing is the slow part).
    """
    size = 4 if dtype == "float32" else 2
    n = nbytes // size
    if normals is None or normals.size < n:
        normals = np.random.default_rng(seed).standard_normal(n, dtype=np.float32)
    x = normals[:n] * np.float32(std)
    if dtype == "float32":
        return x.view(np.uint8)
    if dtype == "float16":
        return x.astype(np.float16).view(np.uint8)
    if dtype == "bfloat16":
        return f32_to_bf16(x).view(np.uint8)
    raise ValueError(f"gaussian_bytes makes float16, bfloat16 or float32, not {dtype!r}")


def measure_zstd(
    dtype: str,
    nbytes: int = ZSTD_BYTES,
    chunk_bytes: int = ZSTD_CHUNK,
    reps: int = 2,
    normals: np.ndarray | None = None,
) -> ZstdRate:
    """The zstd codec on one core over gaussian data of this dtype (and over zeros)."""
    gauss = _zstd_rate(gaussian_bytes(dtype, nbytes, normals=normals), dtype, chunk_bytes, reps)
    zeros = _zstd_rate(np.zeros(nbytes, np.uint8), dtype, chunk_bytes, reps)
    gauss.decode_zeros_gbps = zeros.decode_gbps
    return gauss


def _zstd_rate(raw: np.ndarray, dtype: str, chunk_bytes: int, reps: int) -> ZstdRate:
    """Encode once (its speed is for status only), decode ``reps`` times (the policy's input)."""
    codec = get_codec("zstd")
    shape = [raw.size // (4 if dtype == "float32" else 2)]
    plan = codec.prepare(array_bytes(raw), dtype, shape, chunk_bytes)
    out = np.zeros_like(raw)
    out[:] = 1  # warm (pre-faulted) destination, like the RAM arena
    t = time.perf_counter()
    chunks = encode_all(codec, plan, array_bytes(raw))
    enc = time.perf_counter() - t
    dec = float("inf")
    for _ in range(max(1, reps)):
        t = time.perf_counter()
        decode_all(codec, plan, chunks, array_bytes(out))
        dec = min(dec, time.perf_counter() - t)
    stored = sum(len(c) for c in chunks)
    return ZstdRate(
        ratio=raw.size / max(stored, 1), encode_gbps=_gbps(raw.size, enc), decode_gbps=_gbps(raw.size, dec)
    )


# ---- all ------------------------------------------------------------------------------------------
def calibrate(
    state_dir: str | os.PathLike[str],
    *,
    disk_bytes: int = DISK_BYTES,
    zstd_bytes: int = ZSTD_BYTES,
    memcpy_bytes: int = MEMCPY_BYTES,
) -> Calibration:
    """Measure memcpy, the disk under ``state_dir`` and zstd; see the module docstring."""
    t0 = time.perf_counter()
    base = Calibration.assumed()
    notes: list[str] = []
    memcpy = measure_memcpy(memcpy_bytes)
    write, read, mode = base.disk_write_gbps, base.disk_read_gbps, "assumed"
    try:
        free = shutil.disk_usage(state_dir).free
        if free < 4 * disk_bytes:
            raise OSError(errno.ENOSPC, f"only {free} bytes free")
        write, read, mode, others = measure_disk(state_dir, disk_bytes)
        if others:
            notes.append(f"the disk moved {others / MIB:.0f} MiB for others during the read that counted: "
                         "its speed is the device's total")  # fmt: skip
    except OSError as exc:
        notes.append(f"disk not measured ({Path(state_dir)}: {exc}); assumed numbers kept")
    if mode == "buffered":
        notes.append("O_DIRECT refused: buffered I/O (fsync, fadvise DONTNEED); tmpfs reads are memory speed")
    normals = np.random.default_rng(0).standard_normal(zstd_bytes // 2, dtype=np.float32)
    zstd = {d: measure_zstd(d, zstd_bytes, normals=normals) for d in ZSTD_DTYPES}
    return Calibration(
        memcpy_gbps=memcpy,
        disk_write_gbps=write,
        disk_read_gbps=read,
        zstd=zstd,
        disk_mode=mode,
        zstd_level=LEVEL,
        cores=_cores(),
        seconds=time.perf_counter() - t0,
        notes=notes,
    )
