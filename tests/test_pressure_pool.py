"""While memory pressure holds the RAM tier down, free pages within its ceiling stay faulted in (a
pool the next region reuses) instead of being punched and refaulted; pages over it go back.

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
