"""While memory pressure holds the RAM tier down, free pages within its ceiling stay faulted in (a
pool the next region reuses) instead of being punched and refaulted; pages over it go back; and a
new region goes on resident free pages before a punched hole.

No cgroup and no timing: the arena's pages are read from its memfd (st_blocks).
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterator

import pytest

from tierd.tiers.ram import PAGE, RamTier, Spans

MiB = 1 << 20


@pytest.fixture
def ram() -> Iterator[RamTier]:
    t = RamTier(16 * MiB)  # the daemon uid's arena: backed and pre-faulted
    released: list[int] = []
    t.on_release = released.append
    t.released = released  # type: ignore[attr-defined]
    yield t
    t.close()


def test_free_under_a_lowered_ceiling_keeps_pages_within_it(ram: RamTier) -> None:
    regions = [ram.allocate(2 * MiB) for _ in range(4)]  # 8 MiB used of 16, all 16 resident
    assert all(r is not None for r in regions)
    ram.release_free(2 * MiB)  # pressure took the free pages: resident = used
    assert ram.resident_bytes() == ram.used_bytes == 8 * MiB
    ram.ceiling = 10 * MiB
    ram.released.clear()  # type: ignore[attr-defined]
    # a demotion frees a region: its pages stay (8 MiB resident, within the 10 MiB ceiling) ...
    ram.free(regions[0])
    assert ram.resident_bytes() == 8 * MiB and sum(ram.released) == 0  # type: ignore[attr-defined]
    # ... and the next promotion of that size reuses them without faulting pages in
    again = ram.allocate(2 * MiB)
    assert again == regions[0] and ram.resident_bytes() == 8 * MiB


def test_free_over_the_ceiling_gives_the_pages_back(ram: RamTier) -> None:
    regions = [ram.allocate(2 * MiB) for _ in range(4)]
    ram.release_free(2 * MiB)
    ram.ceiling = 5 * MiB  # pressure asked for more than the free pages: pages above it must go
    ram.released.clear()  # type: ignore[attr-defined]
    ram.free(regions[0])
    assert ram.resident_bytes() == 6 * MiB and sum(ram.released) == 2 * MiB  # type: ignore[attr-defined]
    ram.free(regions[1])
    assert ram.resident_bytes() == 4 * MiB
    ram.free(regions[2])  # now within the ceiling: kept
    assert ram.resident_bytes() == 4 * MiB


def test_release_free_stops_at_its_limit_and_counts_only_real_pages(ram: RamTier) -> None:
    assert ram.allocate(2 * MiB) is not None  # 14 MiB free, resident
    got = ram.release_free(2 * MiB, limit=1 * MiB)
    assert 1 * MiB <= got <= 2 * MiB and got == 16 * MiB - ram.resident_bytes()  # not the whole hole
    rest = ram.release_free(2 * MiB)
    assert ram.resident_bytes() == 2 * MiB and got + rest == 14 * MiB
    assert ram.release_free(2 * MiB) == 0  # holes already punched give nothing back again


def test_a_region_goes_on_resident_pages_before_a_punched_hole() -> None:
    ram = RamTier(16 * MiB)  # pre-faulted
    try:
        a, b, c, d, f = (ram.allocate(n * MiB) for n in (2, 1, 3, 1, 4))  # 11 MiB used, 5 MiB free at the end
        assert None not in (a, b, c, d, f)
        ram.ceiling = 13 * MiB  # pressure holds the tier's pages at 13 MiB
        ram.free(c)  # a 3 MiB hole, whose pages go back (16 MiB resident > 13) ...
        ram.free(a)  # ... and a 2 MiB hole whose pages stay (13 MiB resident, the pool)
        resident = ram.resident_bytes()
        assert resident == 13 * MiB
        ram.ceiling = ram.capacity_bytes  # pressure eased
        # plain best fit would take the 2 MiB hole for 2 MiB (resident: fine) ...
        assert ram.allocate(2 * MiB) == a and ram.resident_bytes() == resident
        # ... but for 3 MiB it took the punched 3 MiB hole and faulted it in; the 5 MiB resident
        # tail is taken instead (at its start), and no page comes back
        got = ram.allocate(3 * MiB)
        assert got is not None and got != c and ram.resident_bytes() == resident
        ram.check()
        # only when nothing resident fits does a region go into the punched hole
        assert ram.allocate(2 * MiB) is not None and ram.resident_bytes() == resident
        last = ram.allocate(3 * MiB)
        assert last == c
        ram.view(last, 3 * MiB)[:] = b"x" * (3 * MiB)  # the put's write faults its pages in
        assert ram.resident_bytes() == resident + 3 * MiB
        ram.check()
    finally:
        ram.close()


def test_spans_merge_split_and_overlap() -> None:
    s = Spans()
    s.add(10, 20)
    s.add(30, 40)
    s.add(20, 25)  # touches [10, 20): merged
    assert list(s) == [(10, 25), (30, 40)]
    s.add(24, 31)  # bridges both
    assert list(s) == [(10, 40)]
    s.remove(15, 18)  # splits
    assert list(s) == [(10, 15), (18, 40)]
    s.remove(0, 12)
    s.remove(35, 99)
    assert list(s) == [(12, 15), (18, 35)] and s.total() == 20
    assert s.overlaps(14, 16) and s.overlaps(0, 13) and s.overlaps(34, 99)
    assert not s.overlaps(15, 18) and not s.overlaps(35, 50) and not s.overlaps(0, 12)
    s.add(5, 5)  # empty: nothing
    s.remove(0, 100)
    assert list(s) == [] and not s.overlaps(0, 100)


def kernel_holes(fd: int, size: int) -> list[tuple[int, int]]:
    """The memfd's holes as the kernel sees them (SEEK_DATA / SEEK_HOLE), merged."""
    out, pos = [], 0
    while pos < size:
        hole = os.lseek(fd, pos, os.SEEK_HOLE)
        if hole >= size:
            break
        try:
            data = os.lseek(fd, hole, os.SEEK_DATA)
        except OSError:  # ENXIO: a hole to the end
            data = size
        out.append((hole, min(data, size)))
        pos = data
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_punched_spans_the_tier_keeps_are_the_kernels_holes(seed: int) -> None:
    """Random regions put, written, freed and punched under a moving ceiling, in a pre-faulted arena
    and in a sparse one (another uid's), each region written at once as a put writes it: after
    every step the spans the tier records as punched are exactly the memfd's holes."""
    rng = random.Random(seed)
    ram = RamTier(32 * MiB)
    try:
        for uid in (os.getuid(), os.getuid() + 1):
            a = ram.arena(uid)
            live: dict[int, int] = {}
            for _step in range(300):
                op = rng.random()
                if op < 0.5 or not live:
                    n = rng.choice([PAGE // 2, PAGE, 3 * PAGE + 100, MiB, 2 * MiB + 4000])
                    loc = ram.allocate(n, owner=uid)
                    if loc is None:
                        continue
                    ram.view(loc, n)[:] = b"\x01" * n  # the put's write
                    live[loc] = n
                elif op < 0.85:
                    loc = rng.choice(list(live))
                    del live[loc]
                    ram.free(loc)
                else:
                    ram.ceiling = rng.choice([ram.capacity_bytes, 16 * MiB, 8 * MiB])
                    if rng.random() < 0.5:
                        ram.release_free(rng.choice([PAGE, 2 * MiB]))
                assert list(a.punched) == kernel_holes(a.fd, ram.capacity_bytes), _step
            for loc in list(live):
                ram.free(loc)
            ram.ceiling = ram.capacity_bytes
        ram.check()
    finally:
        ram.close()
