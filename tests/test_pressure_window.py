"""Memory pressure and a streaming client's window: below critical, relief gives back free pages,
cold entries and predictions, never what a client hinted and has not read yet; at critical (the
model itself grew, say) it takes that too, and the group's memory comes first.

Real tiers (a pre-faulted memfd arena, an LMDB file), the real Placement and Relief; the machine's
memory readings are scripted through the monitor's file and virtual-memory inputs (no cgroup, no
timing).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import pytest_asyncio

from tierd.config import Config
from tierd.manager import Manager
from tierd.monitor import Monitor
from tierd.placement import Placement
from tierd.prefetch import Prefetcher
from tierd.pressure import Relief
from tierd.protocol import Put
from tierd.tiers import registry

MiB = 1 << 20
TOTAL = 10_000 * MiB  # levels: critical below 500 MiB available, high below 1000, low below 1500


@dataclass
class Vm:
    available: int
    total: int = TOTAL


def no_file(path: str) -> str:
    raise FileNotFoundError(path)  # no cgroup, no PSI: the levels come from the bytes available


@pytest_asyncio.fixture
async def daemon(tmp_path: Path) -> AsyncIterator[tuple[Manager, Placement, Relief, Vm, int]]:
    cfg = Config(ram_bytes="8MiB", disk_bytes="64MiB", state_dir=str(tmp_path / "state"))
    tiers = registry.build(cfg)
    m = Manager(*tiers)  # type: ignore[arg-type]
    pl = Placement(m)
    vm = Vm(available=8000 * MiB)
    relief = Relief(pl, m.ram, Monitor(read_file=no_file, vm=lambda: vm))
    yield m, pl, relief, vm, m.add_client(1, 0, "t")
    m.check()
    await pl.close()
    for t in tiers:
        t.close()


async def put(m: Manager, cid: int, key: str, fill: int) -> None:
    offset = m.ram.allocate(MiB)
    assert offset is not None
    pid, offset = m.begin_put(cid, Put(1, key, "uint8", [MiB], MiB), offset)
    m.ram.view(offset, MiB)[:] = bytes([fill]) * MiB
    m.seal(cid, pid)


@pytest.mark.asyncio
async def test_high_pressure_keeps_the_hinted_window_and_critical_takes_it(daemon) -> None:
    m, pl, relief, vm, cid = daemon
    for i in range(6):
        await put(m, cid, f"w/{i}", i)
    e = {i: m.entries[f"w/{i}"] for i in range(6)}
    [lease] = await pl.get(cid, [e[0]])  # the running block: leased
    for i in (3, 4):  # the next two blocks: demoted once, then loaded again for a client's hint
        assert await pl.demote(e[i])
        await pl.load(e[i], for_prefetch=True)
        assert e[i].prefetched and e[i].hinted
    assert pl.held_bytes() == MiB and pl.held_bytes(hinted=True) == 3 * MiB
    await relief.poll()  # calm: nothing given back, the window (3 MiB) is noted
    assert relief.last is not None and relief.last.level == "none" and m.ram.ceiling == m.ram.capacity_bytes
    [nxt] = await pl.get(cid, [e[3]])  # the model reads the next block: the window is 2 MiB at this moment
    m.release(cid, [nxt.lease])
    assert pl.held_bytes(hinted=True) == 2 * MiB

    vm.available = 800 * MiB  # high: the monitor asks for far more than the 8 MiB tier holds
    await relief.poll()
    assert relief.last is not None and relief.last.level == "high" and relief.last.shrink_bytes == 8 * MiB
    assert m.ram.ceiling == 3 * MiB  # the largest window of the last polls: nothing below it
    in_ram = [i for i in range(6) if "ram" in e[i].where]
    assert len(in_ram) == 3 and {0, 4} <= set(in_ram)  # cold entries went down to it, the window stayed
    assert e[4].prefetched and m.ram.used_bytes == 3 * MiB
    assert m.ram.resident_bytes() <= 3 * MiB + 2 * MiB  # free pages went back (holes under 2 MiB stay)
    assert m.metrics.pressure_released_bytes > 0 and m.metrics.prefetch_wasted_bytes == 0

    vm.available = 300 * MiB  # critical: the model grew, the OOM killer is near
    await relief.poll()
    assert relief.last is not None and relief.last.level == "critical"
    assert m.ram.ceiling == MiB  # only what is leased now
    assert [i for i in range(6) if "ram" in e[i].where] == [0]
    assert m.metrics.prefetch_wasted_bytes == MiB  # the unread block was given back, counted as wasted
    for i in range(1, 6):  # nothing lost: every entry reads back from the disk tier
        [loc] = await pl.get(cid, [e[i]])
        assert bytes(m.ram.view(loc.offset, loc.nbytes)) == bytes([i]) * MiB
        m.release(cid, [loc.lease])
    m.release(cid, [lease.lease])


@pytest.mark.asyncio
async def test_high_pressure_keeps_room_for_a_hinted_window_not_loaded_yet(daemon) -> None:
    m, pl, relief, vm, cid = daemon
    for i in range(6):
        await put(m, cid, f"w/{i}", i)
    for i in range(1, 6):
        assert await pl.demote(m.entries[f"w/{i}"])
    [lease] = await pl.get(cid, [m.entries["w/0"]])
    pf = Prefetcher(pl, predictor="none")
    try:
        # the client hints its next three blocks; none is loaded yet (a prefetch that found no room
        # under a ceiling would be dropped, and the window would never show in RAM)
        assert pf.hint(cid, ["w/1", "w/2", "w/3", "w/nothing"]) == 3
        assert m.clients[cid].hint_bytes == 3 * MiB
        assert pl.held_bytes() == MiB and pl.held_bytes(hinted=True) == 4 * MiB
        vm.available = 800 * MiB
        await relief.poll()
        assert relief.last is not None and relief.last.level == "high"
        assert m.ram.ceiling == 4 * MiB  # room for the lease and the three hinted blocks
        vm.available = 300 * MiB
        await relief.poll()
        assert m.ram.ceiling == MiB  # critical: only the lease
    finally:
        m.release(cid, [lease.lease])
        pf.close()
