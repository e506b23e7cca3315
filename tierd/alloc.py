"""Region allocator for the RAM arena: best fit over an address-ordered free list, with coalescing.

The arena is one flat range ``[0, capacity)``. Every region starts on an ``align``-byte boundary
(``ALIGN`` unless told) and its size is rounded up to it, so any dtype's view over it is aligned, and
the disk tier can read a chunk into it with O_DIRECT (block devices ask for 512-byte aligned
destinations: ``/sys/block/*/queue/dma_alignment``). Freed regions
merge with free neighbours at once, so two adjacent holes never stay apart.

Why best fit rather than a buddy system: a buddy allocator rounds every region up to a power of two,
and tensors are mostly not powers of two (a 4096x11008 bf16 MLP weight is 86 MiB; a buddy block for
it is 128 MiB, 33% lost). Best fit wastes at most ``ALIGN - 1`` bytes per region, and the holes it
leaves are measured and reported (:meth:`Allocator.stats`), not guessed. Operations are O(log n)
search plus O(n) list moves in the number of free holes, which stays small (holes coalesce).

Scenario (tested)::

    a = alloc(100); b = alloc(100); c = alloc(100)    # [a][b][c][ free ...  ]
    free(b)                                            # [a][ ][c][ free ...  ]
    alloc(64) == b                                     # best fit reuses the hole
    free(a); free(c)                                   # everything coalesces into one hole again
"""

from __future__ import annotations

import bisect
from collections.abc import Callable
from dataclasses import dataclass

ALIGN = 512
#: holes :meth:`Allocator.alloc` asks ``prefer`` about, smallest fitting first
PREFER_SCAN = 32
#: ``prefer(hole_start, hole_size, size) -> offset or None`` (see :meth:`Allocator.alloc`)
Prefer = Callable[[int, int, int], "int | None"]


def round_up(n: int, align: int = ALIGN) -> int:
    return (n + align - 1) // align * align


@dataclass(frozen=True)
class AllocStats:
    capacity_bytes: int
    used_bytes: int
    free_bytes: int
    largest_free_bytes: int
    free_holes: int
    regions: int

    @property
    def fragmentation(self) -> float:
        """Share of free bytes that are not in the largest hole: 0.0 = one hole, near 1.0 = crumbs."""
        if self.free_bytes == 0:
            return 0.0
        return 1.0 - self.largest_free_bytes / self.free_bytes


class Allocator:
    """Best-fit allocator over ``[0, capacity)``. Not thread-safe: the daemon's loop owns it."""

    def __init__(self, capacity: int, align: int = ALIGN) -> None:
        if align <= 0 or align & (align - 1):
            raise ValueError(f"alignment {align} is not a power of two")
        if capacity < align:
            raise ValueError(f"capacity {capacity} is below the {align}-byte alignment")
        self.align = align
        self.capacity = capacity - capacity % align
        self._free_start: dict[int, int] = {0: self.capacity}  # start -> size
        self._free_end: dict[int, int] = {self.capacity: 0}  # end -> start
        self._by_size: list[tuple[int, int]] = [(self.capacity, 0)]  # sorted (size, start)
        self._used: dict[int, int] = {}  # start -> size
        self.used_bytes = 0

    # -- internals ---------------------------------------------------------------------------
    def _add_hole(self, start: int, size: int) -> None:
        self._free_start[start] = size
        self._free_end[start + size] = start
        bisect.insort(self._by_size, (size, start))

    def _remove_hole(self, start: int, size: int) -> None:
        del self._free_start[start]
        del self._free_end[start + size]
        i = bisect.bisect_left(self._by_size, (size, start))
        del self._by_size[i]

    # -- API ---------------------------------------------------------------------------------
    def size_for(self, nbytes: int) -> int:
        """Bytes a request of ``nbytes`` really takes (zero-byte tensors still get a region)."""
        return round_up(max(nbytes, 1), self.align)

    def alloc(self, nbytes: int, prefer: Prefer | None = None) -> int | None:
        """Offset of a new region of at least ``nbytes``, or None when no hole is big enough.

        ``prefer(start, hole_size, size)``: where in that hole a region of ``size`` bytes should go
        (``start``, or ``start + hole_size - size``), or None when neither end suits. The fitting
        holes are asked smallest first (at most ``PREFER_SCAN`` of them) and the first answer
        wins; when none answers, the best fit's start is taken as without it. (The RAM tier
        prefers spans whose pages are still resident, see ``tierd.tiers.ram``.)
        """
        if nbytes < 0:
            raise ValueError("negative size")
        size = self.size_for(nbytes)
        i = bisect.bisect_left(self._by_size, (size, -1))
        if i == len(self._by_size):
            return None
        hole_size, start = self._by_size[i]
        at = start
        if prefer is not None:
            for hole_size_j, start_j in self._by_size[i : i + PREFER_SCAN]:
                where = prefer(start_j, hole_size_j, size)
                if where is not None:
                    if where not in (start_j, start_j + hole_size_j - size):
                        raise ValueError(f"prefer chose {where}, not an end of hole {start_j}+{hole_size_j}")
                    hole_size, start, at = hole_size_j, start_j, where
                    break
        self._remove_hole(start, hole_size)
        if at > start:
            self._add_hole(start, at - start)
        if start + hole_size > at + size:
            self._add_hole(at + size, start + hole_size - at - size)
        self._used[at] = size
        self.used_bytes += size
        return at

    def free(self, start: int) -> int:
        """Return the region at ``start`` to the free list; returns its size. KeyError if not in use."""
        size = freed = self._used.pop(start)
        self.used_bytes -= size
        end = start + size
        left = self._free_end.get(start)
        if left is not None:
            left_size = start - left
            self._remove_hole(left, left_size)
            start, size = left, size + left_size
        right_size = self._free_start.get(end)
        if right_size is not None:
            self._remove_hole(end, right_size)
            size += right_size
        self._add_hole(start, size)
        return freed

    def holes(self, min_size: int = 0) -> list[tuple[int, int]]:
        """Free (start, size) spans of at least ``min_size`` bytes, largest first."""
        return [(start, size) for size, start in reversed(self._by_size) if size >= min_size]

    def region_size(self, start: int) -> int:
        return self._used[start]

    def largest_free(self) -> int:
        return self._by_size[-1][0] if self._by_size else 0

    def stats(self) -> AllocStats:
        return AllocStats(
            capacity_bytes=self.capacity,
            used_bytes=self.used_bytes,
            free_bytes=self.capacity - self.used_bytes,
            largest_free_bytes=self.largest_free(),
            free_holes=len(self._by_size),
            regions=len(self._used),
        )

    def check(self) -> None:
        """Assert the internal invariants (used by tests): holes and regions tile the arena exactly."""
        spans = sorted(
            [(s, n, "free") for s, n in self._free_start.items()]
            + [(s, n, "used") for s, n in self._used.items()]
        )
        pos = 0
        prev_free = False
        for s, n, kind in spans:
            assert s == pos, f"gap or overlap at {pos} (next span at {s})"
            assert n > 0 and s % self.align == 0 and n % self.align == 0
            assert not (prev_free and kind == "free"), f"uncoalesced holes at {s}"
            prev_free = kind == "free"
            pos = s + n
        assert pos == self.capacity
        assert sorted((n, s) for s, n in self._free_start.items()) == self._by_size
        assert sum(self._used.values()) == self.used_bytes
