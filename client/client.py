"""The blocking client. One socket, one request at a time (a lock makes it thread-safe)."""

from __future__ import annotations

import array
import os
import socket
import socket as SOCK
import struct
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tierd import protocol
from tierd.errors import DaemonUnavailable, ProtocolError, TierFull, Unsupported
from tierd.paths import default_socket_path
from tierd.protocol import HEADER, HEADER_SIZE, MAX_REPLY_BYTES
from tierd_client._core import Core, Handle

if TYPE_CHECKING:
    import torch


def unavailable(path: Path, why: str) -> DaemonUnavailable:
    return DaemonUnavailable(
        f"no tierd at {path} ({why}): start it with `tierd` (or `systemctl --user start tierd`), "
        "or point TIERD_SOCKET / --socket at the right socket",
        socket=str(path),
    )


def _frame_from(buf: bytearray) -> tuple[int, bytes] | None:
    """Cut one whole frame off the front of ``buf``, or None if it is not all there yet."""
    if len(buf) < HEADER_SIZE:
        return None
    length, mtype = HEADER.unpack_from(buf)
    if length > MAX_REPLY_BYTES:
        raise ProtocolError(f"reply of {length} bytes exceeds the client's limit")
    end = HEADER_SIZE + length
    if len(buf) < end:
        return None
    payload = bytes(buf[HEADER_SIZE:end])
    del buf[:end]
    return mtype, payload


def handshake(
    path: Path, hello: protocol.Hello, timeout: float | None
) -> tuple[socket.socket, protocol.Msg, list[int], bytes]:
    """Connect, send HELLO, receive WELCOME with the arena fd: (socket, reply, fds, extra bytes)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    s.settimeout(timeout)
    try:
        s.connect(str(path))
    except (FileNotFoundError, ConnectionRefusedError, NotADirectoryError) as e:
        s.close()
        raise unavailable(path, e.strerror or type(e).__name__) from None
    except PermissionError as e:
        s.close()
        raise DaemonUnavailable(f"not allowed to connect to tierd at {path}: {e.strerror}") from None
    fds = array.array("i")
    try:
        s.sendall(protocol.encode(hello))
        buf = bytearray()
        while (frame := _frame_from(buf)) is None:
            data, anc, _flags, _addr = s.recvmsg(65536, socket.CMSG_SPACE(4 * fds.itemsize))
            for level, kind, payload in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
            if not data:
                raise unavailable(path, "the daemon closed the connection during HELLO")
            buf += data
        reply = protocol.decode_reply(*frame)
    except BaseException as e:
        for fd in fds:
            os.close(fd)
        s.close()
        if isinstance(e, OSError):
            raise unavailable(path, str(e)) from None
        if isinstance(e, protocol.DecodeError):
            raise ProtocolError(f"undecodable WELCOME from {path}: {e}") from None
        raise
    return s, reply, list(fds), bytes(buf)


class Client(Core):
    """A connection to tierd. Every verb is one round trip; tensors come back as zero-copy views.

    >>> with Client() as c:
    ...     h = c.put("demo/w", torch.randn(1024, 1024))
    ...     t = c.get("demo/w")          # a view of the daemon's RAM tier, leased to this client
    ...     c.release(t)                 # or just drop t: its lease ends when it is collected
    """

    def __init__(
        self, socket: str | Path | None = None, *, timeout: float | None = 60.0, spin_us: float = 50.0
    ) -> None:
        """``timeout``: seconds to wait for a reply before giving up on the daemon (None = forever).
        ``spin_us``: how long to poll for a reply before sleeping in recv. A sleeping reader must be
        woken by the kernel, which on an idle (virtual) CPU costs tens of microseconds; spinning
        briefly halves a small request's round trip (see bench/). 0 turns it off.
        """
        super().__init__()
        self.path = Path(socket) if socket else default_socket_path()
        self._lock = threading.Lock()
        self._rbuf = bytearray()
        self._spin = max(0.0, spin_us) / 1e6
        self._sock = self._connect(timeout)
        # Blocking mode with kernel timeouts: a socket in Python "timeout mode" polls before every
        # recv, which would defeat the MSG_DONTWAIT spin below.
        self._sock.settimeout(None)
        if timeout:
            tv = struct.pack("ll", int(timeout), int((timeout % 1) * 1e6))
            self._sock.setsockopt(SOCK.SOL_SOCKET, SOCK.SO_RCVTIMEO, tv)
            self._sock.setsockopt(SOCK.SOL_SOCKET, SOCK.SO_SNDTIMEO, tv)

    # -- connection ------------------------------------------------------------------------------
    def _connect(self, timeout: float | None) -> socket.socket:
        s, reply, fds, rest = handshake(self.path, self._hello(), timeout)
        try:
            self._welcome(reply, fds)
        except BaseException:
            s.close()
            raise
        self._rbuf += rest
        return s

    def close(self) -> None:
        """End the connection: every lease of this client ends (tensors from it must not be used)."""
        with self._lock:
            if self._sock is None:
                return
            try:
                ids = self._take_collected()
                if ids:
                    self._sock.sendall(protocol.encode(protocol.Release(ids)))
            except OSError:
                pass
            self._sock.close()
            self._sock = None  # type: ignore[assignment]
            self._drop_all_leases()
            if self.arena is not None:
                self.arena.close()

    @property
    def closed(self) -> bool:
        return self._sock is None

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "_sock", None) is not None:
            self.close()

    # -- frames ----------------------------------------------------------------------------------
    def _read_frame(self, s: socket.socket) -> tuple[int, bytes]:
        deadline = 0.0
        while (frame := _frame_from(self._rbuf)) is None:
            chunk = None
            if self._spin:
                if not deadline:
                    deadline = time.perf_counter() + self._spin
                if time.perf_counter() < deadline:
                    try:
                        chunk = s.recv(1 << 20, SOCK.MSG_DONTWAIT)
                    except BlockingIOError:
                        continue
            if chunk is None:
                try:
                    chunk = s.recv(1 << 20)
                except BlockingIOError:
                    raise unavailable(self.path, "no reply before the client's timeout") from None
            if not chunk:
                raise unavailable(self.path, "connection closed by the daemon")
            self._rbuf += chunk
        return frame

    def _call(self, msg: protocol.Msg) -> protocol.Msg:
        with self._lock:
            if self._sock is None:
                raise DaemonUnavailable("this client is closed")
            self._check_fork()
            ids = self._take_collected()
            frame = protocol.encode(msg)
            if ids:
                frame = protocol.encode(protocol.Release(ids)) + frame
            try:
                self._sock.sendall(frame)
                while True:
                    mtype, payload = self._read_frame(self._sock)
                    reply = protocol.decode_reply(mtype, payload)
                    rid = getattr(reply, "rid", None)
                    if rid == msg.rid:  # type: ignore[attr-defined]
                        break
                    if isinstance(reply, protocol.Error) and rid == 0:
                        self._raise_if_error(reply)  # the daemon is closing this connection
                    raise ProtocolError(f"reply to request {rid} while waiting for {msg.rid}")  # type: ignore[attr-defined]
            except (OSError, protocol.DecodeError) as e:
                self._sock.close()
                self._sock = None  # type: ignore[assignment]
                if isinstance(e, OSError):
                    raise unavailable(self.path, str(e)) from None
                raise ProtocolError(f"undecodable reply from tierd: {e}") from None
            except ProtocolError:
                self._sock.close()
                self._sock = None  # type: ignore[assignment]
                raise
        self._raise_if_error(reply)
        return reply

    # -- verbs -----------------------------------------------------------------------------------
    def put(
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
        """Store a copy of ``tensor`` (torch or numpy, any device) as the newest version of ``key``.

        Raises TierFull when no tier can take it (nothing existing changes), InvalidRequest for a
        bad key / dtype / argument. ``scope="client"`` deletes it when this client disconnects;
        ``ttl`` deletes it that many seconds after its last access.
        """
        msg, value = self._put_msg(key, tensor, tags, durable, codec, ttl, scope)
        ready = self._call(msg)
        assert isinstance(ready, protocol.PutReady)
        try:
            self._copy_in(ready.offset, msg, value)
        except BaseException:
            self._call(protocol.Abort(self._next_rid(), ready.put_id))
            raise
        try:
            sealed = self._call(protocol.Seal(self._next_rid(), ready.put_id))
        except (TierFull, Unsupported):  # e.g. a durable put the disk cannot take: give the region back
            self._call(protocol.Abort(self._next_rid(), ready.put_id))
            raise
        assert isinstance(sealed, protocol.Ok)
        return Handle(sealed.value[0], sealed.value[1])

    def get(self, key: str | Handle) -> torch.Tensor:
        """A read-only zero-copy view of the entry, leased to this client until released or collected."""
        return self.get_many([key])[0]

    def get_many(self, keys: list[str | Handle]) -> list[torch.Tensor]:
        """Views of several entries in one round trip; NotFound (and no lease taken) if one is missing."""
        got = self._call(protocol.Get(self._next_rid(), self._refs(list(keys))))
        assert isinstance(got, protocol.Got)
        return [self._view(loc) for loc in got.items]

    def release(self, tensor_or_key: torch.Tensor | str | Handle | list[Any]) -> None:
        """End a lease now: of this tensor, or every lease this client holds on a key / handle.

        A list of those releases them all in one frame. One-way (no round trip). Raises NotLeased
        when there is nothing to release (for a list: when one item has nothing; nothing is sent then).
        """
        with self._lock:
            ids = self._lease_ids_for(tensor_or_key) + self._take_collected()
            if self._sock is not None:
                try:
                    self._sock.sendall(protocol.encode(protocol.Release(ids)))
                except OSError as e:
                    raise unavailable(self.path, str(e)) from None

    def delete(self, key: str) -> None:
        """Remove ``key``; readers holding leases keep its bytes until they release them."""
        self._call(protocol.Delete(self._next_rid(), key))

    def pin(self, key: str, tier: str = "ram") -> None:
        """Keep ``key`` in ``tier`` until unpin or delete (the daemon holds the lease)."""
        self._call(protocol.Pin(self._next_rid(), key, tier))

    def unpin(self, key: str) -> bool:
        """Drop the daemon's pins on ``key``; returns whether it was pinned."""
        return bool(self._ok(protocol.Unpin(self._next_rid(), key)))

    def evict(self, key: str) -> dict[str, Any]:
        """Push ``key`` down to the disk tier now (it stays readable); refused while leased or pinned."""
        return dict(self._ok(protocol.Evict(self._next_rid(), key)))

    def verify(self, prefix: str = "") -> list[dict[str, Any]]:
        """Read every disk copy under ``prefix`` and check its checksums: one dict per entry."""
        return list(self._ok(protocol.Verify(self._next_rid(), prefix)))

    def trace(self, since: float = -1.0, limit: int = 100_000) -> dict[str, Any]:
        """The daemon's access log after ``since``: {"now": t, "accesses": [rows]} (see tierd.predict.log)."""
        return dict(self._ok(protocol.Trace(self._next_rid(), since, limit)))

    def prefetch(self, keys: list[str]) -> int:
        """Hint that ``keys`` will be read soon; returns how many of them exist."""
        return int(self._ok(protocol.Prefetch(self._next_rid(), list(keys))))

    def ls(self, prefix: str = "") -> list[dict[str, Any]]:
        """Every entry whose key starts with ``prefix``, as dicts (key, dtype, shape, tiers, ...)."""
        return list(self._ok(protocol.Ls(self._next_rid(), prefix)))

    def stat(self, key: str) -> dict[str, Any]:
        """One entry's metadata; NotFound if absent."""
        return dict(self._ok(protocol.Stat(self._next_rid(), key)))

    def stats(self) -> dict[str, Any]:
        """The daemon's status: tiers, clients, leases, counters."""
        return dict(self._ok(protocol.Status(self._next_rid())))

    def _ok(self, msg: protocol.Msg) -> Any:
        reply = self._call(msg)
        assert isinstance(reply, protocol.Ok)
        return reply.value
