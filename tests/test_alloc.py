"""Scenario and property tests of the arena's best-fit allocator (plain Python, no daemon)."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tierd.alloc import ALIGN, Allocator


def test_scenario_reuse_and_coalesce() -> None:
    a = Allocator(64 * 1024, align=64)
    x, y, z = a.alloc(100), a.alloc(100), a.alloc(100)
    assert (x, y, z) == (0, 128, 256)  # 100 rounds up to 128
    a.free(y)
    a.check()
    assert a.stats().free_holes == 2
    assert a.alloc(64) == y  # best fit takes the hole between x and z, not the tail
    a.free(x)
    a.free(z)
    a.free(y)
    a.check()
    s = a.stats()
    assert (s.used_bytes, s.free_holes, s.largest_free_bytes) == (0, 1, 64 * 1024)
    assert s.fragmentation == 0.0


def test_best_fit_picks_smallest_hole() -> None:
    a = Allocator(1 << 20)
    r = [a.alloc(n) for n in (4096, 64, 1024, 64, 8192, 64)]
    a.free(r[0])  # hole of 4096
    a.free(r[2])  # hole of 1024
    a.free(r[4])  # hole of 8192
    assert a.alloc(1000) == r[2]
    assert a.alloc(4000) == r[0]
    a.check()


def test_full_and_exact_fit() -> None:
    a = Allocator(4096)
    assert a.alloc(4096) == 0
    assert a.alloc(1) is None
    a.free(0)
    assert a.alloc(4097) is None
    assert a.alloc(0) == 0  # zero-byte tensors still get a (minimal) region
    assert a.region_size(0) == ALIGN


def test_fragmentation_is_reported() -> None:
    a = Allocator(64 * 10, align=64)
    regions = [a.alloc(64) for _ in range(10)]
    for r in regions[::2]:
        a.free(r)
    s = a.stats()
    assert s.free_bytes == 5 * 64 and s.largest_free_bytes == 64
    assert s.fragmentation == pytest.approx(0.8)
    assert a.alloc(128) is None  # enough bytes free, no hole big enough


def test_double_free_and_bad_size() -> None:
    a = Allocator(4096)
    r = a.alloc(10)
    a.free(r)
    with pytest.raises(KeyError):
        a.free(r)
    with pytest.raises(ValueError):
        a.alloc(-1)


def test_prefer_chooses_a_hole_and_an_end_else_best_fit() -> None:
    a = Allocator(10_000, align=64)
    r = [a.alloc(n) for n in (1024, 64, 2048, 64, 4096)]  # holes after frees: 1024 at 0, 2048 at 1088
    a.free(r[0])
    a.free(r[2])
    asked: list[tuple[int, int, int]] = []

    def only_the_2048_hole_at_its_end(start: int, hole: int, size: int) -> int | None:
        asked.append((start, hole, size))
        return start + hole - size if hole == 2048 else None

    # best fit would take the 1024-byte hole; the preferred one is the 2048-byte hole's end
    off = a.alloc(512, prefer=only_the_2048_hole_at_its_end)
    assert off == 1088 + 2048 - 512 and asked[0] == (0, 1024, 512)
    a.check()
    assert sorted(a.holes()) == sorted([(0, 1024), (1088, 2048 - 512), (7296, a.capacity - 7296)])
    # nothing preferred: the best fit's start, as without prefer
    assert a.alloc(512, prefer=lambda s, h, n: None) == 0
    with pytest.raises(ValueError, match="not an end"):
        a.alloc(64, prefer=lambda s, h, n: s + 64)
    a.check()


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(0, 20000)), max_size=200), st.integers(0, 2**32))
def test_random_ops_keep_invariants(ops: list[tuple[bool, int]], seed: int) -> None:
    rng = random.Random(seed)
    a = Allocator(256 * 1024)
    live: dict[int, int] = {}

    def prefer(start: int, hole: int, size: int) -> int | None:  # any end, or none, at random
        return rng.choice([start, start + hole - size, None])

    for is_alloc, n in ops:
        if is_alloc or not live:
            off = a.alloc(n, prefer=prefer if rng.random() < 0.5 else None)
            if off is None:
                assert a.largest_free() < a.size_for(n)
                continue
            end = off + a.size_for(n)
            for o, m in live.items():  # never overlaps a live region
                assert end <= o or off >= o + a.size_for(m)
            live[off] = n
        else:
            off = rng.choice(list(live))
            del live[off]
            a.free(off)
        a.check()
    for off in list(live):
        a.free(off)
    a.check()
    assert a.stats().free_holes == 1
