"""The tier list as scenarios: a third tier added by configuration alone, the pressure ceiling on
every allocation path, the protection of a move. Real tiers (memfd arenas, an LMDB file), no socket
except in the last test, which runs a real daemon with the third tier."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest
import pytest_asyncio
import torch

from tierd.config import Config, ConfigError, parse_tiers
from tierd.errors import Unsupported
from tierd.manager import Manager
from tierd.placement import Placement
from tierd.protocol import Put
from tierd.tiers import registry
from tierd_client import Client

MiB = 1 << 20
THREE = "ram,host=tests.extra_tiers:HostTier@8MiB,disk"


async def put(m: Manager, pl: Placement, cid: int, key: str, fill: int, nbytes: int = MiB) -> int:
    """A put as the daemon makes one: the home tier's allocate, else placement's room-making alloc;
    then the client's write and SEAL."""
    offset = m.ram.allocate(nbytes)
    if offset is None:
        offset = await pl.alloc(key, nbytes, owner=0)
    pid, offset = m.begin_put(cid, Put(1, key, "uint8", [nbytes], nbytes), offset)
    m.ram.view(offset, nbytes)[:] = bytes([fill]) * nbytes
    m.seal(cid, pid)
    m.check()
    return pid


async def read(m: Manager, pl: Placement, cid: int, key: str) -> bytes:
    [loc] = await pl.get(cid, [m.resolve(key)])
    data = bytes(m.ram.view(loc.offset, loc.nbytes))
    m.release(cid, [loc.lease])
    return data


@pytest_asyncio.fixture
async def three(tmp_path: Path) -> AsyncIterator[tuple[Manager, Placement, int]]:
    cfg = Config(ram_bytes="4MiB", disk_bytes="64MiB", state_dir=str(tmp_path / "state"), tiers=THREE)
    tiers = registry.build(cfg)
    m = Manager(*tiers)  # type: ignore[arg-type]
    pl = Placement(m)
    yield m, pl, m.add_client(1, 0, "t")
    m.check()
    await pl.close()
    for t in tiers:
        t.close()


@pytest.mark.asyncio
async def test_a_configured_third_tier_takes_demotions_and_gives_them_back(three) -> None:
    m, pl, cid = three
    assert list(m.tiers) == ["ram", "host", "disk"]
    for i in range(14):  # 14 MiB through a 4 MiB RAM tier and an 8 MiB host tier
        await put(m, pl, cid, f"w/{i}", i)
    where = {e.key: e.tiers for e in m.entries.values()}
    assert where["w/13"][0] == "ram" and where["w/0"] == ["disk"]
    assert any(t == ["host"] for t in where.values()), where  # demoted from RAM into host only
    assert m.tiers["host"].used_bytes > 0 and m.metrics.demotions > 0
    # read everything back: from host (a memory copy, no disk read), from disk, or from RAM
    before = m.metrics.snapshot()
    sources = []
    for i in range(14):
        e = m.entries[f"w/{i}"]
        sources.append(e.tiers[0])
        [loc] = await pl.get(cid, [e])
        assert bytes(m.ram.view(loc.offset, loc.nbytes)) == bytes([i]) * MiB
        assert e.tiers[0] == "ram" and sources[-1] in e.tiers  # promoted; the lower copy stays
        m.release(cid, [loc.lease])
        m.check()
    assert "host" in sources and "disk" in sources, sources
    assert m.metrics.promotions - before["promotions"] == sum(s != "ram" for s in sources)
    assert m.metrics.reads_disk - before["reads_disk"] == sources.count("disk")
    st = {t["name"]: t for t in m.status()["tiers"]}
    assert list(st) == ["ram", "host", "disk"] and st["host"]["entries"] > 0
    # evict pushes an entry out of every memory tier; pin holds it in the tier named
    out = await pl.evict("w/13")
    assert out["moved"] and out["tiers"] == ["disk"]
    await pl.get(cid, [m.entries["w/13"]])
    m.release(cid, list(m.clients[cid].leases))
    assert m.entries["w/13"].tiers == ["ram", "disk"]
    with pytest.raises(Unsupported, match="is not in host"):
        m.pin("w/13", "host")
    m.pin("w/13", "ram")
    assert await pl.balance_once(target_used=0) > 0 and m.entries["w/13"].tiers == ["ram", "disk"]
    m.check()


@pytest.mark.asyncio
async def test_puts_stay_under_a_lowered_ceiling(three) -> None:
    m, pl, cid = three
    for i in range(3):
        await put(m, pl, cid, f"c/{i}", i)
    ceiling = pl.lower_ceiling(2 * MiB)  # the pressure monitor gives RAM back
    assert ceiling == 2 * MiB and m.ram.used_bytes > ceiling
    assert m.ram.allocate(MiB) is None  # the fast path cannot take it either: the tier refuses
    for i in range(3, 8):
        await put(m, pl, cid, f"c/{i}", i)
        assert m.ram.used_bytes <= ceiling, f"put {i} took RAM above the ceiling"
    for i in range(8):
        assert await read(m, pl, cid, f"c/{i}") == bytes([i]) * MiB
        assert m.ram.used_bytes <= ceiling, "a promotion took RAM above the ceiling"


@pytest.mark.asyncio
async def test_a_protected_version_is_neither_demoted_nor_freed_until_the_move_ends(three) -> None:
    m, pl, cid = three
    await put(m, pl, cid, "p/a", 1)
    e = m.entries["p/a"]
    with m.protected(e):
        assert pl.victim() is None and not await pl.demote(e)
        m.delete("p/a")  # hidden while protected: held until the block ends
        assert e.state == "sealed" and e.version in m.versions
        m.check()
    assert e.state == "freed" and m.ram.used_bytes == 0


def test_tier_list_configuration_is_checked() -> None:
    assert [t.name for t in parse_tiers(THREE)] == ["ram", "host", "disk"]
    for bad, why in [
        ("disk,ram", "must start with ram"),
        ("ram,ram", "twice"),
        ("ram,gpu", "gpu must come first"),
        ("gpu,disk,ram", "must start with ram, or gpu then ram"),
        ("ram,flash", "is not gpu, ram, disk or"),
        ("ram,disk=x.y:Z@1GiB", "built-in"),
        ("ram,x=a:B@lots", "not a size"),
    ]:
        with pytest.raises(ConfigError, match=why):
            parse_tiers(bad)
    with pytest.raises(ConfigError, match="cannot load"):
        registry.build(Config(ram_bytes="1MiB", disk_bytes="0", tiers="ram,x=no.such.module:T@1MiB"))


def test_a_daemon_runs_with_the_third_tier(start_daemon) -> None:
    d = start_daemon("--tiers", THREE, ram_bytes="8MiB", disk_bytes="64MiB")
    rng = np.random.default_rng(0)
    ts = [torch.from_numpy(rng.integers(0, 255, MiB, dtype=np.uint8)) for _ in range(20)]
    with Client(d.socket) as c:
        for i, t in enumerate(ts):
            c.put(f"d/{i}", t)
        tiers = {t["name"]: t for t in c.stats()["tiers"]}
        assert list(tiers) == ["ram", "host", "disk"] and tiers["host"]["entries"] > 0
        for i, t in enumerate(ts):
            got = c.get(f"d/{i}")
            assert torch.equal(got, t)
            c.release(got)
        assert c.stats()["counters"]["promotions"] > 0


@pytest.mark.asyncio
async def test_a_demotion_under_pressure_writes_small_chunks(tmp_path: Path) -> None:
    # A chunk on its way to the disk is held about twice until it commits (the staging buffer,
    # LMDB's dirty pages): while pressure holds the RAM tier down, demotions write chunks of
    # RELIEF_CHUNK_BYTES so giving memory back does not first take 2 x 16 MiB of it.
    from tierd.tiers.store import CHUNK_BYTES, RELIEF_CHUNK_BYTES

    cfg = Config(ram_bytes="64MiB", disk_bytes="256MiB", state_dir=str(tmp_path / "state"))
    tiers = registry.build(cfg)
    m = Manager(*tiers)  # type: ignore[arg-type]
    pl = Placement(m)
    disk = m.stores["disk"]
    try:
        cid = m.add_client(1, 0, "t")
        await put(m, pl, cid, "p/calm", 1, 24 * MiB)
        assert (await pl.evict("p/calm"))["tiers"] == ["disk"]
        await put(m, pl, cid, "p/short", 2, 24 * MiB)
        assert disk.shed() == disk._lead + CHUNK_BYTES  # what pressure takes back first
        pl.lower_ceiling(8 * MiB)
        assert await pl.balance_once(target_used=8 * MiB) == 24 * MiB
        assert m.entries["p/short"].tiers == ["disk"]
        plans = {r.key: r.plan for r in disk.load_index(lambda r: True)}
        assert plans["p/calm"]["raw_chunk_bytes"] == CHUNK_BYTES
        assert plans["p/short"]["raw_chunk_bytes"] == RELIEF_CHUNK_BYTES
        assert len(disk._stage) == disk._lead + RELIEF_CHUNK_BYTES  # staged no more than a chunk
        pl.raise_ceiling(64 * MiB)
        assert await read(m, pl, cid, "p/calm") == bytes([1]) * 24 * MiB
        assert await read(m, pl, cid, "p/short") == bytes([2]) * 24 * MiB
        m.check()
    finally:
        await pl.close()
        for t in tiers:
            t.close()
