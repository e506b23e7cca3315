"""While memory pressure holds the RAM tier down, free pages within its ceiling stay faulted in (a
pool the next region reuses) instead of being punched and refaulted; pages over it go back; and a
new region goes on resident free pages before a punched hole.

No cgroup and no timing: the arena's pages are read from its memfd (st_blocks).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tierd.tiers.ram import RamTier

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
