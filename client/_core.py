"""What the blocking and the asyncio client share: the protocol side of a connection, the arena
mapping, tensor views, leases. The two clients are transports over this core: they own the socket,
move bytes and wait; everything about what to send and what a reply means is here.

A connection: :meth:`Core._handshake` (blocking; AsyncClient runs it in an executor) connects,
sends HELLO and takes WELCOME with the arenas' fds; bytes read after it stay in the core's
:class:`~tierd.protocol.FrameReader`, which cuts every later reply. A request goes out as
:meth:`Core._request` (leases of collected tensors ride ahead of it as one RELEASE frame); replies
come back through :meth:`Core._next_reply` and are matched to their request by ``rid``. A reply not
matched, a frame that cannot be decoded, or no reply within the client's ``timeout`` ends the
connection (ProtocolError, ProtocolError, DaemonTimeout). Multi-step verbs (put) are written once as
a plan: a generator that yields the requests and local steps a transport runs in order; a
one-round-trip verb is a request built here and its reply read here.

How a get becomes a tensor, and how its lease ends::

    GOT(key, version, dtype, shape, offset, nbytes, lease, space)
      -> region = arenas[space].ro[offset : offset + nbytes]   a numpy slice of a read-only mapping
      -> tensor = torch.from_numpy(region).view(dtype).view(shape)        (no byte is copied)
      -> weakref.finalize(region, ...)                                    (region dies with the
                                                                           last tensor on it)
    release(tensor) ends the lease now; otherwise the finalizer queues it when the tensor (and
    every view of it) is garbage; the queue is sent ahead of the next request, as one-way RELEASE
    frames. Closing the connection, or the process dying, ends all leases in the daemon.

Got tensors are read-only: the mapping is PROT_READ, so a write into one faults. Entries are
immutable; ``clone()`` a tensor to change it.
"""

from __future__ import annotations

import array
import contextlib
import os
import socket
import sys
import weakref
from collections.abc import Generator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tierd import protocol
from tierd.errors import (
    DaemonTimeout,
    DaemonUnavailable,
    InvalidRequest,
    NotLeased,
    ProtocolError,
    StorageError,
    TierFull,
    Unsupported,
    from_wire,
)
from tierd.paths import default_socket_path, peer_uid, trusted_daemon_uids
from tierd.protocol import DTYPE_SIZES, MAX_ARENAS, MAX_SLABS
from tierd_client.arena import Arena, Handle

if TYPE_CHECKING:
    from tierd_client.gpu import GpuSlabs

if TYPE_CHECKING:
    import torch

# torch and numpy are imported on first use, not at import: tierctl and other control-only users
# start in a few milliseconds instead of a second.
_TORCH_DTYPES: dict[str, torch.dtype] = {}


def _torch_dtype(name: str) -> torch.dtype:
    dt = _TORCH_DTYPES.get(name)
    if dt is None:
        import torch

        dt = _TORCH_DTYPES[name] = getattr(torch, name)
    return dt


@dataclass(slots=True)
class _Lease:
    lease: int
    key: str
    version: int
    storage: int
    finalizer: weakref.finalize


def dtype_name(x: Any) -> str:
    import torch

    name = str(x.dtype).removeprefix("torch.") if isinstance(x, torch.Tensor) else str(x.dtype)
    if name not in DTYPE_SIZES:
        raise InvalidRequest(f"dtype {name} cannot be stored (supported: {', '.join(DTYPE_SIZES)})")
    return name


def _storage_id(t: torch.Tensor) -> int:
    return int(t.untyped_storage()._cdata)


def put_tier(value: Any, tier: str | None, daemon_has_gpu: bool) -> str:
    """The tier a put also asks for (SEAL's ``tier``): ``tier`` as given ("gpu"; "ram" = none),
    else "gpu" for a CUDA tensor when the daemon has a GPU tier, else none: a CUDA tensor put to a
    daemon without one is copied to RAM like any tensor."""
    if tier is not None:
        if tier not in ("gpu", "ram"):
            raise InvalidRequest(f"put(tier=...) is 'gpu' or 'ram', not {tier!r}")
        return "" if tier == "ram" else tier
    device = getattr(value, "device", None)
    return "gpu" if daemon_has_gpu and getattr(device, "type", "cpu") == "cuda" else ""


def unavailable(path: Path, why: str) -> DaemonUnavailable:
    return DaemonUnavailable(
        f"no tierd at {path} ({why}): start it with `tierd` (or `systemctl --user start tierd`), "
        "or point TIERD_SOCKET / --socket at the right socket",
        socket=str(path),
    )


def check_peer(s: socket.socket, path: Path) -> None:
    """Refuse, before a byte is sent, a process serving ``path`` as a user that is neither root, us,
    nor ``$TIERD_DAEMON_USER``: whoever could create the socket first could otherwise collect every
    tensor put through it."""
    pid, uid = peer_uid(s)
    try:
        trusted = trusted_daemon_uids()
    except (KeyError, ValueError) as e:
        raise DaemonUnavailable(f"TIERD_DAEMON_USER names no user on this machine ({e})") from None
    if uid not in trusted:
        raise DaemonUnavailable(
            f"the process serving {path} (pid {pid}) runs as uid {uid}, which is neither root, you, nor "
            "$TIERD_DAEMON_USER: refusing to send it anything. If tierd runs as that user on purpose "
            "(a system service), set TIERD_DAEMON_USER to it",
            socket=str(path), uid=uid,
        )  # fmt: skip


def timed_out(path: Path, timeout: float | None, what: str) -> DaemonTimeout:
    return DaemonTimeout(
        f"tierd at {path} did not answer {what} within the client's timeout of {timeout} s; "
        "the connection is closed",
        socket=str(path),
        timeout=timeout,
    )


@dataclass(slots=True)
class CopyIn:
    """A plan step that is local work, no round trip: copy a put's bytes into the arena."""

    space: int
    offset: int
    msg: protocol.Put
    value: Any


#: What a plan yields (a request to send and await, or local work) and is sent back (the reply).
Plan = Generator[protocol.Msg | CopyIn, Any, Any]


class Core:
    """The protocol side both clients share; subclasses add the transport (blocking or asyncio)."""

    def __init__(self, socket: str | Path | None, timeout: float | None) -> None:
        self.path = Path(socket) if socket else default_socket_path()
        self._timeout = timeout
        self._rid = 0
        self._pid = os.getpid()
        self._frames = protocol.FrameReader(protocol.MAX_REPLY_BYTES)
        #: the daemon's RAM arenas by space (one per uid): this client's uid's is ``arena``
        self.arenas: dict[int, Arena] = {}
        self.arena: Arena | None = None
        #: the daemon's GPU tier as this client maps it (None: the daemon has none)
        self.gpu: GpuSlabs | None = None
        #: events of GPU leases taken with wait=False, by lease id, until wait_gpu or release
        self._gpu_events: dict[int, bytes] = {}
        self.client_id = 0
        self.daemon_pid = 0
        self._leases: dict[int, _Lease] = {}
        self._by_storage: dict[int, list[int]] = {}
        self._collected: list[int] = []  # lease ids whose tensors were garbage-collected

    # -- bookkeeping -------------------------------------------------------------------------
    def _next_rid(self) -> int:
        self._rid += 1
        return self._rid

    def _check_fork(self) -> None:
        if os.getpid() != self._pid:
            raise ProtocolError(
                "this tierd client was created in another process (before a fork); make a new Client here"
            )

    # -- connection ------------------------------------------------------------------------------
    def _handshake(self) -> socket.socket:
        """Connect, send HELLO, take WELCOME and the arenas' fds (blocking, under the timeout).

        Returns the connected socket (still in timeout mode); raises DaemonUnavailable (or
        DaemonTimeout) when no daemon answers, the daemon's typed error when it refuses.
        """
        s, reply, fds = self._exchange(self._hello(), self._frames)
        try:
            self._welcome(reply, fds)  # closes the fds itself when it refuses
        except BaseException:
            s.close()
            raise
        assert isinstance(reply, protocol.Welcome)  # _welcome refused anything else
        self.client_id = reply.client_id
        self.daemon_pid = reply.daemon_pid
        return s

    def _fetch_arenas(self) -> None:
        """Take the fds of arenas made after this client connected (another uid's first client):
        a second, short connection whose HELLO asks for the arenas only (blocking; rare)."""
        hello = self._hello()
        hello.arenas_only = True
        s, reply, fds = self._exchange(hello, protocol.FrameReader(protocol.MAX_REPLY_BYTES))
        s.close()
        self._welcome(reply, fds)

    def _arena(self, space: int) -> Arena:
        a = self.arenas.get(space)
        if a is None:
            self._fetch_arenas()
            a = self.arenas.get(space)
            if a is None:
                raise ProtocolError(f"the daemon named RAM arena {space} but did not send it")
        return a

    def _gpu_slabs(self, space: int) -> GpuSlabs:
        """The GPU slabs, with slab ``space`` among them (fetched again when it is new)."""
        if self.gpu is None or space not in self.gpu:
            self._fetch_arenas()
        if self.gpu is None or space not in self.gpu:
            raise ProtocolError(f"the daemon named GPU slab {space} but did not send it")
        return self.gpu

    def _exchange(
        self, hello: protocol.Hello, frames: protocol.FrameReader
    ) -> tuple[socket.socket, protocol.Msg, list[int]]:
        """Connect, check who serves the socket, send ``hello``; the reply and the fds beside it."""
        path = self.path
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        s.settimeout(self._timeout)
        try:
            s.connect(str(path))
        except (FileNotFoundError, ConnectionRefusedError, NotADirectoryError) as e:
            s.close()
            raise unavailable(path, e.strerror or type(e).__name__) from None
        except PermissionError as e:
            s.close()
            raise DaemonUnavailable(f"not allowed to connect to tierd at {path}: {e.strerror}") from None
        try:
            check_peer(s, path)
        except BaseException:
            s.close()
            raise
        fds = array.array("i")
        try:
            # a daemon that refused us has closed: its reason, if it sent one, is read next
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                s.sendall(protocol.encode(self._hello()))
            while (reply := self._next_reply(frames)) is None:
                room = socket.CMSG_SPACE((MAX_ARENAS + MAX_SLABS + 1) * fds.itemsize)
                data, anc, _flags, _addr = s.recvmsg(65536, room)
                for level, kind, payload in anc:
                    if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                        fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
                if not data:
                    raise unavailable(path, "the daemon closed the connection during HELLO")
                frames.feed(data)
        except BaseException as e:
            for fd in fds:
                os.close(fd)
            s.close()
            if isinstance(e, TimeoutError):
                raise timed_out(path, self._timeout, "HELLO") from None
            if isinstance(e, OSError):
                raise unavailable(path, str(e)) from None
            raise
        return s, reply, list(fds)

    @staticmethod
    def _hello() -> protocol.Hello:
        name = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "python"
        return protocol.Hello(protocol.PROTOCOL_VERSION, os.getpid(), name)

    def _welcome(self, reply: protocol.Msg, fds: list[int]) -> None:
        """Map the arenas a WELCOME names (the fds in the same order); known ones are kept."""
        if isinstance(reply, protocol.Error):
            for fd in fds:
                os.close(fd)
            raise from_wire(reply.code, reply.message, reply.details)
        gpu = reply.gpu if isinstance(reply, protocol.Welcome) else None
        n_gpu = len(gpu.slabs) + gpu.events if gpu is not None else 0
        if (
            not isinstance(reply, protocol.Welcome)
            or len(fds) != len(reply.arenas) + n_gpu
            or sum(a.writable for a in reply.arenas) != 1
        ):
            for fd in fds:
                os.close(fd)
            raise ProtocolError("the daemon's WELCOME did not carry its arenas")
        fds, gpu_fds = fds[: len(reply.arenas)], fds[len(reply.arenas) :]
        if gpu is not None:
            if self.gpu is None:
                from tierd_client.gpu import GpuSlabs

                try:
                    self.gpu = GpuSlabs(gpu)
                except BaseException:
                    for fd in fds + gpu_fds:
                        os.close(fd)
                    raise
            self.gpu.update(gpu, gpu_fds)
        for info, fd in zip(reply.arenas, fds, strict=True):
            if info.space in self.arenas:
                os.close(fd)
                continue
            a = Arena(fd, info.nbytes, writable=info.writable, backed=info.backed)
            self.arenas[info.space] = a
            if info.writable:
                self.arena = a

    def _close_arenas(self) -> None:
        for a in self.arenas.values():
            a.close()
        if self.gpu is not None:
            self.gpu.close()

    # -- frames ----------------------------------------------------------------------------------
    def _request(self, msg: protocol.Msg) -> bytes:
        """The bytes that send ``msg``: leases of collected tensors are released ahead of it."""
        self._check_fork()
        frame = protocol.encode(msg)
        ids = self._take_collected()
        return protocol.encode(protocol.Release(ids)) + frame if ids else frame

    def _release_frame(self, what: Any) -> bytes:
        """The one RELEASE frame that ends what release(what) names, plus any collected leases."""
        self._check_fork()
        return protocol.encode(protocol.Release(self._lease_ids_for(what) + self._take_collected()))

    def _close_frame(self) -> bytes:
        """What to send before closing: the leases of collected tensors (or nothing)."""
        ids = self._take_collected()
        return protocol.encode(protocol.Release(ids)) if ids else b""

    def _next_reply(self, frames: protocol.FrameReader | None = None) -> protocol.Msg | None:
        """The next whole reply from the bytes fed so far, or None. ProtocolError: the stream is bad."""
        frame = (frames or self._frames).next_frame()
        if frame is None:
            return None
        try:
            return protocol.decode_reply(*frame)
        except protocol.DecodeError as e:
            raise ProtocolError(f"undecodable reply from tierd: {e}") from None

    @staticmethod
    def _rid_of(reply: protocol.Msg) -> int:
        """The request a reply answers; raises the daemon's error when it is closing the connection."""
        rid: int = getattr(reply, "rid", 0)
        if rid == 0 and isinstance(reply, protocol.Error):
            raise from_wire(reply.code, reply.message, reply.details)
        return rid

    @staticmethod
    def _raise_if_error(reply: protocol.Msg) -> None:
        if isinstance(reply, protocol.Error):
            raise from_wire(reply.code, reply.message, reply.details)

    @staticmethod
    def _value(reply: protocol.Msg) -> Any:
        assert isinstance(reply, protocol.Ok)
        return reply.value

    # -- plans -------------------------------------------------------------------------------
    def _put_plan(
        self,
        key: str,
        value: Any,
        tags: Any,
        durable: bool | str,
        codec: str | None,
        ttl: float | None,
        scope: str,
        share: bool = False,
        tier: str | None = None,
    ) -> Plan:
        """put: reserve a region, copy into it, seal; the region goes back (ABORT) if either fails."""
        msg, value = self._put_msg(key, value, tags, durable, codec, ttl, scope, share)
        up = self._put_tier(value, tier)
        ready = yield msg
        assert isinstance(ready, protocol.PutReady)
        try:
            yield CopyIn(ready.space, ready.offset, msg, value)
        except BaseException:
            yield protocol.Abort(self._next_rid(), ready.put_id)
            raise
        try:
            sealed = yield protocol.Seal(self._next_rid(), ready.put_id, up)
        except (
            TierFull,
            Unsupported,
            StorageError,
        ):  # a durable put the disk cannot take: give the region back
            yield protocol.Abort(self._next_rid(), ready.put_id)
            raise
        assert isinstance(sealed, protocol.Ok)
        return Handle(sealed.value[0], sealed.value[1])

    def _put_tier(self, value: Any, tier: str | None) -> str:
        return put_tier(value, tier, self.gpu is not None)

    # get is one round trip, and the hot path: a request and a reply, no plan
    def _get_request(self, keys: list[Any], tier: str | None = None) -> protocol.Get:
        if tier not in (None, "", "ram", "gpu"):
            raise InvalidRequest(f"get(tier=...) is 'ram' or 'gpu', not {tier!r}")
        return protocol.Get(self._next_rid(), self._refs(list(keys)), "" if tier in (None, "ram") else tier)

    def _views(self, got: protocol.Msg, tier: str | None = None, wait: bool = True) -> list[torch.Tensor]:
        """Tensors over a GOT's regions, each leased (see the module docstring); for the GPU tier,
        the copies in flight are waited on (``wait``) or kept for :meth:`wait_gpu`."""
        assert isinstance(got, protocol.Got)
        if tier != "gpu":
            return [self._view(loc) for loc in got.items]
        out = [self._gpu_view(loc) for loc in got.items]
        events = [loc.event for loc in got.items if loc.event]
        if events and wait:
            assert self.gpu is not None
            self.gpu.wait(events, self._timeout)
        elif events:
            self._gpu_events.update((loc.lease, loc.event) for loc in got.items if loc.event)
        return out

    def _gpu_view(self, loc: protocol.Located) -> torch.Tensor:
        base, owner = self._gpu_slabs(loc.space).view(loc.space, loc.offset, loc.nbytes)
        t = base.view(_torch_dtype(loc.dtype)).view(loc.shape)
        self._lease(loc, t, owner)
        return t

    def _pending_gpu_events(self, tensors: Any) -> list[bytes]:
        """The events still to wait on for these GPU tensors (taken out of the table)."""
        items = list(tensors) if isinstance(tensors, list | tuple) else [tensors]
        out = []
        for t in items:
            for lid in self._by_storage.get(_storage_id(t), []):
                ev = self._gpu_events.pop(lid, None)
                if ev:
                    out.append(ev)
        return out

    def wait_gpu(self, tensors: Any) -> None:
        """Wait until GPU tensors from get(..., tier="gpu", wait=False) may be read (simulated
        device: blocks until the copies are done; CUDA: the current stream waits on them)."""
        events = self._pending_gpu_events(tensors)
        if events and self.gpu is not None:
            self.gpu.wait(events, self._timeout)

    # -- put -------------------------------------------------------------------------------------
    def _put_msg(
        self,
        key: str,
        value: Any,
        tags: Any,
        durable: bool | str,
        codec: str | None,
        ttl: float | None,
        scope: str,
        share: bool = False,
    ) -> tuple[protocol.Put, Any]:
        import numpy as np
        import torch

        if isinstance(value, np.ndarray):
            if value.dtype.hasobject or value.dtype.kind in "USVMm":
                raise InvalidRequest(f"numpy dtype {value.dtype} cannot be stored")
        elif not isinstance(value, torch.Tensor):
            raise InvalidRequest(f"put takes a torch.Tensor or a numpy.ndarray, not {type(value).__name__}")
        if isinstance(value, torch.Tensor) and (value.is_sparse or value.layout != torch.strided):
            raise InvalidRequest("sparse tensors cannot be stored: call .to_dense() first")
        if isinstance(tags, str):
            tags = [tags]
        share_first = durable == "remote"
        if share_first:  # written to the remote tier before the put answers, not to the local disk
            durable, share = False, True
        elif not isinstance(durable, bool):
            raise InvalidRequest(f"durable must be True, False or 'remote', not {durable!r}")
        name = dtype_name(value)
        shape = [int(d) for d in value.shape]
        nbytes = int(np.prod(shape, dtype=np.int64)) * DTYPE_SIZES[name]
        msg = protocol.Put(
            self._next_rid(),
            key,
            name,
            shape,
            nbytes,
            [str(t) for t in (tags or [])],
            bool(durable),
            codec,
            None if ttl is None else float(ttl),
            scope,
            bool(share),
            share_first,
        )
        return msg, value

    def _copy_in(self, step: CopyIn) -> None:
        import numpy as np
        import torch

        offset, msg, value = step.offset, step.msg, step.value
        arena = self._arena(step.space)
        if not arena.writable:
            raise ProtocolError(f"the daemon placed a put in RAM arena {step.space}, which is not this uid's")
        region = arena.rw[offset : offset + msg.nbytes]
        if isinstance(value, np.ndarray):
            np.copyto(region.view(value.dtype).reshape(value.shape), value, casting="no")
        elif (
            value.device.type == "cpu"
            and value.is_contiguous()
            and not value.is_conj()
            and not value.is_neg()
        ):
            # one memcpy through byte views: as fast as numpy.copyto on one core, where torch's
            # copy_ runs at about half of that unless a second core is free (see bench/)
            src = value.detach().reshape(-1).view(torch.uint8).numpy()
            np.copyto(region, src)
        else:  # strided, other devices, lazily conjugated: torch knows how to lay these out
            dst = torch.from_numpy(region).view(_torch_dtype(msg.dtype)).view(msg.shape)
            dst.copy_(value.detach())

    # -- get -------------------------------------------------------------------------------------
    def _view(self, loc: protocol.Located) -> torch.Tensor:
        import torch

        region = self._arena(loc.space).ro[loc.offset : loc.offset + loc.nbytes]
        t = torch.from_numpy(region).view(_torch_dtype(loc.dtype)).view(loc.shape)
        self._lease(loc, t, region)
        return t

    def _lease(self, loc: protocol.Located, t: torch.Tensor, owner: Any) -> None:
        """Record the lease of ``t``; it is queued for release when ``owner`` (what holds the
        mapped bytes for every view of ``t``) is collected."""
        sid = _storage_id(t)
        fin = weakref.finalize(owner, self._collected.append, loc.lease)
        fin.atexit = False
        self._leases[loc.lease] = _Lease(loc.lease, loc.key, loc.version, sid, fin)
        self._by_storage.setdefault(sid, []).append(loc.lease)

    def _forget(self, lid: int) -> _Lease | None:
        self._gpu_events.pop(lid, None)
        lease = self._leases.pop(lid, None)
        if lease is None:
            return None
        lease.finalizer.detach()
        ids = self._by_storage.get(lease.storage)
        if ids is not None:
            ids.remove(lid)
            if not ids:
                del self._by_storage[lease.storage]
        return lease

    def _take_collected(self) -> list[int]:
        """Lease ids of collected tensors, removed from the table: to send as RELEASE."""
        if not self._collected:
            return []
        out = []
        while self._collected:
            lid = self._collected.pop()
            if self._forget(lid) is not None:
                out.append(lid)
        return out

    def _lease_ids_for(self, what: Any) -> list[int]:
        """Take the lease ids release(what) ends out of the table; NotLeased if there are none.

        ``what`` is a tensor from get, a key, a Handle, or a list / tuple of these (one frame). All
        items are checked before any lease is taken out, so a bad item leaves every lease in place.
        """
        items = list(what) if isinstance(what, list | tuple) else [what]
        ids: list[int] = []
        for item in items:
            ids += [lid for lid in self._leases_of(item) if lid not in ids]
        for lid in ids:
            self._forget(lid)
        return ids

    def _leases_of(self, what: Any) -> list[int]:
        import torch

        if isinstance(what, Handle | str):
            key, version = (what.key, what.version) if isinstance(what, Handle) else (what, 0)
            ids = [
                x.lease
                for x in list(self._leases.values())
                if x.key == key and (not version or x.version == version)
            ]
            if not ids:
                raise NotLeased(f"this client holds no lease on {what}", key=key)
            return ids
        if isinstance(what, torch.Tensor):
            found = self._by_storage.get(_storage_id(what))
            if not found:
                raise NotLeased(
                    "this tensor was not returned by get() on this client, or is already released"
                )
            return [found[-1]]
        raise InvalidRequest(
            f"release takes a tensor from get(), a key or a Handle, not {type(what).__name__}"
        )

    @property
    def lease_count(self) -> int:
        """Leases this client holds now (tensors from get not yet released or collected)."""
        return len(self._leases) - len(self._collected)

    def _drop_all_leases(self) -> None:
        for lid in list(self._leases):
            self._forget(lid)
        self._collected.clear()

    @staticmethod
    def _refs(keys: list[Any]) -> list[tuple[str, int]]:
        refs = []
        for k in keys:
            if isinstance(k, Handle):
                refs.append((k.key, k.version))
            elif isinstance(k, str):
                refs.append((k, 0))
            else:
                raise InvalidRequest(f"a key is a str or a Handle, not {type(k).__name__}")
        return refs
