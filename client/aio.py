"""The asyncio client: the same verbs as :class:`tierd_client.Client`, awaited; a transport over
:class:`~tierd_client._core.Core`.

Requests may be in flight concurrently on one connection; replies are matched by request id. Every
call waits at most the client's ``timeout`` for its reply: past it the call raises DaemonTimeout
and the connection closes (every other call in flight fails with the same error), as in the
blocking client. Big copies into the arena (put) run in the default executor so they do not stall
the caller's loop.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tierd import protocol
from tierd.errors import DaemonTimeout, DaemonUnavailable, ProtocolError, TierdError
from tierd_client._core import CopyIn, Core, Handle, Plan, timed_out, unavailable

if TYPE_CHECKING:
    import torch

_EXECUTOR_COPY_BYTES = 4 << 20


class _Stream(asyncio.Protocol):
    """The socket's callbacks, handed to the client (which owns the protocol state)."""

    def __init__(self, client: AsyncClient) -> None:
        self.client = client
        self.lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def data_received(self, data: bytes) -> None:
        self.client._data_received(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost.set_result(None)
        self.client._fail(unavailable(self.client.path, "connection closed by the daemon"))


class AsyncClient(Core):
    """``async with AsyncClient() as c: t = await c.get("ns/w")``; or ``c = await AsyncClient.connect()``."""

    def __init__(self, socket: str | Path | None = None, *, timeout: float | None = 60.0) -> None:
        """``timeout``: seconds any call (and the handshake) waits for the daemon (None = forever)."""
        super().__init__(socket, timeout)
        self._transport: asyncio.Transport | None = None
        self._stream: _Stream | None = None
        self._waiting: dict[int, asyncio.Future[protocol.Msg]] = {}
        self._failure: TierdError | None = None

    @classmethod
    async def connect(cls, socket: str | Path | None = None, **kw: Any) -> AsyncClient:
        c = cls(socket, **kw)
        await c.open()
        return c

    async def open(self) -> None:
        loop = asyncio.get_running_loop()
        sock = await loop.run_in_executor(None, self._handshake)
        sock.setblocking(False)
        try:
            transport, self._stream = await loop.create_unix_connection(lambda: _Stream(self), sock=sock)
        except BaseException:
            sock.close()
            self._close_arenas()
            raise
        self._transport = transport
        self._data_received(b"")  # route what came in behind WELCOME (a closing error, say)

    async def close(self) -> None:
        transport, self._transport = self._transport, None
        if transport is None:
            return
        last = self._close_frame()
        if last and not transport.is_closing():
            transport.write(last)
        transport.close()  # buffered bytes are flushed, then the socket closes
        self._fail(DaemonUnavailable("this client is closed"))
        if self._stream is not None:  # closed when this returns, unless the daemon stopped reading
            try:
                async with asyncio.timeout(self._timeout):
                    await asyncio.shield(self._stream.lost)
            except TimeoutError:
                transport.abort()
        self._drop_all_leases()
        self._close_arenas()

    @property
    def closed(self) -> bool:
        return self._transport is None

    async def __aenter__(self) -> AsyncClient:
        if self._transport is None:
            await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- transport -------------------------------------------------------------------------------
    def _data_received(self, data: bytes) -> None:
        try:
            self._frames.feed(data)
            while (reply := self._next_reply()) is not None:
                rid = self._rid_of(reply)
                fut = self._waiting.pop(rid, None)
                if fut is None:
                    raise ProtocolError(f"reply to request {rid}, which is not waiting")
                if not fut.done():
                    fut.set_result(reply)
        except TierdError as e:
            self._fail(e)

    def _fail(self, err: TierdError) -> None:
        """The connection is over: every call in flight and every later one raises ``err``."""
        self._failure = self._failure or err
        for fut in self._waiting.values():
            if not fut.done():
                fut.set_exception(self._failure)
        self._waiting.clear()
        if self._transport is not None:
            self._transport.abort()  # nothing more is read; unsent bytes are dropped

    def _send(self, frame: bytes) -> None:
        if self._failure is not None:
            raise self._failure
        if self._transport is None:
            raise DaemonUnavailable("this client is not open")
        self._transport.write(frame)

    async def _call(self, msg: protocol.Msg) -> protocol.Msg:
        fut: asyncio.Future[protocol.Msg] = asyncio.get_running_loop().create_future()
        rid = msg.rid  # type: ignore[attr-defined]
        self._waiting[rid] = fut
        try:
            self._send(self._request(msg))
        except BaseException:
            self._waiting.pop(rid, None)
            raise
        try:
            async with asyncio.timeout(self._timeout):
                reply = await fut
        except TimeoutError:
            err = timed_out(self.path, self._timeout, type(msg).__name__)
            self._fail(err)
            raise err from None
        self._raise_if_error(reply)
        return reply

    async def _run(self, plan: Plan) -> Any:
        """Carry out a plan: send each request and hand back its reply (or throw its error) in turn."""
        reply: Any = None
        error: BaseException | None = None
        loop = asyncio.get_running_loop()
        while True:
            try:
                step = plan.send(reply) if error is None else plan.throw(error)
            except StopIteration as done:
                return done.value
            reply, error = None, None
            try:
                if not isinstance(step, CopyIn):
                    reply = await self._call(step)
                elif step.msg.nbytes >= _EXECUTOR_COPY_BYTES:
                    await loop.run_in_executor(None, self._copy_in, step)
                else:
                    self._copy_in(step)
            except BaseException as e:  # noqa: BLE001  # thrown into the plan, which re-raises it
                error = e

    async def _ok(self, msg: protocol.Msg) -> Any:
        return self._value(await self._call(msg))

    # -- verbs (see Client for what each does) ---------------------------------------------------
    async def put(
        self,
        key: str,
        tensor: Any,
        *,
        tags: Any = None,
        durable: bool | str = False,
        codec: str | None = None,
        ttl: float | None = None,
        scope: str = "shared",
        share: bool = False,
        tier: str | None = None,
    ) -> Handle:
        return await self._run(self._put_plan(key, tensor, tags, durable, codec, ttl, scope, share, tier))

    async def get(self, key: str | Handle, *, tier: str | None = None, wait: bool = True) -> torch.Tensor:
        return (await self.get_many([key], tier=tier, wait=wait))[0]

    async def get_many(
        self, keys: list[str | Handle], *, tier: str | None = None, wait: bool = True
    ) -> list[torch.Tensor]:
        got = self._views(await self._call(self._get_request(keys, tier)), tier, wait=False)
        if wait and tier == "gpu":
            await self.wait_gpu(got)
        return got

    async def wait_gpu(self, tensors: Any) -> None:
        """Client.wait_gpu without blocking the loop (the simulated device is polled with a
        back-off from 20 us to 1 ms; CUDA's wait is enqueued on the stream at once)."""
        events = self._pending_gpu_events(tensors)
        gpu = self.gpu
        if not events or gpu is None:
            return
        pause, waited = 20e-6, 0.0
        while not all(gpu.ready(ev) for ev in events):
            if self._timeout is not None and waited > self._timeout:
                raise DaemonTimeout(f"a GPU copy did not complete within {self._timeout}s")
            await asyncio.sleep(pause)
            waited += pause
            pause = min(pause * 2, 1e-3)
        gpu.wait(events, self._timeout)  # CUDA: the stream waits; simulated: done already

    async def release(self, tensor_or_key: torch.Tensor | str | Handle | list[Any]) -> None:
        frame = self._release_frame(tensor_or_key)
        self._send(frame)

    async def delete(self, key: str) -> None:
        await self._call(protocol.Delete(self._next_rid(), key))

    async def pin(self, key: str, tier: str = "ram") -> None:
        await self._call(protocol.Pin(self._next_rid(), key, tier))

    async def unpin(self, key: str) -> bool:
        return bool(await self._ok(protocol.Unpin(self._next_rid(), key)))

    async def evict(self, key: str) -> dict[str, Any]:
        return dict(await self._ok(protocol.Evict(self._next_rid(), key)))

    async def verify(self, prefix: str = "") -> list[dict[str, Any]]:
        return list(await self._ok(protocol.Verify(self._next_rid(), prefix)))

    async def trace(self, since: float = -1.0, limit: int = 100_000) -> dict[str, Any]:
        return dict(await self._ok(protocol.Trace(self._next_rid(), since, limit)))

    async def prefetch(self, keys: list[str]) -> int:
        return int(await self._ok(protocol.Prefetch(self._next_rid(), list(keys))))

    async def ls(
        self, prefix: str = "", *, page: int = protocol.LS_PAGE, remote: bool = False
    ) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        while True:
            after = out[-1]["key"] if out else ""
            got = list(await self._ok(protocol.Ls(self._next_rid(), prefix, after, page, remote)))
            out += got
            if len(got) < page:
                return out

    async def stat(self, key: str) -> dict[str, Any]:
        return dict(await self._ok(protocol.Stat(self._next_rid(), key)))

    async def stats(self) -> dict[str, Any]:
        return dict(await self._ok(protocol.Status(self._next_rid())))

    async def why(self, key: str) -> dict[str, Any]:
        return dict(await self._ok(protocol.Why(self._next_rid(), key)))
