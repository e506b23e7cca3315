"""Which codec an entry gets: an explicit request, else a tag rule, else measured and lossless only.

:func:`choose` decides in this order:

1. ``requested`` (the put's ``codec=``): used if the codec applies to the dtype and shape, else
   ValueError saying why. Lossy codecs are only ever used when asked for (here or by a tag).
2. ``tag_codecs`` (configuration, e.g. ``{"weight": "int8"}``): the first of the entry's ``tags``
   with a rule whose codec applies. A rule that does not apply is skipped (the reason says so).
3. automatic, lossless only: zstd is measured on a sample of the entry (up to 1 MiB from the middle
   of the tensor; :func:`sample_of`) for its ratio, and the cold read of the whole entry is
   estimated both ways with the start-up calibration (:mod:`tierd.calibrate`)::

       raw : nbytes / disk_read
       zstd: max(stored / disk_read,                                  # the disk, pipelined with
                 (nbytes / zstd_decode + stored / disk_read) / cores)  # the threads' CPU work

   zstd is picked only if it saves at least 10% of the space AND its estimate beats raw's by at
   least 15% (MARGIN); otherwise raw. The default must never make a cold read slower than the raw
   path, and the estimate is optimistic (perfect pipelining, free cores), so it has to win clearly.

   Why not the plain ``max(stored / disk_read, nbytes / (zstd_decode * cores))``: measured here
   (LMDB, readahead on, 256 MiB gaussian, 4 MiB chunks, page cache dropped, 2 vCPUs, 3 runs):
   raw read at 1.53-1.69 GB/s; zstd with 1 decode thread at 1.30-1.34 (fp16) and 1.21-1.28
   (bf16); with 2 threads at 1.46-1.54 (fp16) and 1.46-2.01 (bf16). (With another process busy
   on one vCPU, 2 threads gave 1.17-1.51 and 1.40-1.67 against raw's 1.37-1.56.) The plain
   formula, fed that session's calibration (disk 1.68, fp16 decode 1.79 GB/s/core), said zstd
   would win on 1 thread: it would have slowed those cold reads by ~20%. What it misses: a
   decoding thread also pays, on its core, for bringing its compressed bytes in from the page
   cache (faults, readahead), about what the raw path costs per byte; hence the second term.
   The margin covers what is left: with 2 threads the model still said fp16 zstd would be ~8%
   faster when it was ~5% slower.

   The decode speed per core is the calibrated one on gaussian data of the dtype (near zstd's
   slowest per byte); for data that compresses better than that, it is interpolated between that
   and the calibrated speed on zeros (:meth:`ZstdRate.decode_gbps_at`), never extrapolated beyond
   what was measured. Entries under 64 KiB stay raw: their cold read is one I/O whatever the codec.

``cores`` is the number of threads the disk tier decodes one entry with; pass the cores it really
has while a model runs, not os.cpu_count(). With this machine's numbers gaussian fp16/bf16/fp32
come out raw at 1 and 2 cores (zstd 1.19x / 1.46x / 1.19x); highly compressible data (zeros,
padding, int64 position ids, fp32 upcast from bf16 at 2.9x) comes out zstd.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from tierd.calibrate import Calibration
from tierd.codecs import get_codec
from tierd.codecs.base import Buffer, array_bytes, as_u8, check_shape, itemsize_of
from tierd.codecs.int8 import group_size

SAMPLE_BYTES = 1 << 20
MIN_SAVING = 0.10
MIN_AUTO_BYTES = 64 << 10
#: zstd's estimated cold read must be at most (1 - MARGIN) x raw's. A judgment call from the
#: measurements in the module docstring (with 2 threads the estimate was still ~20-30% optimistic on
#: this loaded 2-vCPU VM); revisit with measurements on a quiet machine.
MARGIN = 0.15


@dataclass(frozen=True)
class Choice:
    codec: str
    reason: str
    #: raw bytes / stored bytes, as far as known before encoding (zstd: measured on the sample)
    expected_ratio: float


def sample_of(raw: Buffer, dtype: str, max_bytes: int = SAMPLE_BYTES) -> memoryview:
    """Up to max_bytes from the middle of a tensor's raw bytes, on item boundaries (a view)."""
    size = itemsize_of(dtype)
    mv = array_bytes(as_u8(raw, "raw"))
    n = min(mv.nbytes, max(size, max_bytes)) // size * size
    start = (mv.nbytes - n) // 2 // size * size
    return mv[start : start + n]


def zstd_ratio(sample: Buffer, dtype: str) -> float:
    """raw / stored of the zstd codec (level and shuffle as stored) on one chunk of the sample."""
    size = itemsize_of(dtype)
    s = sample_of(sample, dtype)
    if s.nbytes < size:
        return 1.0
    codec = get_codec("zstd")
    plan = codec.prepare(s, dtype, [s.nbytes // size], s.nbytes)
    stored = sum(len(codec.encode_chunk(plan, i, s)) for i in range(plan.n_chunks))
    return s.nbytes / max(1, stored)


def expected_ratio(codec: str, dtype: str, shape: list[int], sample: Buffer) -> float:
    nbytes = int(np.prod(shape, dtype=np.int64)) * itemsize_of(dtype)
    if codec == "zstd":
        return zstd_ratio(sample, dtype)
    if codec in ("bf16", "fp16"):
        return 2.0
    if codec == "int8":
        n = nbytes // itemsize_of(dtype)
        g = group_size(shape)
        groups = -(-n // g) if n and g else 0
        return nbytes / max(1, n + 4 * groups)
    return 1.0


def _auto(calib: Calibration, dtype: str, nbytes: int, sample: Buffer, cores: int) -> Choice:
    if nbytes == 0:
        return Choice("raw", "auto: raw (empty tensor)", 1.0)
    if nbytes < MIN_AUTO_BYTES:
        return Choice("raw", f"auto: raw ({nbytes} bytes < {MIN_AUTO_BYTES}: a cold read is one I/O)", 1.0)
    ratio = zstd_ratio(sample, dtype)
    rate = calib.zstd_rate(dtype)
    disk = max(calib.disk_read_gbps, 1e-6) * 1e9
    per_core = rate.decode_gbps_at(ratio)
    decode = max(per_core, 1e-6) * 1e9
    cpu_cores = max(1, cores)
    t_raw = nbytes / disk
    t_zstd = max(nbytes / ratio / disk, (nbytes / decode + nbytes / ratio / disk) / cpu_cores)
    t_need = (1 - MARGIN) * t_raw
    saving = 1 - 1 / ratio
    numbers = f"zstd {ratio:.2f}x, est. cold read {t_zstd:.3g} s vs raw {t_raw:.3g} s"
    where = f"disk {calib.disk_read_gbps:.2f} GB/s, zstd decode {per_core:.2f} GB/s/core x {cpu_cores}"
    if saving < MIN_SAVING:
        return Choice("raw", f"auto: raw ({numbers}: saves {saving:.0%} < {MIN_SAVING:.0%})", 1.0)
    if t_zstd > t_need:
        why = f"zstd would not be faster by {MARGIN:.0%} (needs <= {t_need:.3g} s)"
        return Choice("raw", f"auto: raw ({numbers}: {why}; {where})", 1.0)
    return Choice("zstd", f"auto: zstd ({numbers}, saves {saving:.0%}; {where})", ratio)


def choose(
    calib: Calibration,
    dtype: str,
    shape: list[int],
    sample: Buffer,
    *,
    requested: str | None = None,
    tag_codecs: Mapping[str, str] | None = None,
    tags: Sequence[str] = (),
    cores: int = 1,
) -> Choice:
    """The codec for one entry; see the module docstring. ValueError for a request that cannot be met.

    ``requested``: None or "auto" for no request. ``sample``: the entry's raw bytes or a part of
    them (only up to 1 MiB from the middle is used; :func:`sample_of` cuts one). ``tag_codecs``
    names must be known codecs (ValueError otherwise).
    """
    itemsize_of(dtype)
    shape = check_shape(shape)
    nbytes = int(np.prod(shape, dtype=np.int64)) * itemsize_of(dtype)
    if requested is not None and requested != "auto":
        codec = get_codec(requested)
        why = codec.why_not(dtype, shape)
        if why is not None:
            raise ValueError(f"codec {requested!r} cannot store {dtype}{shape}: {why}")
        return Choice(codec.name, "requested by the put", expected_ratio(codec.name, dtype, shape, sample))
    skipped: list[str] = []
    rules = tag_codecs or {}
    for tag in tags:
        name = rules.get(tag)
        if name is None:
            continue
        codec = get_codec(name)
        why = codec.why_not(dtype, shape)
        if why is None:
            return Choice(
                codec.name, f"tag {tag!r} -> {codec.name}", expected_ratio(codec.name, dtype, shape, sample)
            )
        skipped.append(f"tag {tag!r} -> {name} skipped: {why}")
    choice = _auto(calib, dtype, nbytes, sample, cores)
    if skipped:
        return Choice(choice.codec, "; ".join([*skipped, choice.reason]), choice.expected_ratio)
    return choice
