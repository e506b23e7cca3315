"""How far ahead a streaming model hints its blocks: far enough that reads hide behind compute,
never beyond the room the layout left.

The layout (layout.py) sizes the minimum RAM tier for ``prefetch_depth`` blocks hinted after the
running one, and keeps as many first decoder layers resident as the rest of the room holds. What is
left after that (``spare``: less than one more layer) is where a deeper window may go; the window
that the minimum counts is never shrunk, so a tier at the minimum keeps working.

Per block the hooks measure two things: its compute (the forward with its weights bound) and its
stall (the wait in ``get_many`` for weights not yet read). A block's read time is its stored bytes
over the disk's read speed (the daemon's start-up calibration, ``stats()["placement"]["calibration"]``). Block
``j`` hinted by the block ``d`` hops before it has the compute of those ``d`` blocks to be read in;
so a block hints every block that the next block would hint too late, at least ``prefetch_depth``,
as long as that window fits the layout's window plus the spare room (:func:`choose_depths`, pure,
tested on its own). When no depth within the room hides a read, the disk is the bottleneck: the
deepest window that fits keeps reads queued.

Decode of a model streamed from an SSD on a CPU is such a case (Qwen3-VL-2B, 40% RAM tier: about
7 ms of compute against 60-70 ms of read per decoder layer): there the depth changes little and
the read path's speed is what counts; a fast compute device with a slow disk, or blocks of unequal
sizes (a streamed embedding of 622 MB after a norm), are where a deeper window pays.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

#: never hint more blocks ahead than this (each hint names every tensor of its blocks)
MAX_DEPTH = 8


def chain(after: Sequence[int], i: int, d: int) -> list[int]:
    """Block ``i`` and the blocks hinted after it, up to ``d`` hops (stops where the walk comes back)."""
    out, j = [i], i
    for _ in range(d):
        j = after[j]
        if j in out:
            break
        out.append(j)
    return out


def choose_depths(
    compute_s: Sequence[float],
    read_s: Sequence[float],
    nbytes: Sequence[int],
    after: Sequence[int],
    *,
    base: int,
    cap_bytes: int,
    max_depth: int = MAX_DEPTH,
) -> list[int]:
    """Per block, how many blocks to hint after it.

    ``compute_s`` / ``read_s`` / ``nbytes``: per block, its compute time, read time and stored bytes;
    ``after``: the block that follows each (see layout.StreamingLayout.after); ``base``: the depth the
    minimum was sized for (never less); ``cap_bytes``: the most a window (the running block and those
    hinted) may hold. Block ``i`` hints block ``j``, ``d`` hops ahead, when hinting it one block later
    would be too late: the compute of the blocks between ``i`` and ``j`` is less than ``j``'s read.
    Its depth is the largest such ``d`` whose window fits ``cap_bytes`` (so a disk that cannot keep
    up gets the deepest window that fits: reads stay queued), and ``base`` whatever the cap.
    """
    out = []
    for i in range(len(after)):
        depth = base
        for d in range(1, max_depth + 1):
            run = chain(after, i, d)
            if len(run) <= d:  # the walk came back to a block already in the window
                break
            if d > base and sum(nbytes[j] for j in run) > cap_bytes:
                break
            if sum(compute_s[j] for j in run[1:-1]) < read_s[run[-1]]:
                depth = max(depth, d)
        out.append(depth)
    return out


@dataclass
class Pacer:
    """The measurements of one streaming model and the depth each block hints with.

    The hooks call :meth:`stalled` and :meth:`computed` for each forward; after every pass (the last
    block's forward ends a prefill or a decoding step) the depths are chosen again from the
    measured compute (an average over the passes so far) and the disk's calibrated read speed.
    """

    nbytes: list[int]
    after: list[int]
    base: int
    cap_bytes: int
    #: the disk's read speed in bytes/s, read once from the daemon when first needed (None: unknown)
    read_bps: float | None = None
    client: Any = None
    compute_s: list[float] = field(default_factory=list)
    depths: list[int] = field(default_factory=list)
    stall_total: float = 0.0
    compute_total: float = 0.0
    forwards: int = 0
    passes: int = 0
    _sums: list[float] = field(default_factory=list)
    _counts: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        n = len(self.nbytes)
        self.compute_s = [0.0] * n
        self.depths = [self.base] * n
        self._sums = [0.0] * n
        self._counts = [0] * n

    def stalled(self, i: int, seconds: float) -> None:
        self.stall_total += seconds

    def computed(self, i: int, seconds: float) -> None:
        self.forwards += 1
        self.compute_total += seconds
        self._sums[i] += seconds
        self._counts[i] += 1
        if i == len(self.nbytes) - 1:  # the last block: one forward pass (a prefill or a token) done
            self.passes += 1
            self._choose()

    def _choose(self) -> None:
        if self.read_bps is None and self.client is not None:
            calib = (self.client.stats().get("placement") or {}).get("calibration") or {}
            gbps = calib.get("disk_read_gbps")
            self.read_bps = float(gbps) * 1e9 if gbps else None
        if not self.read_bps:
            return
        self.compute_s = [s / c if c else 0.0 for s, c in zip(self._sums, self._counts, strict=True)]
        read_s = [b / self.read_bps for b in self.nbytes]
        self.depths = choose_depths(self.compute_s, read_s, self.nbytes, self.after, base=self.base,
                                    cap_bytes=self.cap_bytes)  # fmt: skip

    def depth(self, i: int) -> int:
        return self.depths[i]

    def stats(self) -> dict[str, Any]:
        """For benchmarks and ``tierctl``-like reports: totals over the model's life so far."""
        return {
            "stall_s": round(self.stall_total, 6),
            "compute_s": round(self.compute_total, 6),
            "forwards": self.forwards,
            "passes": self.passes,
            "depths": sorted(set(self.depths)),
        }
