"""One client connection: frames in (cut by :class:`tierd.protocol.FrameReader`), each request answered.

A :class:`Connection` (an asyncio Protocol, one per client) does the wire's part and nothing else:
it feeds the bytes it receives to its frame reader, decodes each frame into its typed message,
calls that verb's use case on the :class:`~tierd.service.Service` with the message's fields, and
encodes the result (or the typed error raised) as the reply. A use case that has to wait hands
back a coroutine; the reply is written when it is done, from a task the server tracks. What stays
here is what belongs to the connection: HELLO (protocol version, the peer's credentials, the arena
fd sent over ``SCM_RIGHTS``) and the client id its requests and leases belong to.

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
from tierd.entry import ClientInfo
from tierd.errors import (
    DaemonUnavailable,
    InvalidRequest,
    NotFound,
    ProtocolError,
    TierdError,
    VersionMismatch,
)
from tierd.protocol import MAX_REQUEST_BYTES, ArenaInfo, Error, Got, GpuInfo, Located, Ok, PutReady, Welcome

if TYPE_CHECKING:
    from collections.abc import Coroutine

    from tierd.service import Service

log = logging.getLogger("tierd")
_PEERCRED = struct.Struct("3i")
#: Reply bytes a connection may have waiting to be sent before its next request is read: a client
#: that sends requests and never reads the answers holds at most this much (plus one reply).
MAX_PENDING_REPLY_BYTES = 1 << 20
#: Seconds an unfinished request frame may sit in the daemon: a client that sends part of a frame
#: and stops is cut off, so parked partial frames cannot add up.
PARTIAL_FRAME_TIMEOUT = 10.0


class PartialFrames:
    """Bytes of request frames read and not yet handled, summed over every connection, against one
    cap (config ``max_partial_frame_bytes``). Each connection's unfinished frame is capped (16 MiB)
    and timed; this bounds their sum, which would otherwise be ``max_connections`` x 16 MiB (16 GiB
    at the defaults). A connection whose bytes take the sum over the cap is refused and closed;
    the others keep theirs."""

    __slots__ = ("cap", "held", "refused")

    def __init__(self, cap: int) -> None:
        self.cap = cap
        #: bytes held now, over all connections
        self.held = 0
        #: connections closed because their frame did not fit
        self.refused = 0


class Host(Protocol):
    """What a connection needs from the daemon that accepted it (``tierd.server.Server`` is one).

    Declared here, so that this module does not import the server that imports it.
    """

    service: Service
    #: open connections (a connection adds itself when made, removes itself when lost)
    connections: set[Connection]
    #: tasks of requests that wait (on the disk): the server waits for them at shutdown
    tasks: set[asyncio.Task[Any]]

    #: connections served at once (config max_connections): one more is refused with a message
    max_connections: int
    #: the soft RLIMIT_NOFILE (0: unlimited); a connection that would leave fewer than FD_SPARE free
    #: is refused, counted in fd_refusals
    fd_limit: int
    fd_refusals: int
    #: the bytes of unfinished request frames of all connections (config max_partial_frame_bytes)
    partial_frames: PartialFrames

    def peer_allowed(self, uid: int, gid: int) -> bool: ...


def fd_room(limit: int) -> bool:
    """Whether ``FD_SPARE`` descriptors are still free under ``limit`` (0: unlimited). Counting needs
    one descriptor itself: none free is no room."""
    if limit <= 0:
        return True
    try:
        return limit - len(os.listdir("/proc/self/fd")) >= FD_SPARE
    except OSError:
        return False


#: descriptors kept free for the daemon's own files (the pressure check, the tiers, logs): a
#: connection that would leave fewer is refused, so accepting never runs the process out
FD_SPARE = 16


class Connection(asyncio.Protocol):
    """One client connection. All state changes go through the service's use cases, on the loop."""

    def __init__(self, server: Host) -> None:
        self.server = server
        self.service = server.service
        self.metrics = server.service.metrics
        #: request latency by verb (observed here, where a request's frame arrives and its reply leaves)
        self.latency = server.service.latency
        self.transport: asyncio.Transport | None = None
        self.reader = protocol.FrameReader(MAX_REQUEST_BYTES)
        self.client_id = 0  # set by HELLO
        self.info: ClientInfo  # set by HELLO: what the daemon keeps about this client
        self.peer_pid = self.peer_uid = self.peer_gid = -1
        self.closed = False
        self._replies_waiting = False  # the write buffer is over MAX_PENDING_REPLY_BYTES
        self._partial_timer: asyncio.TimerHandle | None = None
        self._held = 0  # this connection's part of server.partial_frames.held
        self._draining = False  # refused: what the client still sends is read and dropped

    # -- transport callbacks ---------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not an asyncio.Transport
        transport.set_write_buffer_limits(high=MAX_PENDING_REPLY_BYTES)  # type: ignore[attr-defined]
        self.server.connections.add(self)
        try:
            # on the transport's own socket: no descriptor is needed, so a daemon out of them
            # still learns who connected (a dup here failed with EMFILE and left uid -1)
            cred = transport.get_extra_info("socket").getsockopt(
                socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size
            )
            self.peer_pid, self.peer_uid, self.peer_gid = _PEERCRED.unpack(cred)
        except OSError as e:  # no credentials, no trust domain: the connection is refused
            log.warning("refused a connection: could not read its peer credentials: %s", e)
            self._refuse(DaemonUnavailable(f"tierd could not read this connection's credentials: {e}"))
            return
        if not fd_room(self.server.fd_limit):
            # refused at once (no second of draining: a flood would hold the descriptors it lacks)
            self.server.fd_refusals += 1
            if self.server.fd_refusals in (1, 10, 100, 1000) or self.server.fd_refusals % 10000 == 0:
                log.warning("refused %d connections: fewer than %d file descriptors free (LimitNOFILE %d)",
                            self.server.fd_refusals, FD_SPARE, self.server.fd_limit)  # fmt: skip
            lim = self.server.fd_limit
            err = DaemonUnavailable(f"tierd is short of file descriptors (LimitNOFILE {lim}): try "
                                    "again when other connections close, or raise the limit")  # fmt: skip
            self._reply(Error(0, *err.to_wire()))
            self.close()
            return
        if not self.server.peer_allowed(self.peer_uid, self.peer_gid):
            log.warning("refused a connection from uid %d (pid %d)", self.peer_uid, self.peer_pid)
            self._refuse(ProtocolError(f"uid {self.peer_uid} may not use this tierd"))
            return
        cap = self.server.max_connections
        if len(self.server.connections) > cap:
            log.warning("refused a connection from pid %d: %d connections open (max_connections)",
                        self.peer_pid, cap)  # fmt: skip
            self._refuse(DaemonUnavailable(
                f"tierd serves at most {cap} connections (max_connections) and all are open: close one, "
                "or raise the setting", max_connections=cap,
            ))  # fmt: skip

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._partial_timer is not None:
            self._partial_timer.cancel()
        self._account()
        self.server.connections.discard(self)
        if self.client_id:
            self.service.leave(self.client_id)
            log.debug("client %d gone", self.client_id)

    def pause_writing(self) -> None:
        # The client is not reading its replies: answer nothing more, and read nothing more, until
        # it does (frames already read wait in the reader: at most one read's worth).
        self._replies_waiting = True
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        self._replies_waiting = False
        if self.transport is not None and not self.closed:
            self.transport.resume_reading()
            self._serve_frames()

    def data_received(self, data: bytes) -> None:
        if self.closed or self.reader.broken or self._draining:
            return  # (draining: read and dropped, so that the close cannot reset the refusal away)
        self.reader.feed(data)
        self._serve_frames()
        frames = self.server.partial_frames
        if frames.held > frames.cap and self._held and not self.closed:
            frames.refused += 1
            log.warning("refused pid %d's unfinished request: %d such bytes held (max_partial_frame_bytes)",
                        self.peer_pid, frames.held)  # fmt: skip
            self._refuse(DaemonUnavailable(
                f"tierd holds {frames.held >> 20} MiB of unfinished requests from all clients, over its "
                f"{frames.cap >> 20} MiB cap (max_partial_frame_bytes): send the request again later",
                max_partial_frame_bytes=frames.cap,
            ))  # fmt: skip

    def _serve_frames(self) -> None:
        reader = self.reader
        while not self.closed and not self._replies_waiting:
            try:
                frame = reader.next_frame()
            except ProtocolError as e:  # a length prefix over the limit: the stream cannot go on
                self.metrics.bad_frames += 1
                self._fatal(e)
                return
            if frame is None:
                break
            if self._partial_timer is not None:  # a frame completed: the next one is timed anew
                self._partial_timer.cancel()
                self._partial_timer = None
            self._handle(*frame)
        self._watch_partial_frame()

    def _account(self) -> None:
        """Bring this connection's share of the daemon-wide sum of unfinished bytes up to date."""
        held = 0 if self.closed or self._draining else self.reader.buffered
        self.server.partial_frames.held += held - self._held
        self._held = held

    def _watch_partial_frame(self) -> None:
        """Time a partial frame from when it is first seen; the timer ends when no part is left."""
        self._account()
        partial = bool(self.reader.buffered) and not self._replies_waiting and not self.closed
        if partial and self._partial_timer is None:
            loop = asyncio.get_running_loop()
            self._partial_timer = loop.call_later(PARTIAL_FRAME_TIMEOUT, self._partial_expired)
        elif not partial and self._partial_timer is not None:
            self._partial_timer.cancel()
            self._partial_timer = None

    def _partial_expired(self) -> None:
        self._partial_timer = None
        if self.reader.buffered and not self.closed:
            self.metrics.bad_frames += 1
            log.warning("pid %d left a partial request frame for %.0f s: closing", self.peer_pid,
                        PARTIAL_FRAME_TIMEOUT)  # fmt: skip
            self._fatal(ProtocolError(f"a request frame stayed unfinished for {PARTIAL_FRAME_TIMEOUT:.0f} s"))

    # -- dispatch --------------------------------------------------------------------------------
    def _handle(self, mtype: int, payload: bytes | memoryview) -> None:
        decoder = protocol.REQUEST_DECODERS.get(mtype)
        if decoder is None:
            self.metrics.bad_frames += 1
            self._reply(Error(_guess_rid(payload), "protocol", f"unknown message type 0x{mtype:02x}"))
            return
        try:
            msg = decoder.decode(payload)
        except protocol.DecodeError as e:
            self.metrics.bad_frames += 1
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
        self.info.requests += 1
        rid = getattr(msg, "rid", 0)
        t0 = time.perf_counter()
        try:
            reply = handler(self, msg)
        except TierdError as e:
            self._count_error(e)
            reply = Error(rid, *e.to_wire())
        except Exception as e:  # a daemon bug costs one request (logged), never the daemon
            self.metrics.internal_errors += 1
            log.exception("internal error handling %s", type(msg).__name__)
            reply = Error(rid, "error", f"internal error in tierd: {type(e).__name__}: {e}")
        if asyncio.iscoroutine(reply):  # the request waits on the disk: answer when it is done
            task = asyncio.get_running_loop().create_task(self._finish(rid, type(msg).__name__, reply, t0))
            self.server.tasks.add(task)
            task.add_done_callback(self.server.tasks.discard)
            return
        if reply is not None:
            self._reply(reply)
        self.latency.observe(_VERBS[mtype], time.perf_counter() - t0)

    def _count_error(self, e: TierdError) -> None:
        # a lookup of a key that is not there is an answer, not a failure (a cache's miss)
        if isinstance(e, NotFound):
            self.metrics.not_found += 1
        else:
            self.metrics.errors += 1

    async def _finish(self, rid: int, what: str, coro: Any, t0: float) -> None:
        try:
            reply = await coro
        except TierdError as e:
            self._count_error(e)
            reply = Error(rid, *e.to_wire())
        except Exception as e:  # a daemon bug costs one request (logged), never the daemon
            self.metrics.internal_errors += 1
            log.exception("internal error handling %s", what)
            reply = Error(rid, "error", f"internal error in tierd: {type(e).__name__}: {e}")
        self._reply(reply)
        self.latency.observe(_VERB_OF[what], time.perf_counter() - t0)

    def _hello(self, msg: protocol.Hello) -> None:
        if msg.version != protocol.PROTOCOL_VERSION:
            self._fatal(VersionMismatch(
                f"this tierd {__version__} speaks protocol v{protocol.PROTOCOL_VERSION}, the client "
                f"speaks v{msg.version}: install the same tierd version for both",
                daemon=protocol.PROTOCOL_VERSION, client=msg.version,
            ))  # fmt: skip
            return
        service = self.service
        try:
            maps = service.arenas(self.peer_uid)
        except TierdError as e:  # no arena can be made for this uid
            self._fatal(e)
            return
        if not msg.arenas_only:
            self.client_id = service.join(self.peer_pid, self.peer_uid, msg.name)
            self.info = service.client(self.client_id)
        arenas = [ArenaInfo(h.space, h.nbytes, h.writable, h.backed) for h in maps]
        fds = array.array("i", [h.fd for h in maps])
        gpu = service.gpu(self.peer_uid)
        info = None
        if gpu is not None:
            backend, index, slabs, event_fd = gpu
            info = GpuInfo(backend, index, [ArenaInfo(h.space, h.nbytes, False, False) for h in slabs],
                           event_fd >= 0)  # fmt: skip
            fds.extend([h.fd for h in slabs] + ([event_fd] if event_fd >= 0 else []))
        welcome = protocol.encode(
            Welcome(protocol.PROTOCOL_VERSION, os.getpid(), self.client_id, __version__, arenas, info)
        )
        try:
            with self._raw_socket() as s:
                s.sendmsg([welcome], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)])
        except OSError as e:
            log.warning("could not send the arenas to pid %d: %s", self.peer_pid, e)
            self.close()
            return
        if msg.arenas_only:
            self.close()
            return
        log.debug("client %d: pid %d uid %d %r", self.client_id, self.peer_pid, self.peer_uid, msg.name)

    # -- verbs: message fields in, use case called, its result as the reply ----------------------
    def on_put(self, m: protocol.Put) -> Any:
        r = self.service.put(self.client_id, m)  # a PUT message is a PutSpec
        if isinstance(r, tuple):
            space, offset = self.service.split(r[1])
            return PutReady(m.rid, r[0], offset, r[0], space)
        return _put_ready(m.rid, r, self.service.split)

    def on_seal(self, m: protocol.Seal) -> Any:
        r = self.service.seal(self.client_id, m.put_id, m.tier)
        if isinstance(r, tuple):
            return Ok(m.rid, list(r))
        return _sealed(m.rid, r)

    def on_abort(self, m: protocol.Abort) -> Ok:
        self.service.abort(self.client_id, m.put_id)
        return Ok(m.rid)

    def on_get(self, m: protocol.Get) -> Any:
        r = self.service.get(self.client_id, m.refs, m.tier)
        if isinstance(r, list):
            return Got(m.rid, r)
        return _got(m.rid, r)

    def on_release(self, m: protocol.Release) -> None:
        self.service.release(self.client_id, m.leases)

    def on_delete(self, m: protocol.Delete) -> Any:
        r = self.service.delete(self.client_id, m.key)
        if r is None:
            return Ok(m.rid)
        return _ok(m.rid, r)  # answered once a restart cannot bring it back

    def on_evict(self, m: protocol.Evict) -> Any:
        return _ok(m.rid, self.service.evict(self.client_id, m.key))

    def on_verify(self, m: protocol.Verify) -> Any:
        return _ok(m.rid, self.service.verify(m.prefix))

    def on_pin(self, m: protocol.Pin) -> Any:
        r = self.service.pin(self.client_id, m.key, m.tier)
        if r is None:
            return Ok(m.rid)
        return _ok(m.rid, r)

    def on_unpin(self, m: protocol.Unpin) -> Ok:
        return Ok(m.rid, self.service.unpin(self.client_id, m.key))

    def on_ls(self, m: protocol.Ls) -> Any:
        if m.remote:  # asks the cluster: answered when it has
            return _ok(m.rid, self.service.ls_remote(m.prefix, m.after, m.limit))
        return Ok(m.rid, self.service.ls(m.prefix, m.after, m.limit))

    def on_stat(self, m: protocol.Stat) -> Ok:
        return Ok(m.rid, self.service.stat(m.key))

    def on_why(self, m: protocol.Why) -> Ok:
        return Ok(m.rid, self.service.why(m.key))

    def on_status(self, m: protocol.Status) -> Ok:
        return Ok(m.rid, self.service.status())

    def on_prefetch(self, m: protocol.Prefetch) -> Ok:
        return Ok(m.rid, self.service.prefetch(self.client_id, m.keys))

    def on_trace(self, m: protocol.Trace) -> Ok:
        return Ok(m.rid, self.service.trace(m.since, m.limit))

    # -- plumbing --------------------------------------------------------------------------------
    def _reply(self, msg: protocol.Msg) -> None:
        if self.transport is not None and not self.closed:
            self.transport.write(protocol.encode(msg))

    def _fatal(self, err: TierdError) -> None:
        """Say why (best effort) and close: used when the stream cannot go on."""
        self._reply(Error(0, *err.to_wire()))
        self.close()

    def _refuse(self, err: TierdError) -> None:
        """Say why, end our side, and drop what the client still sends for up to a second before
        closing: a socket closed with unread bytes resets its peer, which would lose the reason."""
        self._reply(Error(0, *err.to_wire()))
        self._draining = True
        self.reader = protocol.FrameReader(MAX_REQUEST_BYTES)  # the unfinished frame is let go
        self._account()
        if self._partial_timer is not None:
            self._partial_timer.cancel()
            self._partial_timer = None
        assert self.transport is not None
        if self.transport.can_write_eof():
            self.transport.write_eof()
        asyncio.get_running_loop().call_later(1.0, self.close)

    def close(self) -> None:
        """Close the connection (its leases end when the transport reports it lost)."""
        if self.transport is not None and not self.closed:
            self.closed = True
            self.transport.close()

    @contextlib.contextmanager
    def _raw_socket(self):
        """A short-lived dup of the connection's socket, for SCM_RIGHTS (the loop's socket object
        has no sendmsg)."""
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
    protocol.WHY: Connection.on_why,
}

#: each request type's verb, as the latency histogram and the metrics name it
_VERBS: dict[int, str] = {t: protocol.REQUEST_TYPES[t].__name__.lower() for t in _HANDLERS}
_VERB_OF: dict[str, str] = {protocol.REQUEST_TYPES[t].__name__: v for t, v in _VERBS.items()}


# -- replies to use cases that waited (a coroutine's result, then the reply) --------------------------
async def _put_ready(rid: int, later: Coroutine[Any, Any, tuple[int, int]], split: Any) -> PutReady:
    put_id, location = await later
    space, offset = split(location)
    return PutReady(rid, put_id, offset, put_id, space)


async def _sealed(rid: int, later: Coroutine[Any, Any, tuple[str, int]]) -> Ok:
    return Ok(rid, list(await later))


async def _got(rid: int, later: Coroutine[Any, Any, list[Located]]) -> Got:
    return Got(rid, await later)


async def _ok(rid: int, later: Coroutine[Any, Any, Any]) -> Ok:
    return Ok(rid, await later)


def _guess_rid(payload: bytes | memoryview) -> int:
    """The request id of a payload that failed validation, when its first field is still an int."""
    try:
        obj = msgspec.msgpack.decode(payload)
    except protocol.DecodeError:
        return 0
    # a bool is an int to Python, but a reply whose rid is msgpack true/false does not decode
    if isinstance(obj, list) and obj and type(obj[0]) is int and 0 <= obj[0] < 2**63:
        return obj[0]
    return 0
