"""The asyncio client: the same verbs as :class:`tierd_client.Client`, awaited.

Requests may be in flight concurrently on one connection; replies are matched by request id.
Big copies into the arena (put) run in the default executor so they do not stall the caller's loop.
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tierd import protocol
from tierd.errors import DaemonUnavailable, ProtocolError, TierdError, TierFull, Unsupported, from_wire
from tierd.paths import default_socket_path
from tierd.protocol import HEADER, HEADER_SIZE, MAX_REPLY_BYTES
from tierd_client._core import Core, Handle

if TYPE_CHECKING:
    import torch
from tierd_client.client import handshake, unavailable

_EXECUTOR_COPY_BYTES = 4 << 20


class AsyncClient(Core):
    """``async with AsyncClient() as c: t = await c.get("ns/w")``; or ``c = await AsyncClient.connect()``."""

    def __init__(self, socket: str | Path | None = None, *, timeout: float | None = 60.0) -> None:
        super().__init__()
        self.path = Path(socket) if socket else default_socket_path()
        self._timeout = timeout
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task[None] | None = None
        self._waiting: dict[int, asyncio.Future[protocol.Msg]] = {}
        self._failure: TierdError | None = None

    @classmethod
    async def connect(cls, socket: str | Path | None = None, **kw: Any) -> AsyncClient:
        c = cls(socket, **kw)
        await c.open()
        return c

    async def open(self) -> None:
        loop = asyncio.get_running_loop()
        sock, reply, fds, rest = await loop.run_in_executor(
            None, handshake, self.path, self._hello(), self._timeout
        )
        try:
            self._welcome(reply, fds)
        except BaseException:
            sock.close()
            raise
        sock.setblocking(False)
        reader, self._writer = await asyncio.open_unix_connection(sock=sock, limit=1 << 20)
        if rest:
            reader.feed_data(rest)
        self._reader_task = asyncio.create_task(self._read_loop(reader), name="tierd-client-reader")

    async def close(self) -> None:
        if self._writer is None:
            return
        ids = self._take_collected()
        writer, self._writer = self._writer, None
        with contextlib.suppress(OSError):
            if ids:
                writer.write(protocol.encode(protocol.Release(ids)))
            writer.close()
            await writer.wait_closed()
        if self._reader_task is not None:
            self._reader_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader_task
        self._fail(DaemonUnavailable("this client is closed"))
        self._drop_all_leases()
        if self.arena is not None:
            self.arena.close()

    async def __aenter__(self) -> AsyncClient:
        if self._writer is None:
            await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- frames ----------------------------------------------------------------------------------
    async def _read_loop(self, reader: asyncio.StreamReader) -> None:
        try:
            while True:
                length, mtype = HEADER.unpack(await reader.readexactly(HEADER_SIZE))
                if length > MAX_REPLY_BYTES:
                    raise ProtocolError(f"reply of {length} bytes exceeds the client's limit")
                reply = protocol.decode_reply(mtype, await reader.readexactly(length))
                rid = getattr(reply, "rid", 0)
                fut = self._waiting.pop(rid, None)
                if fut is not None:
                    if not fut.done():
                        fut.set_result(reply)
                elif isinstance(reply, protocol.Error):
                    raise from_wire(reply.code, reply.message, reply.details)
                else:
                    raise ProtocolError(f"reply to request {rid}, which is not waiting")
        except (asyncio.IncompleteReadError, ConnectionError):
            self._fail(unavailable(self.path, "connection closed by the daemon"))
        except protocol.DecodeError as e:
            self._fail(ProtocolError(f"undecodable reply from tierd: {e}"))
        except TierdError as e:
            self._fail(e)

    def _fail(self, err: TierdError) -> None:
        self._failure = self._failure or err
        for fut in self._waiting.values():
            if not fut.done():
                fut.set_exception(err)
        self._waiting.clear()
        if self._writer is not None:
            self._writer.close()

    def _send(self, frame: bytes) -> None:
        if self._failure is not None:
            raise self._failure
        if self._writer is None:
            raise DaemonUnavailable("this client is not open")
        self._check_fork()
        ids = self._take_collected()
        if ids:
            frame = protocol.encode(protocol.Release(ids)) + frame
        self._writer.write(frame)

    async def _call(self, msg: protocol.Msg) -> protocol.Msg:
        fut: asyncio.Future[protocol.Msg] = asyncio.get_running_loop().create_future()
        rid = msg.rid  # type: ignore[attr-defined]
        self._waiting[rid] = fut
        try:
            self._send(protocol.encode(msg))
        except BaseException:
            self._waiting.pop(rid, None)
            raise
        reply = await fut
        self._raise_if_error(reply)
        return reply

    async def _ok(self, msg: protocol.Msg) -> Any:
        reply = await self._call(msg)
        assert isinstance(reply, protocol.Ok)
        return reply.value

    # -- verbs (see Client for what each does) ---------------------------------------------------
    async def put(
        self,
        key: str,
        tensor: Any,
        *,
        tags: Any = None,
        durable: bool = False,
        codec: str | None = None,
        ttl: float | None = None,
        scope: str = "shared",
    ) -> Handle:
        msg, value = self._put_msg(key, tensor, tags, durable, codec, ttl, scope)
        ready = await self._call(msg)
        assert isinstance(ready, protocol.PutReady)
        try:
            if msg.nbytes >= _EXECUTOR_COPY_BYTES:
                await asyncio.get_running_loop().run_in_executor(
                    None, self._copy_in, ready.offset, msg, value
                )
            else:
                self._copy_in(ready.offset, msg, value)
        except BaseException:
            await self._call(protocol.Abort(self._next_rid(), ready.put_id))
            raise
        try:
            key_, version = await self._ok(protocol.Seal(self._next_rid(), ready.put_id))
        except (TierFull, Unsupported):  # e.g. a durable put the disk cannot take: give the region back
            await self._call(protocol.Abort(self._next_rid(), ready.put_id))
            raise
        return Handle(key_, version)

    async def get(self, key: str | Handle) -> torch.Tensor:
        return (await self.get_many([key]))[0]

    async def get_many(self, keys: list[str | Handle]) -> list[torch.Tensor]:
        got = await self._call(protocol.Get(self._next_rid(), self._refs(list(keys))))
        assert isinstance(got, protocol.Got)
        return [self._view(loc) for loc in got.items]

    async def release(self, tensor_or_key: torch.Tensor | str | Handle | list[Any]) -> None:
        ids = self._lease_ids_for(tensor_or_key)
        self._send(protocol.encode(protocol.Release(ids)))

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

    async def ls(self, prefix: str = "") -> list[dict[str, Any]]:
        return list(await self._ok(protocol.Ls(self._next_rid(), prefix)))

    async def stat(self, key: str) -> dict[str, Any]:
        return dict(await self._ok(protocol.Stat(self._next_rid(), key)))

    async def stats(self) -> dict[str, Any]:
        return dict(await self._ok(protocol.Status(self._next_rid())))
