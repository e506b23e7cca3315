"""The use cases without the wire: scripted scenarios on :class:`tierd.service.Service`.

Real tiers (a memfd RAM arena, the LMDB disk tier), a real placement and prefetcher; no socket, no
frames, no messages: a put is a :class:`~tierd.entry.PutArgs`, a get a list of (key, version).
Each step's answer is checked to come at once (a plain value) where nothing has to wait, and as a
coroutine where something does.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from tierd.config import Config
from tierd.entry import PutArgs
from tierd.errors import InvalidRequest, NotFound
from tierd.manager import Manager
from tierd.placement import Placement
from tierd.prefetch import Prefetcher
from tierd.service import Service, settle
from tierd.tiers import registry

MiB = 1 << 20


@pytest_asyncio.fixture
async def svc(tmp_path: Path) -> AsyncIterator[Service]:
    cfg = Config(ram_bytes="4MiB", disk_bytes="64MiB", state_dir=str(tmp_path / "state"))
    tiers = registry.build(cfg)
    m = Manager(*tiers)  # type: ignore[arg-type]
    pl = Placement(m)
    pf = Prefetcher(pl, predictor="none")
    yield Service(m, pl, pf, describe=lambda: {"daemon": {"name": "test"}})
    m.check()
    pf.close()
    await pl.close()
    for t in tiers:
        t.close()


async def put(s: Service, cid: int, key: str, fill: int, nbytes: int = MiB, **kw) -> tuple[str, int]:
    """put, write the reserved region (as a client does through its mapping), seal."""
    put_id, offset = await settle(s.put(cid, PutArgs(key, "uint8", [nbytes], nbytes, **kw)))
    s.m.ram.view(offset, nbytes)[:] = bytes([fill]) * nbytes
    sealed = await settle(s.seal(cid, put_id))
    s.m.check()
    return sealed


@pytest.mark.asyncio
async def test_put_get_release_delete_without_the_wire(svc: Service) -> None:
    cid = svc.join(pid=1, uid=0, name="scripted")
    answer = svc.put(cid, PutArgs("t/a", "uint8", [MiB], MiB))
    assert isinstance(answer, tuple)  # room was free: answered at once
    put_id, offset = answer
    svc.m.ram.view(offset, MiB)[:] = b"\x07" * MiB
    with pytest.raises(NotFound):
        svc.get(cid, [("t/a", 0)])  # not visible before it is sealed
    assert svc.seal(cid, put_id) == ("t/a", put_id)  # not durable, nothing replaced: at once

    got = svc.get(cid, [("t/a", 0)])
    assert isinstance(got, list)  # home: no coroutine on the fast path
    [loc] = got
    assert (loc.key, loc.version, loc.nbytes) == ("t/a", put_id, MiB)
    assert bytes(svc.m.ram.view(loc.offset, MiB)) == b"\x07" * MiB
    assert svc.status()["leases"] == 1 and svc.stat("t/a")["leases"] == 1
    assert svc.release(cid, [loc.lease, 10**9]) == 1  # one id was never its lease

    assert svc.delete(cid, "t/a") is None  # not durable: answered at once
    assert svc.ls() == [] and svc.m.ram.used_bytes == 0
    rows = svc.trace()["accesses"]
    assert [r[3] for r in rows] == ["put", "get"]  # [t, client, key, op, ...]
    st = svc.status()
    assert st["counters"]["puts"] == 1 and st["counters"]["gets"] == 1 and st["counters"]["hits_ram"] == 1
    assert st["daemon"] == {"name": "test"} and st["placement"]["policy"]


@pytest.mark.asyncio
async def test_a_get_from_disk_waits_and_a_full_tier_makes_room(svc: Service) -> None:
    cid = svc.join(1, 0, "scripted")
    for i in range(4):  # the RAM tier holds four
        await put(svc, cid, f"t/{i}", i + 1)
    assert await svc.evict(cid, "t/0") == {"evicted": "t/0", "moved": True, "tiers": ["disk"]}

    answer = svc.get(cid, [("t/0", 0), ("t/1", 0)])
    assert inspect.iscoroutine(answer)  # t/0 is on disk: the answer waits for its promotion
    locs = await answer
    assert [bytes(svc.m.ram.view(x.offset, 4)) for x in locs] == [b"\x01" * 4, b"\x02" * 4]
    c = svc.status()["counters"]
    assert c["reads_disk"] == 1 and c["promotions"] == 1 and c["hits_ram"] == 1 and c["stall_us"] > 0
    svc.release(cid, [x.lease for x in locs])

    # the RAM tier (4 MiB) is full: a put waits while the coldest entry is demoted to disk
    assert svc.m.ram.allocate(MiB) is None
    later = svc.put(cid, PutArgs("t/4", "uint8", [MiB], MiB))
    assert inspect.iscoroutine(later)
    put_id, _offset = await later
    assert await settle(svc.seal(cid, put_id)) == ("t/4", put_id)
    assert svc.status()["counters"]["demotions"] >= 1
    assert sorted(e["key"] for e in svc.ls("t/")) == ["t/0", "t/1", "t/2", "t/3", "t/4"]


@pytest.mark.asyncio
async def test_durable_put_and_delete_wait_for_the_store(svc: Service) -> None:
    cid = svc.join(1, 0, "scripted")
    put_id, offset = await settle(svc.put(cid, PutArgs("t/d", "uint8", [MiB], MiB, durable=True)))
    svc.m.ram.view(offset, MiB)[:] = b"\x05" * MiB
    sealing = svc.seal(cid, put_id)
    assert inspect.iscoroutine(sealing)  # written through to the disk tier before it is published
    assert await sealing == ("t/d", put_id)
    assert svc.stat("t/d")["tiers"] == ["ram", "disk"]
    assert [r["ok"] for r in await svc.verify("t/")] == [True]

    deleting = svc.delete(cid, "t/d")
    assert inspect.iscoroutine(deleting)  # answered once a restart cannot bring it back
    assert await deleting is None
    with pytest.raises(NotFound):
        svc.stat("t/d")


@pytest.mark.asyncio
async def test_bad_requests_raise_typed_errors_and_leave_nothing(svc: Service) -> None:
    cid = svc.join(1, 0, "scripted")
    with pytest.raises(InvalidRequest):
        svc.put(cid, PutArgs("t/x", "uint8", [4], 5))  # nbytes does not match the shape
    with pytest.raises(InvalidRequest):
        svc.put(cid, PutArgs("t/x", "int32", [4], 16, codec="int8"))  # int8 needs floats
    with pytest.raises(InvalidRequest):
        svc.seal(cid, 12345)  # no such put on this client
    put_id, _ = await settle(svc.put(cid, PutArgs("t/x", "uint8", [4], 4)))
    other = svc.join(2, 0, "other")
    with pytest.raises(InvalidRequest):
        svc.seal(other, put_id)  # another client's put
    svc.abort(cid, put_id)
    with pytest.raises(NotFound):
        svc.get(cid, [("t/x", 0)])
    assert svc.m.ram.used_bytes == 0

    await put(svc, cid, "t/y", 9, nbytes=64)
    svc.pin(cid, "t/y", "ram")
    assert svc.unpin(cid, "t/y") is True and svc.unpin(cid, "t/y") is False
    assert svc.prefetch(cid, ["t/y", "t/nope"]) == 1
    assert len(await settle(svc.get(cid, [("t/y", 0)]))) == 1
    svc.leave(cid)  # the client's leases end with it
    assert svc.status()["leases"] == 0 and svc.status()["clients"] == 1
