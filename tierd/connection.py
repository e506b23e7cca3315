"""One client connection: frames in (cut by :class:`tierd.protocol.FrameReader`), each request answered.

A :class:`Connection` (an asyncio Protocol, one per client) decodes each frame into its typed
message and hands it to the :class:`~tierd.manager.Manager` (the entry table) or, for anything that
waits on the disk, to :class:`~tierd.placement.Placement`, whose coroutine answers when it is done.
Anything a client sends gets a typed reply or, when the stream cannot be framed, a closed
connection: the loop itself never sees an exception from a client.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import logging
import os
import socket
import struct
import time
from typing import TYPE_CHECKING, Any, Protocol

import msgspec

from tierd import __version__, protocol
from tierd.errors import InvalidRequest, NotFound, ProtocolError, TierdError, VersionMismatch
from tierd.protocol import MAX_REQUEST_BYTES, Error, Got, Ok, PutReady, Welcome

if TYPE_CHECKING:
    from tierd.manager import Manager
    from tierd.placement import Placement
    from tierd.prefetch import Prefetcher

log = logging.getLogger("tierd")
_PEERCRED = struct.Struct("3i")


class Host(Protocol):
    """What a connection needs from the daemon that accepted it (``tierd.server.Server`` is one).

    Declared here, so that this module does not import the server that imports it.
    """

    manager: Manager
    placement: Placement
    prefetcher: Prefetcher
    #: open connections (a connection adds itself when made, removes itself when lost)
    connections: set[Connection]
    #: tasks of requests that wait (on the disk): the server waits for them at shutdown
    tasks: set[asyncio.Task[Any]]

    def peer_allowed(self, uid: int, gid: int) -> bool: ...

    def check_codec(self, m: protocol.Put) -> None: ...

    def status(self) -> dict[str, Any]: ...


class Connection(asyncio.Protocol):
    """One client connection. All state changes go through the manager, on the loop."""

    def __init__(self, server: Host) -> None:
        self.server = server
        self.manager = server.manager
        self.transport: asyncio.Transport | None = None
        self.reader = protocol.FrameReader(MAX_REQUEST_BYTES)
        self.client_id = 0  # set by HELLO
        self.peer_pid = self.peer_uid = self.peer_gid = -1
        self.closed = False

    # -- transport callbacks ---------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not an asyncio.Transport
        self.server.connections.add(self)
        with self._raw_socket() as s:
            self.peer_pid, self.peer_uid, self.peer_gid = _PEERCRED.unpack(
                s.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
            )
        if not self.server.peer_allowed(self.peer_uid, self.peer_gid):
            log.warning("refused a connection from uid %d (pid %d)", self.peer_uid, self.peer_pid)
            self._fatal(ProtocolError(f"uid {self.peer_uid} may not use this tierd"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.server.connections.discard(self)
        if self.client_id:
            self.manager.client_gone(self.client_id)
            log.debug("client %d gone", self.client_id)

    def pause_writing(self) -> None:
        # The client is not reading its replies: stop reading its requests until it does.
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.resume_reading()

    def data_received(self, data: bytes) -> None:
        reader = self.reader
        if self.closed or reader.broken:
            return
        reader.feed(data)
        while not self.closed:
            try:
                frame = reader.next_frame()
            except ProtocolError as e:  # a length prefix over the limit: the stream cannot go on
                self.manager.counters["bad_frames"] += 1
                self._fatal(e)
                return
            if frame is None:
                return
            self._handle(*frame)

    # -- dispatch --------------------------------------------------------------------------------
    def _handle(self, mtype: int, payload: bytes | memoryview) -> None:
        decoder = protocol.REQUEST_DECODERS.get(mtype)
        if decoder is None:
            self.manager.counters["bad_frames"] += 1
            self._reply(Error(_guess_rid(payload), "protocol", f"unknown message type 0x{mtype:02x}"))
            return
        try:
            msg = decoder.decode(payload)
        except protocol.DecodeError as e:
            self.manager.counters["bad_frames"] += 1
            self._reply(
                Error(_guess_rid(payload), InvalidRequest.code, f"malformed {decoder.type.__name__}: {e}")
            )
            return
        if self.client_id == 0:
            if mtype != protocol.HELLO:
                self._fatal(ProtocolError("the first message on a connection must be HELLO"))
            else:
                assert isinstance(msg, protocol.Hello)
                self._hello(msg)
            return
        handler = _HANDLERS.get(mtype)
        if handler is None:  # a second HELLO
            self._reply(Error(0, ProtocolError.code, "HELLO was already received on this connection"))
            return
        rid = getattr(msg, "rid", 0)
        try:
            reply = handler(self, msg)
        except TierdError as e:
            self._count_error(e)
            reply = Error(rid, *e.to_wire())
        except Exception as e:  # a daemon bug costs one request (logged), never the daemon
            self.manager.counters["internal_errors"] += 1
            log.exception("internal error handling %s", type(msg).__name__)
            reply = Error(rid, "error", f"internal error in tierd: {type(e).__name__}: {e}")
        if asyncio.iscoroutine(reply):  # the request waits on the disk: answer when it is done
            task = asyncio.get_running_loop().create_task(self._finish(rid, type(msg).__name__, reply))
            self.server.tasks.add(task)
            task.add_done_callback(self.server.tasks.discard)
        elif reply is not None:
            self._reply(reply)

    def _count_error(self, e: TierdError) -> None:
        # a lookup of a key that is not there is an answer, not a failure (a cache's miss)
        self.manager.counters["not_found" if isinstance(e, NotFound) else "errors"] += 1

    async def _finish(self, rid: int, what: str, coro: Any) -> None:
        try:
            reply = await coro
        except TierdError as e:
            self._count_error(e)
            reply = Error(rid, *e.to_wire())
        except Exception as e:  # a daemon bug costs one request (logged), never the daemon
            self.manager.counters["internal_errors"] += 1
            log.exception("internal error handling %s", what)
            reply = Error(rid, "error", f"internal error in tierd: {type(e).__name__}: {e}")
        self._reply(reply)

    def _hello(self, msg: protocol.Hello) -> None:
        if msg.version != protocol.PROTOCOL_VERSION:
            self._fatal(VersionMismatch(
                f"this tierd {__version__} speaks protocol v{protocol.PROTOCOL_VERSION}, the client "
                f"speaks v{msg.version}: install the same tierd version for both",
                daemon=protocol.PROTOCOL_VERSION, client=msg.version,
            ))  # fmt: skip
            return
        self.client_id = self.manager.add_client(self.peer_pid, self.peer_uid, msg.name)
        ram_bytes = self.manager.ram.capacity_bytes
        welcome = protocol.encode(
            Welcome(protocol.PROTOCOL_VERSION, os.getpid(), self.client_id, ram_bytes, __version__)
        )
        fds = array.array("i", [self.manager.ram.map_handle().fd])
        try:
            with self._raw_socket() as s:
                s.sendmsg([welcome], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)])
        except OSError as e:
            log.warning("could not send the arena to pid %d: %s", self.peer_pid, e)
            self._close()
            return
        log.debug("client %d: pid %d uid %d %r", self.client_id, self.peer_pid, self.peer_uid, msg.name)

    # -- verbs -----------------------------------------------------------------------------------
    def on_put(self, m: protocol.Put) -> Any:
        mgr = self.manager
        mgr.validate_put(m)
        self.server.check_codec(m)
        offset = mgr.ram.allocate(m.nbytes)
        if offset is None:
            return self._put_after_room(m)
        put_id, offset = mgr.begin_put(self.client_id, m, offset)
        self.server.placement.poke()
        return PutReady(m.rid, put_id, offset, put_id)

    async def _put_after_room(self, m: protocol.Put) -> PutReady:
        offset = await self.server.placement.alloc(m.key, m.nbytes)
        if self.client_id not in self.manager.clients:  # went while we made room
            self.manager.ram.free(offset)
            raise ProtocolError("client gone")
        put_id, offset = self.manager.begin_put(self.client_id, m, offset)
        self.server.placement.poke()
        return PutReady(m.rid, put_id, offset, put_id)

    def on_seal(self, m: protocol.Seal) -> Any:
        e = self.manager._writing(self.client_id, m.put_id)
        if self.server.placement.may_be_lossy(e):
            return self._seal_lossy(m)
        return self._seal(m)

    def _seal(self, m: protocol.Seal) -> Any:
        mgr = self.manager
        e = mgr._writing(self.client_id, m.put_id)
        if e.durable:
            return self._seal_durable(m)
        old = mgr.entries.get(e.key)
        old_on_disk = old is not None and old.durable and old.record is not None
        sealed = list(mgr.seal(self.client_id, m.put_id))
        self.server.prefetcher.record(self.client_id, e, "put", "-")
        if old_on_disk:
            return self._after_unpublish(Ok(m.rid, sealed))  # the old durable copy must be gone first
        return Ok(m.rid, sealed)

    async def _seal_lossy(self, m: protocol.Seal) -> Ok:
        """A put whose disk codec is lossy: its RAM bytes become the decoded ones first."""
        await self.server.placement.round_trip(self.manager._writing(self.client_id, m.put_id))
        reply = self._seal(m)
        return await reply if asyncio.iscoroutine(reply) else reply

    async def _seal_durable(self, m: protocol.Seal) -> Ok:
        e = self.manager._writing(self.client_id, m.put_id)
        key, version = await self.server.placement.seal_durable(self.client_id, m.put_id)
        self.server.prefetcher.record(self.client_id, e, "put", "-")
        return Ok(m.rid, [key, version])

    async def _after_unpublish(self, reply: Ok) -> Ok:
        await self.server.placement.settled()
        return reply

    def on_abort(self, m: protocol.Abort) -> Ok:
        self.manager.abort(self.client_id, m.put_id)
        return Ok(m.rid)

    def on_get(self, m: protocol.Get) -> Any:
        found = [self.manager.resolve(k, v) for k, v in m.refs]
        placement = self.server.placement
        if placement.resident(found):
            got = Got(m.rid, self.manager.lease(self.client_id, found))
            record = self.server.prefetcher.record
            for e in found:
                record(self.client_id, e, "get", "ram")
            return got
        return self._get_slow(m.rid, found)

    async def _get_slow(self, rid: int, found: list[Any]) -> Got:
        tiers = [e.tiers[0] for e in found]
        t0 = time.perf_counter()
        got = Got(rid, await self.server.placement.get(self.client_id, found))
        self.manager.counters["stall_us"] += int((time.perf_counter() - t0) * 1e6)
        record = self.server.prefetcher.record
        for e, tier in zip(found, tiers, strict=True):
            record(self.client_id, e, "get", tier)
        return got

    def on_release(self, m: protocol.Release) -> None:
        bad = self.manager.release(self.client_id, m.leases)
        if bad:
            log.debug("client %d released %d lease ids it did not hold", self.client_id, bad)

    def on_delete(self, m: protocol.Delete) -> Any:
        e = self.manager.resolve(m.key)
        on_disk = e.durable and e.record is not None
        self.manager.delete(m.key)
        if on_disk:
            return self._after_unpublish(Ok(m.rid))  # answered once a restart cannot bring it back
        return Ok(m.rid)

    def on_evict(self, m: protocol.Evict) -> Any:
        return self._evict(m)

    async def _evict(self, m: protocol.Evict) -> Ok:
        return Ok(m.rid, await self.server.placement.evict(m.key))

    def on_verify(self, m: protocol.Verify) -> Any:
        return self._verify(m)

    async def _verify(self, m: protocol.Verify) -> Ok:
        return Ok(m.rid, await self.server.placement.verify(m.prefix))

    def on_pin(self, m: protocol.Pin) -> Ok:
        self.manager.pin(m.key, m.tier)
        return Ok(m.rid)

    def on_unpin(self, m: protocol.Unpin) -> Ok:
        return Ok(m.rid, self.manager.unpin(m.key))

    def on_ls(self, m: protocol.Ls) -> Ok:
        return Ok(m.rid, self.manager.ls(m.prefix))

    def on_stat(self, m: protocol.Stat) -> Ok:
        return Ok(m.rid, self.manager.stat(m.key))

    def on_status(self, m: protocol.Status) -> Ok:
        return Ok(m.rid, self.server.status())

    def on_prefetch(self, m: protocol.Prefetch) -> Ok:
        self.manager.prefetch_hint(m.keys)
        return Ok(m.rid, self.server.prefetcher.hint(self.client_id, m.keys))

    def on_trace(self, m: protocol.Trace) -> Ok:
        from tierd.predict.log import to_row

        accesses = self.server.prefetcher.log.since(m.since)[: max(0, m.limit)]
        now = self.server.prefetcher.log_time()
        return Ok(m.rid, {"now": now, "accesses": [to_row(a) for a in accesses]})

    # -- plumbing --------------------------------------------------------------------------------
    def _reply(self, msg: protocol.Msg) -> None:
        if self.transport is not None and not self.closed:
            self.transport.write(protocol.encode(msg))

    def _fatal(self, err: TierdError) -> None:
        """Say why (best effort) and close: used when the stream cannot go on."""
        self._reply(Error(0, *err.to_wire()))
        self._close()

    def _close(self) -> None:
        if self.transport is not None and not self.closed:
            self.closed = True
            self.transport.close()

    @contextlib.contextmanager
    def _raw_socket(self):
        """A short-lived dup of the connection's socket, for SO_PEERCRED and SCM_RIGHTS."""
        assert self.transport is not None
        s = socket.socket(fileno=os.dup(self.transport.get_extra_info("socket").fileno()))
        try:
            yield s
        finally:
            s.close()


_HANDLERS: dict[int, Any] = {
    protocol.PUT: Connection.on_put,
    protocol.SEAL: Connection.on_seal,
    protocol.ABORT: Connection.on_abort,
    protocol.GET: Connection.on_get,
    protocol.RELEASE: Connection.on_release,
    protocol.DELETE: Connection.on_delete,
    protocol.PIN: Connection.on_pin,
    protocol.UNPIN: Connection.on_unpin,
    protocol.LS: Connection.on_ls,
    protocol.STAT: Connection.on_stat,
    protocol.STATUS: Connection.on_status,
    protocol.PREFETCH: Connection.on_prefetch,
    protocol.EVICT: Connection.on_evict,
    protocol.VERIFY: Connection.on_verify,
    protocol.TRACE: Connection.on_trace,
}


def _guess_rid(payload: bytes | memoryview) -> int:
    """The request id of a payload that failed validation, when its first field is still an int."""
    try:
        obj = msgspec.msgpack.decode(payload)
    except protocol.DecodeError:
        return 0
    if isinstance(obj, list) and obj and isinstance(obj[0], int) and 0 <= obj[0] < 2**63:
        return obj[0]
    return 0
