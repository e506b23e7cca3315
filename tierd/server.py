"""The tierd daemon: one asyncio loop serving the Unix socket.

Life in four steps, as ``Server.serve`` runs them:

1. startup   - check the config, build the RAM arena (pre-faulted), bind the socket (0600, or 0660
               for a configured group), then sd_notify READY.
2. main_loop - serve connections; sweep expired entries; ping the systemd watchdog.
3. (signal)  - SIGTERM or SIGINT asks for a graceful stop; a second one exits at once.
4. shutdown  - sd_notify STOPPING, stop accepting, let replies drain for ``graceful_timeout``,
               close every connection (their leases end), remove the socket, free the arena.

Each connection is a :class:`Connection` (an asyncio Protocol): it cuts frames out of the byte
stream, decodes each into its typed message and hands it to the :class:`~tierd.manager.Manager`.
Anything a client sends gets a typed reply or, when the stream cannot be framed, a closed
connection: the loop itself never sees an exception from a client.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import functools
import logging
import os
import signal
import socket
import stat
import struct
import sys
import time
from typing import Any

import msgspec

from tierd import __version__, protocol
from tierd.config import Config, ConfigError, load
from tierd.errors import InvalidRequest, ProtocolError, TierdError, VersionMismatch
from tierd.loops import loop_factory
from tierd.manager import Manager
from tierd.monitor import Monitor, Pressure, release_pages
from tierd.notify import Notifier
from tierd.placement import Placement
from tierd.protocol import (
    HEADER,
    HEADER_SIZE,
    MAX_REQUEST_BYTES,
    Error,
    Got,
    Ok,
    PutReady,
    Welcome,
)
from tierd.tiers.disk import DiskTier
from tierd.tiers.ram import ArenaError, RamTier

log = logging.getLogger("tierd")
_PEERCRED = struct.Struct("3i")
_GIB = float(1 << 30)


class Connection(asyncio.Protocol):
    """One client connection. All state changes go through the manager, on the loop."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.manager = server.manager
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
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
        buf = self.buf
        buf += data
        pos = 0
        n = len(buf)
        while n - pos >= HEADER_SIZE and not self.closed:
            length, mtype = HEADER.unpack_from(buf, pos)
            if length > MAX_REQUEST_BYTES:
                self.manager.counters["bad_frames"] += 1
                self._fatal(
                    ProtocolError(f"frame of {length} bytes exceeds the {MAX_REQUEST_BYTES}-byte limit")
                )
                return
            end = pos + HEADER_SIZE + length
            if end > n:
                break
            payload = bytes(buf[pos + HEADER_SIZE : end])
            pos = end
            self._handle(mtype, payload)
        if pos:
            del buf[:pos]

    # -- dispatch --------------------------------------------------------------------------------
    def _handle(self, mtype: int, payload: bytes) -> None:
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
            self.manager.counters["errors"] += 1
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

    async def _finish(self, rid: int, what: str, coro: Any) -> None:
        try:
            reply = await coro
        except TierdError as e:
            self.manager.counters["errors"] += 1
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
        fds = array.array("i", [self.manager.ram.fd])
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
            if self.server.placement.disk is None:
                raise mgr.ram_full(m.key, m.nbytes)
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
        mgr = self.manager
        e = mgr._writing(self.client_id, m.put_id)
        if e.durable:
            return self._seal_durable(m)
        old = mgr.entries.get(e.key)
        old_on_disk = old is not None and old.durable and old.disk is not None
        sealed = list(mgr.seal(self.client_id, m.put_id))
        if old_on_disk:
            return self._after_unpublish(Ok(m.rid, sealed))  # the old durable copy must be gone first
        return Ok(m.rid, sealed)

    async def _seal_durable(self, m: protocol.Seal) -> Ok:
        return Ok(m.rid, list(await self.server.placement.seal_durable(self.client_id, m.put_id)))

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
            return Got(m.rid, self.manager.lease(self.client_id, found))
        return self._get_slow(m.rid, found)

    async def _get_slow(self, rid: int, found: list[Any]) -> Got:
        return Got(rid, await self.server.placement.get(self.client_id, found))

    def on_release(self, m: protocol.Release) -> None:
        bad = self.manager.release(self.client_id, m.leases)
        if bad:
            log.debug("client %d released %d lease ids it did not hold", self.client_id, bad)

    def on_delete(self, m: protocol.Delete) -> Any:
        e = self.manager.resolve(m.key)
        on_disk = e.durable and e.disk is not None
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
        return Ok(m.rid, self.manager.prefetch_hint(m.keys))

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
}


def _guess_rid(payload: bytes) -> int:
    """The request id of a payload that failed validation, when its first field is still an int."""
    try:
        obj = msgspec.msgpack.decode(payload)
    except protocol.DecodeError:
        return 0
    if isinstance(obj, list) and obj and isinstance(obj[0], int) and 0 <= obj[0] < 2**63:
        return obj[0]
    return 0


class Server:
    def __init__(self, config: Config, *, loop_name: str = "asyncio") -> None:
        self.config = config
        self.loop_name = loop_name
        self.notifier = Notifier()
        self.connections: set[Connection] = set()
        self.tasks: set[asyncio.Task[Any]] = set()
        self.manager: Manager  # built in startup
        self.placement: Placement
        self.socket_path = config.socket_path()
        self._gid = config.socket_gid()
        self._stop = asyncio.Event()
        self.monitor = Monitor()
        self.pressure: Pressure | None = None
        self._signals = 0
        self._server: asyncio.AbstractServer | None = None
        self._started = time.monotonic()

    # -- lifecycle -------------------------------------------------------------------------------
    async def serve(self) -> None:
        await self.startup()
        try:
            await self.main_loop()
        finally:
            await self.shutdown()

    async def startup(self) -> None:
        cfg = self.config
        ram_bytes = cfg.ram_tier_bytes()
        # Bind first: a second daemon on the same socket is refused before it allocates an arena.
        # Clients that connect meanwhile wait in the listen backlog until the loop serves them.
        sock = self._bind()
        t0 = time.perf_counter()
        log.info("building the RAM tier: %.2f GiB memfd arena, pre-faulting...", ram_bytes / _GIB)
        try:
            ram = RamTier(ram_bytes)
        except BaseException:
            sock.close()
            self.socket_path.unlink(missing_ok=True)
            raise
        log.info("RAM tier ready in %.2fs", time.perf_counter() - t0)
        self.manager = Manager(ram)
        disk = None
        disk_bytes = cfg.disk_tier_bytes()
        if disk_bytes:
            try:
                disk = DiskTier(cfg.state_path(), disk_bytes)
            except Exception:
                sock.close()
                self.socket_path.unlink(missing_ok=True)
                ram.close()
                raise
            self.manager.tiers["disk"] = disk
        self.placement = Placement(self.manager, disk, high=cfg.ram_high_watermark, low=cfg.ram_low_watermark,
                                   tag_codecs=cfg.tag_codec_map())  # fmt: skip
        if disk is not None:
            n = self.placement.restore()
            log.info("disk tier: %s (%.1f GiB map), %d durable entries restored",
                     disk.path, disk_bytes / _GIB, n)  # fmt: skip
        loop = asyncio.get_running_loop()
        self._server = await loop.create_unix_server(lambda: Connection(self), sock=sock)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)
        self._background(self.placement.balancer())
        self._background(self._calibrate())
        status = f"serving {ram.capacity_bytes / _GIB:.2f} GiB RAM tier on {self.socket_path}"
        self.notifier.ready(status)
        log.info("tierd %s ready (%s loop): %s", __version__, self.loop_name, status)

    def _background(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self._background_done)

    def _background_done(self, task: asyncio.Task[Any]) -> None:
        self.tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("background task failed: %r", task.exception())

    async def _calibrate(self) -> None:
        """Measure memcpy, disk and codec speeds once (in a thread): the codec policy's inputs."""
        if self.placement.disk is None:
            return
        from tierd.calibrate import calibrate

        loop = asyncio.get_running_loop()
        t0 = time.perf_counter()
        # modest samples: the calibration's own memory (~70 MiB for a moment) must not be what
        # pushes a small machine or a tight cgroup over the edge at start
        calib = await loop.run_in_executor(
            self.placement.io,
            functools.partial(
                calibrate, self.config.state_path(), memcpy_bytes=32 << 20, zstd_bytes=16 << 20
            ),
        )
        self.placement.calibration = calib
        log.info("calibration in %.1fs: %s", time.perf_counter() - t0, calib.to_dict())

    async def main_loop(self) -> None:
        tick = 1.0
        wd = self.notifier.watchdog_interval
        if wd:
            tick = min(tick, wd)
            self.notifier.watchdog()
        last_status = 0.0
        while not self._stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), tick)
            expired = self.manager.expire()
            if expired:
                log.debug("expired %d entries", len(expired))
            await self._relieve_pressure()
            if wd:
                self.notifier.watchdog()
            now = time.monotonic()
            if self.notifier.enabled and now - last_status >= 10:
                last_status = now
                self.notifier.status(self._status_line())

    async def shutdown(self) -> None:
        self.notifier.stopping()
        log.info("stopping: %d connections", len(self.connections))
        if self._server is not None:
            self._server.close()
        deadline = time.monotonic() + self.config.graceful_timeout
        while time.monotonic() < deadline and any(
            c.transport is not None and c.transport.get_write_buffer_size() for c in self.connections
        ):
            await asyncio.sleep(0.01)
        for c in list(self.connections):
            c._close()
        await asyncio.sleep(0)  # let connection_lost run
        for t in list(self.tasks):
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        await self.placement.close()
        if self.placement.disk is not None:
            self.placement.disk.close()
        with contextlib.suppress(FileNotFoundError):
            if self._server is not None:
                os.unlink(self.socket_path)
        self.manager.ram.close()
        self.notifier.close()
        log.info("tierd stopped")

    async def _relieve_pressure(self) -> None:
        """Give RAM back when the machine runs short: demote, then return free pages to the kernel."""
        ram = self.manager.ram
        p = self.monitor.poll(ram.capacity_bytes)  # the arena is pre-faulted: all of it is resident
        self.pressure = p
        if p.shrink_bytes <= 0:
            return
        freed = await self.placement.balance_once(target_used=max(0, ram.used_bytes - p.shrink_bytes))
        released = 0
        for start, size in ram.alloc.holes(min_size=2 << 20):
            released += release_pages(ram.mmap, start, size)
        self.manager.counters["pressure_demoted_bytes"] += freed
        self.manager.counters["pressure_released_bytes"] += released
        log.warning("memory pressure %s (%s): demoted %d bytes, returned %d bytes of free RAM-tier pages",
                    p.level, ", ".join(p.reasons), freed, released)  # fmt: skip

    def _on_signal(self, sig: int) -> None:
        self._signals += 1
        if self._signals > 1:
            log.warning("second %s: exiting now", signal.Signals(sig).name)
            os._exit(1)
        log.info("%s: shutting down (send it again to exit at once)", signal.Signals(sig).name)
        self._stop.set()

    # -- socket ----------------------------------------------------------------------------------
    def _bind(self) -> socket.socket:
        path = self.socket_path
        parent = path.parent
        if not parent.exists():
            parent.mkdir(mode=0o700, parents=True)
        pst = parent.stat()
        if pst.st_uid != os.getuid() and os.getuid() != 0:
            raise ConfigError(
                f"socket directory {parent} belongs to uid {pst.st_uid}, not to us: refusing it"
            )
        if path.exists() or path.is_symlink():
            if not stat.S_ISSOCK(path.lstat().st_mode):
                raise ConfigError(f"{path} exists and is not a socket: remove it or choose --socket")
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(str(path))
            except ConnectionRefusedError:
                log.info("removing stale socket %s", path)
                path.unlink()
            else:
                raise ConfigError(f"another tierd is already serving {path}")
            finally:
                probe.close()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        old = os.umask(0o177 if self._gid is None else 0o117)
        try:
            sock.bind(str(path))
        finally:
            os.umask(old)
        if self._gid is not None:
            try:
                if path.stat().st_gid != self._gid:
                    os.chown(path, -1, self._gid)
            except OSError as e:  # not a member of the group (or chown filtered): a config error
                sock.close()
                path.unlink()
                raise ConfigError(
                    f"socket_group: cannot give {path} to group {self.config.socket_group!r} "
                    f"({e.strerror}); tierd's user must be a member of it"
                ) from None
            os.chmod(path, 0o660)
        else:
            os.chmod(path, 0o600)
        sock.listen(256)
        sock.setblocking(False)
        return sock

    def check_codec(self, m: protocol.Put) -> None:
        """An explicit codec must suit the tensor (int8 needs floats, ...): refused at put time."""
        if m.codec in (None, "auto"):
            return
        from tierd.codecs import get_codec

        why = get_codec(m.codec).why_not(m.dtype, list(m.shape))
        if why is not None:
            raise InvalidRequest(f"codec {m.codec!r} cannot store {m.dtype}{list(m.shape)}: {why}",
                                 codec=m.codec)  # fmt: skip

    def peer_allowed(self, uid: int, gid: int) -> bool:
        if uid in (os.getuid(), 0):
            return True
        # with a socket group, the file mode (0660) already decided who could connect
        return self._gid is not None

    # -- status ----------------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        s = self.manager.status()
        s["daemon"] = {
            "pid": os.getpid(),
            "version": __version__,
            "protocol": protocol.PROTOCOL_VERSION,
            "loop": self.loop_name,
            "socket": str(self.socket_path),
            "uptime_s": round(time.monotonic() - self._started, 3),
        }
        pl = self.placement
        calib = pl.calibration
        s["pressure"] = self.pressure.as_dict() if self.pressure is not None else None
        s["placement"] = {
            "policy": self.manager.policy.name,
            "ram_high_watermark": pl.high,
            "ram_low_watermark": pl.low,
            "tag_codecs": pl.tag_codecs,
            "calibration": calib.to_dict() if calib is not None else None,
        }
        return s

    def _status_line(self) -> str:
        ram = self.manager.ram
        return (
            f"{len(self.manager.clients)} clients, {len(self.manager.entries)} entries, "
            f"RAM {ram.used_bytes / _GIB:.2f}/{ram.capacity_bytes / _GIB:.2f} GiB"
        )


def main(argv: list[str] | None = None) -> int:
    try:
        config = load(argv)
        config.validate()
    except ConfigError as e:
        print(f"tierd: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=config.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    name, factory = loop_factory()
    server = Server(config, loop_name=name)
    try:
        with asyncio.Runner(loop_factory=factory) as runner:
            runner.run(server.serve())
    except (ConfigError, ArenaError) as e:
        print(f"tierd: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
