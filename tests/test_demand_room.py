"""A demand read never fails while its room is held only by speculative work, as a scripted scenario.

RAM holds four 1 MiB regions: two leased entries and two prefetches whose reads from the store are
held back (a store that blocks its reads until the test opens a gate). A get of a fifth entry finds
nothing it may demote; it must wait for a prefetch to land and take its room, not fail with TierFull.
Real tiers: a memfd RAM arena and a chunk store with the shared chunking and checksums.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import pytest

from tests.extra_tiers import DictStore
from tierd.manager import Manager
from tierd.placement import Placement
from tierd.protocol import Put
from tierd.tiers.ram import RamTier

MiB = 1 << 20
T = TypeVar("T")


class GatedStore(DictStore):
    """Reads wait until ``gate`` is set: a prefetch from it stays in flight as long as the test wants."""

    def __init__(self, capacity: int) -> None:
        super().__init__(capacity, name="disk")
        self.gate = threading.Event()
        self.gate.set()

    def _read_chunk(self, version: int, index: int, use: Callable[[Any], T]) -> T:
        if not self.gate.wait(timeout=30):
            raise TimeoutError("the test never opened the gate")
        return super()._read_chunk(version, index, use)


async def _until(cond: Callable[[], bool]) -> None:
    """Run the loop until ``cond`` holds (bounded), without sleeping for a fixed time."""
    for _ in range(100_000):
        if cond():
            return
        await asyncio.sleep(0)
    raise AssertionError("condition not reached")


@pytest.mark.asyncio
async def test_a_demand_read_takes_the_room_of_prefetches_in_flight() -> None:
    ram, store = RamTier(4 * MiB), GatedStore(64 * MiB)
    m = Manager(ram, store)
    pl = Placement(m)
    cid = m.add_client(1, 0, "t")
    try:
        for i, key in enumerate(["t/l1", "t/l2", "t/p1", "t/p2", "t/x"]):
            offset = await pl.alloc(key, MiB, owner=0)
            pid, offset = m.begin_put(cid, Put(1, key, "uint8", [MiB], MiB), offset)
            ram.view(offset, MiB)[:] = bytes([i + 1]) * MiB
            m.seal(cid, pid)
            await pl.evict(key)  # every entry now lives in the store alone
        assert ram.used_bytes == 0
        held = await pl.get(cid, [m.resolve("t/l1"), m.resolve("t/l2")])  # two regions leased

        store.gate.clear()
        spec = [m.resolve("t/p1"), m.resolve("t/p2")]
        prefetches = [asyncio.create_task(pl.load(e, for_prefetch=True)) for e in spec]
        full = 4 * ram.region_bytes(MiB)
        await _until(lambda: len(pl.moves.speculative["ram"]) == 2 and ram.used_bytes == full)

        demand = asyncio.create_task(pl.get(cid, [m.resolve("t/x")]))
        await _until(lambda: m.metrics.demand_waits_for_prefetch > 0)
        assert not demand.done()  # waiting for the room, not refused
        store.gate.set()
        [loc] = await asyncio.wait_for(demand, 30)
        await asyncio.gather(*prefetches)

        assert bytes(ram.view(loc.offset, MiB)) == bytes([5]) * MiB
        assert m.metrics.prefetch_taken == 1 and m.metrics.tier_full == 0
        assert sum(1 for e in spec if "ram" in e.where) == 1  # one kept, one taken
        m.check()
        m.release(cid, [loc.lease, *(h.lease for h in held)])
    finally:
        store.gate.set()
        await pl.close()
        ram.close()
