"""The contract every memory tier and every chunk store keeps (tierd.tiers.memory, tierd.tiers.store).

Each test runs once per implementation: a new tier is added to MEMORY_TIERS or CHUNK_STORES and
gets the whole suite. The test-only tiers of tests/extra_tiers.py run it too.
"""

from __future__ import annotations

import itertools
import mmap
import os
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from tests.extra_tiers import DictStore, HostTier
from tierd.alloc import ALIGN
from tierd.codecs import get_codec
from tierd.errors import CorruptEntry, TierFull
from tierd.tiers.disk import DiskTier
from tierd.tiers.memory import MemoryTier
from tierd.tiers.ram import RamTier
from tierd.tiers.store import ChunkStore

MiB = 1 << 20
MEMORY_TIERS: dict[str, Callable[[int], MemoryTier]] = {
    "ram": RamTier,
    "host (tests only)": HostTier,
}
CHUNK_STORES: dict[str, Callable[[Path, int], ChunkStore]] = {
    "disk (LMDB)": lambda d, n: DiskTier(d / "state", n),
    "dict (tests only)": lambda d, n: DictStore(n),
}


@pytest.fixture(params=list(MEMORY_TIERS))
def tier(request: pytest.FixtureRequest) -> Iterator[MemoryTier]:
    t = MEMORY_TIERS[request.param](4 * MiB)
    yield t
    t.close()
    t.close()  # idempotent


@pytest.fixture(params=list(CHUNK_STORES))
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ChunkStore]:
    s = CHUNK_STORES[request.param](tmp_path, 16 * MiB)
    yield s
    s.close()
    s.close()


@pytest.fixture(scope="module")
def pool() -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(2) as p:
        yield p


# ---- memory tiers ------------------------------------------------------------------------------
def test_regions_are_aligned_disjoint_and_accounted(tier: MemoryTier, seed: int) -> None:
    rng = np.random.default_rng(seed)
    assert tier.ceiling == tier.capacity_bytes and tier.used_bytes == 0
    regions: dict[int, int] = {}
    for _ in range(40):
        n = int(rng.integers(1, 64 * 1024))
        off = tier.allocate(n)
        assert off is not None and off % ALIGN == 0
        assert tier.region_bytes(n) >= n
        regions[off] = tier.region_bytes(n)
    spans = sorted(regions.items())
    assert all(a + n <= b for (a, n), (b, _) in itertools.pairwise(spans)), "overlapping regions"
    assert tier.used_bytes == sum(regions.values())
    assert tier.space().free_bytes == tier.capacity_bytes - tier.used_bytes
    tier.check()
    for off, size in list(regions.items())[::2]:
        assert tier.free(off) == size
        del regions[off]
    assert tier.used_bytes == sum(regions.values())
    tier.check()


def test_full_is_none_and_capacity_holds_even_over_the_ceiling(tier: MemoryTier) -> None:
    assert tier.allocate(tier.capacity_bytes + 1, over_ceiling=True) is None
    whole = tier.allocate(tier.capacity_bytes)
    assert whole is not None and tier.space().largest_free_bytes == 0
    assert tier.allocate(1) is None and tier.allocate(1, over_ceiling=True) is None
    tier.free(whole)
    assert tier.used_bytes == 0 and tier.space().largest_free_bytes == tier.capacity_bytes


def test_allocate_keeps_under_a_lowered_ceiling(tier: MemoryTier) -> None:
    first = tier.allocate(MiB)
    assert first is not None
    tier.ceiling = MiB + MiB // 2
    assert tier.allocate(MiB) is None  # would pass the ceiling: refused though holes are free
    assert tier.used_bytes == tier.region_bytes(MiB)
    small = tier.allocate(MiB // 4)
    assert small is not None  # under the ceiling: fine
    over = tier.allocate(MiB, over_ceiling=True)  # placement's demand case, nothing left to demote
    assert over is not None and tier.used_bytes > tier.ceiling
    for off in (first, small, over):
        tier.free(off)
    tier.ceiling = tier.capacity_bytes
    assert tier.allocate(2 * MiB) is not None


def test_a_client_mapping_sees_what_the_daemon_wrote(tier: MemoryTier) -> None:
    off = tier.allocate(5000)
    assert off is not None
    payload = np.arange(5000, dtype=np.uint8).tobytes()
    tier.view(off, 5000)[:] = payload
    space, at = tier.split(off)
    h = tier.map_handles(os.getuid())[space]
    assert h.space == space and h.writable and h.nbytes >= tier.capacity_bytes
    with mmap.mmap(h.fd, h.nbytes, prot=mmap.PROT_READ) as client:
        assert client[at : at + 5000] == payload
    tier.free(off)


# ---- chunk stores ------------------------------------------------------------------------------
def _meta(version: int, n: int, durable: bool = True) -> dict:
    return {"key": f"c/{version}", "version": version, "dtype": "uint8", "shape": [n], "nbytes": n,
            "tags": ["t"], "durable": durable, "ttl": None, "scope": "shared", "created": 1.0}  # fmt: skip


def _write(
    store: ChunkStore, pool: ThreadPoolExecutor, version: int, raw: np.ndarray, chunk: int = 64 * 1024
):
    plan = get_codec("raw").prepare(memoryview(raw), "uint8", [raw.size], chunk)
    return store.write(_meta(version, raw.size), plan, memoryview(raw), pool)


def test_write_read_round_trip_over_several_chunks(store: ChunkStore, pool, seed: int) -> None:
    raw = np.random.default_rng(seed).integers(0, 255, 300_001, dtype=np.uint8)
    rec = _write(store, pool, 7, raw)
    assert len(rec.chunks) == 5 and rec.nbytes == raw.size and rec.key == "c/7"
    out = bytearray(raw.size)
    store.read_into(rec, memoryview(out), pool)
    assert bytes(out) == raw.tobytes()
    assert store.verify(rec) is None
    st = store.stats()
    assert st["records"] == 1 and st["writes"] == 1 and st["reads"] == 1 and st["corrupt"] == 0
    assert st["raw_bytes"] == raw.size and 0 < st["used_bytes"] == store.used_bytes <= st["capacity_bytes"]


def test_damaged_chunk_is_refused_never_served(store: ChunkStore, pool) -> None:
    raw = np.full(200_000, 3, dtype=np.uint8)
    rec = _write(store, pool, 9, raw)
    store._put_chunk(9, 1, b"\x00" * rec.chunks[1][0])  # same size, other bytes
    assert store.verify(rec) == "chunk 1 checksum mismatch"
    # page-aligned, as a RAM tier region is: a store that reads straight into its destination
    # (the disk tier's O_DIRECT) does so here, where a bytearray is aligned only by chance
    out = memoryview(mmap.mmap(-1, raw.size))
    with pytest.raises(CorruptEntry) as ei:
        store.read_into(rec, memoryview(out), pool)
    assert ei.value.details["chunk"] == 1 and store.stats()["corrupt"] == 1


def test_scan_at_start_keeps_complete_records_and_sweeps_the_rest(store: ChunkStore, pool) -> None:
    raw = np.ones(100_000, dtype=np.uint8)
    kept, dropped = _write(store, pool, 1, raw), _write(store, pool, 2, raw)
    store._put_chunk(3, 0, b"orphan: its record was never committed")
    store.counts = type(store.counts)()  # as if the daemon had just started
    found = store.load_index(keep=lambda r: r.version == kept.version)
    assert [r.version for r in found] == [1] and found[0] == kept
    assert set(store._chunk_versions()) == {1} and store.stats()["records"] == 1
    assert store.verify(dropped) == "chunk 0 missing"


def test_unpublish_hides_the_record_but_not_the_chunks_delete_removes_both(store: ChunkStore, pool) -> None:
    raw = np.arange(150_000, dtype=np.uint64).astype(np.uint8)
    rec = _write(store, pool, 4, raw)
    store.unpublish(rec)
    assert [v for v, _ in store._scan()] == []
    out = bytearray(raw.size)
    store.read_into(rec, memoryview(out), pool)  # a read in flight still finds its chunks
    assert bytes(out) == raw.tobytes()
    store.delete(rec)
    assert store.used_bytes == 0 and store.stats()["records"] == 0
    assert set(store._chunk_versions()) == set()


def test_full_store_is_tier_full_and_leaves_nothing(store: ChunkStore, pool) -> None:
    raw = np.random.default_rng(1).integers(0, 255, 20 * MiB, dtype=np.uint8)
    with pytest.raises(TierFull) as ei:
        _write(store, pool, 5, raw, chunk=MiB)
    assert ei.value.details["tier"] == store.name
    assert store.used_bytes == 0 and set(store._chunk_versions()) == set() and list(store._scan()) == []


# ---- the RAM tier's arenas (one per uid) -------------------------------------------------------
def test_ram_arenas_keep_uids_apart_and_their_pages_within_the_capacity() -> None:
    """Each uid's regions lie in its own memfd (a location names it); the arenas' pages together
    never pass the capacity: a new uid's writes push out the free pages of the others first."""
    tier = RamTier(8 * MiB, uid=0)
    try:
        assert tier.resident_bytes() == 8 * MiB  # the daemon uid's arena is pre-faulted
        mine = tier.allocate(2 * MiB, owner=0)
        theirs = tier.allocate(4 * MiB, owner=4242)
        assert mine is not None and theirs is not None
        assert tier.split(mine)[0] == 0 and tier.split(theirs)[0] == 1
        tier.view(theirs, 4 * MiB)[:] = b"\x01" * (4 * MiB)
        assert tier.resident_bytes() <= tier.capacity_bytes
        assert tier.used_bytes == 6 * MiB and tier.allocate(4 * MiB, owner=4242) is None  # 10 > 8
        maps = tier.map_handles(4242)
        assert [(h.space, h.writable) for h in maps] == [(0, False), (1, True)]
        with pytest.raises(PermissionError):  # the other uid's fd cannot map for writing
            mmap.mmap(maps[0].fd, maps[0].nbytes, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        tier.free(mine)
        tier.free(theirs)
        tier.check()
        assert tier.used_bytes == 0
    finally:
        tier.close()


def test_ram_quota_caps_each_uid_not_the_tier() -> None:
    tier = RamTier(8 * MiB, uid=0, quota=3 * MiB)
    try:
        a = tier.allocate(3 * MiB, owner=7)
        assert a is not None and tier.over_quota(7, 1) and tier.allocate(1, owner=7) is None
        assert not tier.over_quota(8, MiB) and tier.allocate(3 * MiB, owner=8) is not None
        assert tier.stats()["quota_bytes"] == 3 * MiB
    finally:
        tier.close()
