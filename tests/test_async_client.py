"""AsyncClient: the same verbs awaited, concurrent requests on one connection (asyncio and uvloop)."""

from __future__ import annotations

import asyncio

import pytest
import torch

from tierd.launch import Daemon
from tierd_client import AsyncClient, DaemonUnavailable, NotFound, TierFull


@pytest.mark.asyncio
async def test_async_verbs(daemon: Daemon) -> None:
    async with AsyncClient(daemon.socket) as c:
        x = torch.randn(64, 64, dtype=torch.bfloat16)
        h = await c.put("a/x", x, tags=["t"])
        t = await c.get(h)
        assert torch.equal(t, x) and c.arena is not None and c.arena.contains(t)
        assert (await c.stat("a/x"))["tags"] == ["t"]
        assert [e["key"] for e in await c.ls("a/")] == ["a/x"]
        assert (await c.stats())["leases"] == 1
        await c.release(t)
        assert (await c.stats())["leases"] == 0
        await c.pin("a/x")
        assert await c.unpin("a/x") is True
        assert await c.prefetch(["a/x"]) == 1
        await c.delete("a/x")
        with pytest.raises(NotFound):
            await c.get("a/x")


@pytest.mark.asyncio
async def test_concurrent_requests_on_one_connection(daemon: Daemon) -> None:
    async with AsyncClient(daemon.socket) as c:
        xs = [torch.full((100,), float(i)) for i in range(50)]
        await asyncio.gather(*(c.put(f"c/{i}", x) for i, x in enumerate(xs)))
        ts = await asyncio.gather(*(c.get(f"c/{i}") for i in range(50)))
        assert all(torch.equal(t, x) for t, x in zip(ts, xs, strict=True))
        big = torch.randn(4 << 20)  # copied in an executor
        await c.put("c/big", big)
        assert torch.equal(await c.get("c/big"), big)
        with pytest.raises(TierFull):
            await c.put("c/huge", torch.empty(32 << 20))
        assert len(await c.ls("c/")) == 51


@pytest.mark.asyncio
async def test_daemon_gone(daemon: Daemon) -> None:
    c = await AsyncClient.connect(daemon.socket)
    daemon.kill()
    with pytest.raises(DaemonUnavailable):
        await c.stats()
    await c.close()
    with pytest.raises(DaemonUnavailable, match="no tierd at"):
        await AsyncClient.connect(daemon.socket)
