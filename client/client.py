"""The blocking client: a transport over :class:`~tierd_client._core.Core`. One socket, one request
at a time (a lock makes it thread-safe); the socket's kernel timeouts (SO_RCVTIMEO / SO_SNDTIMEO)
bound every wait, and a wait that runs out raises DaemonTimeout and closes the connection."""

from __future__ import annotations

import socket as SOCK
import struct
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tierd import protocol
from tierd.errors import DaemonUnavailable, ProtocolError
from tierd_client._core import CopyIn, Core, Handle, Plan, timed_out, unavailable

if TYPE_CHECKING:
    import torch

__all__ = ["Client"]


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
        super().__init__(socket, timeout)
        self._lock = threading.Lock()
        self._spin = max(0.0, spin_us) / 1e6
        self._sock: SOCK.socket | None = self._handshake()
        # Blocking mode with kernel timeouts: a socket in Python "timeout mode" polls before every
        # recv, which would defeat the MSG_DONTWAIT spin below.
        self._sock.settimeout(None)
        if timeout:
            tv = struct.pack("ll", int(timeout), int((timeout % 1) * 1e6))
            self._sock.setsockopt(SOCK.SOL_SOCKET, SOCK.SO_RCVTIMEO, tv)
            self._sock.setsockopt(SOCK.SOL_SOCKET, SOCK.SO_SNDTIMEO, tv)

    # -- connection ------------------------------------------------------------------------------
    def close(self) -> None:
        """End the connection: every lease of this client ends (tensors from it must not be used)."""
        with self._lock:
            if self._sock is None:
                return
            try:
                if last := self._close_frame():
                    self._sock.sendall(last)
            except OSError:
                pass
            self._drop()

    def _drop(self) -> None:
        """Close the socket and forget the leases (the daemon ends them when the socket closes)."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        self._drop_all_leases()
        self._close_arenas()

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

    # -- transport -------------------------------------------------------------------------------
    def _read_reply(self, s: SOCK.socket) -> protocol.Msg:
        deadline = 0.0
        while (reply := self._next_reply()) is None:
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
                chunk = s.recv(1 << 20)  # BlockingIOError once SO_RCVTIMEO runs out
            if not chunk:
                raise unavailable(self.path, "connection closed by the daemon")
            self._frames.feed(chunk)
        return reply

    def _call(self, msg: protocol.Msg) -> protocol.Msg:
        rid = msg.rid  # type: ignore[attr-defined]
        with self._lock:
            if self._sock is None:
                raise DaemonUnavailable("this client is closed")
            frame = self._request(msg)
            try:
                self._sock.sendall(frame)
                reply = self._read_reply(self._sock)
                if (got := self._rid_of(reply)) != rid:
                    raise ProtocolError(f"reply to request {got} while waiting for {rid}")
            except (BlockingIOError, TimeoutError):
                self._drop()
                raise timed_out(self.path, self._timeout, type(msg).__name__) from None
            except OSError as e:
                self._drop()
                raise unavailable(self.path, str(e)) from None
            except (ProtocolError, DaemonUnavailable):
                self._drop()
                raise
        self._raise_if_error(reply)
        return reply

    def _run(self, plan: Plan) -> Any:
        """Carry out a plan: send each request and hand back its reply (or throw its error) in turn."""
        reply: Any = None
        error: BaseException | None = None
        while True:
            try:
                step = plan.send(reply) if error is None else plan.throw(error)
            except StopIteration as done:
                return done.value
            reply, error = None, None
            try:
                if isinstance(step, CopyIn):
                    self._copy_in(step)
                else:
                    reply = self._call(step)
            except BaseException as e:  # noqa: BLE001  # thrown into the plan, which re-raises it
                error = e

    def _ok(self, msg: protocol.Msg) -> Any:
        return self._value(self._call(msg))

    # -- verbs -----------------------------------------------------------------------------------
    def put(
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
        """Store a copy of ``tensor`` (torch or numpy, any device) as the newest version of ``key``.

        Raises TierFull when no tier can take it (nothing existing changes), InvalidRequest for a
        bad key / dtype / argument. ``scope="client"`` deletes it when this client disconnects;
        ``ttl`` deletes it that many seconds after its last access. ``share=True`` also writes it to
        the remote tier after SEAL (in the background), where other machines' daemons find it;
        Unsupported when the daemon runs without ``--remote``. ``durable="remote"`` shares it and
        answers only once the remote tier holds it (written before it is sealed here, not to the
        local disk): TierFull when the cluster is full, StorageError when it fails, and then
        nothing was put. The bytes go to RAM; a CUDA tensor (or ``tier="gpu"``) also gets a copy
        in the GPU tier when it has room (else it stays in RAM). ``tier="ram"``: RAM only.
        """
        return self._run(self._put_plan(key, tensor, tags, durable, codec, ttl, scope, share, tier))

    def get(self, key: str | Handle, *, tier: str | None = None, wait: bool = True) -> torch.Tensor:
        """A read-only zero-copy view of the entry, leased to this client until released or collected.

        ``tier="gpu"``: a view of its copy in the GPU tier (a CUDA tensor; a CPU tensor over the
        slab on the simulated device), promoted there first when needed; Unsupported where the
        daemon has no GPU tier. The copy may still be in flight: ``wait`` (default) waits for it
        (CUDA: the current stream waits); ``wait=False`` leaves that to :meth:`wait_gpu`.
        """
        return self.get_many([key], tier=tier, wait=wait)[0]

    def get_many(
        self, keys: list[str | Handle], *, tier: str | None = None, wait: bool = True
    ) -> list[torch.Tensor]:
        """Views of several entries in one round trip; NotFound (and no lease taken) if one is missing."""
        return self._views(self._call(self._get_request(keys, tier)), tier, wait)

    def release(self, tensor_or_key: torch.Tensor | str | Handle | list[Any]) -> None:
        """End a lease now: of this tensor, or every lease this client holds on a key / handle.

        A list of those releases them all in one frame. One-way (no round trip). Raises NotLeased
        when there is nothing to release (for a list: when one item has nothing; nothing is sent then).
        """
        with self._lock:
            frame = self._release_frame(tensor_or_key)
            if self._sock is not None:
                try:
                    self._sock.sendall(frame)
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

    def ls(
        self, prefix: str = "", *, page: int = protocol.LS_PAGE, remote: bool = False
    ) -> list[dict[str, Any]]:
        """Every entry whose key starts with ``prefix``, as dicts (key, dtype, shape, tiers, ...), in key
        order; fetched ``page`` entries per round trip, so no reply is unbounded. ``remote=True``:
        the entries the remote tier holds (every machine's shares), not this daemon's."""
        out: list[dict[str, Any]] = []
        while True:
            after = out[-1]["key"] if out else ""
            got = list(self._ok(protocol.Ls(self._next_rid(), prefix, after, page, remote)))
            out += got
            if len(got) < page:
                return out

    def stat(self, key: str) -> dict[str, Any]:
        """One entry's metadata; NotFound if absent."""
        return dict(self._ok(protocol.Stat(self._next_rid(), key)))

    def stats(self) -> dict[str, Any]:
        """The daemon's status: tiers, clients, leases, counters."""
        return dict(self._ok(protocol.Status(self._next_rid())))

    def why(self, key: str) -> dict[str, Any]:
        """Where ``key`` is and why: tiers, leases by client, pins, eviction rank, prediction, codec."""
        return dict(self._ok(protocol.Why(self._next_rid(), key)))
