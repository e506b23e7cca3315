"""AsyncClient: the same verbs awaited, concurrent requests on one connection (asyncio and uvloop)."""

from __future__ import annotations

import asyncio
import time

import pytest
import torch

from tierd import protocol
from tierd.launch import Daemon
from tierd_client import AsyncClient, DaemonTimeout, DaemonUnavailable, NotFound, TierFull


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


# Every call that waits for a reply, as (name, call); each must give up after the client's timeout.
_CALLS = [
    ("put", lambda c: c.put("h/x", torch.arange(4))),
    ("get", lambda c: c.get("h/x")),
    ("get_many", lambda c: c.get_many(["h/x", "h/y"])),
    ("delete", lambda c: c.delete("h/x")),
    ("pin", lambda c: c.pin("h/x")),
    ("unpin", lambda c: c.unpin("h/x")),
    ("evict", lambda c: c.evict("h/x")),
    ("verify", lambda c: c.verify()),
    ("trace", lambda c: c.trace()),
    ("prefetch", lambda c: c.prefetch(["h/x"])),
    ("ls", lambda c: c.ls()),
    ("stat", lambda c: c.stat("h/x")),
    ("stats", lambda c: c.stats()),
]
TIMEOUT = 0.3
# A hang shows as the outer wait running out: far longer than the timeout, far shorter than forever.
HANG = 20.0


@pytest.mark.asyncio
@pytest.mark.parametrize("name,call", _CALLS, ids=[n for n, _ in _CALLS])
async def test_every_call_times_out_on_a_hung_daemon(hung_peer, name, call) -> None:
    peer = hung_peer()
    c = await asyncio.wait_for(AsyncClient.connect(peer.socket, timeout=TIMEOUT), HANG)
    t0 = time.monotonic()
    with pytest.raises(DaemonTimeout, match="did not answer"):
        await asyncio.wait_for(call(c), HANG)
    took = time.monotonic() - t0
    assert TIMEOUT - 0.02 <= took < TIMEOUT + 2.0, f"{name} gave up after {took:.2f}s"  # loop clocks: ms
    assert peer.received[-1][0] != protocol.HELLO  # the request did reach the peer
    # the connection is over: later calls fail at once, with the same error
    t0 = time.monotonic()
    with pytest.raises(DaemonTimeout):
        await asyncio.wait_for(c.stats(), HANG)
    assert time.monotonic() - t0 < TIMEOUT
    await asyncio.wait_for(c.close(), HANG)


@pytest.mark.asyncio
async def test_concurrent_calls_all_end_on_a_hung_daemon(hung_peer) -> None:
    peer = hung_peer(then=b"\x10\x00\x00\x00\x91\x92")  # half of a reply frame, never finished
    async with AsyncClient(peer.socket, timeout=TIMEOUT) as c:
        results = await asyncio.wait_for(
            asyncio.gather(c.stats(), c.ls(), c.get("h/x"), return_exceptions=True), HANG
        )
        assert all(isinstance(r, DaemonTimeout) for r in results), results


@pytest.mark.asyncio
async def test_handshake_times_out_when_hello_is_never_answered(hung_peer) -> None:
    peer = hung_peer(welcome=False)
    t0 = time.monotonic()
    with pytest.raises(DaemonTimeout, match="HELLO"):
        await asyncio.wait_for(AsyncClient.connect(peer.socket, timeout=TIMEOUT), HANG)
    assert TIMEOUT - 0.02 <= time.monotonic() - t0 < TIMEOUT + 2.0
