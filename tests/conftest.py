"""Shared fixtures: a real tierd subprocess per test (or per module), ready when it says READY=1."""

from __future__ import annotations

import array
import contextlib
import os
import random
import socket
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tierd import launch, protocol


def pytest_report_header(config: pytest.Config) -> str:
    seed = int(os.environ.get("TIERD_TEST_SEED", random.randrange(2**31)))
    os.environ["TIERD_TEST_SEED"] = str(seed)
    return f"tierd test seed: {seed} (set TIERD_TEST_SEED to repeat)"


@pytest.fixture
def seed() -> int:
    return int(os.environ.get("TIERD_TEST_SEED", "0"))


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A short directory (AF_UNIX paths are limited to 107 bytes)."""
    with tempfile.TemporaryDirectory(prefix="tierd-t-", dir="/tmp") as d:
        yield Path(d)


def _start(tmp: Path, *args: str, ram_bytes: str = "64MiB", disk_bytes: str = "0") -> launch.Daemon:
    return launch.start(
        tmp / "tierd.sock", "--state-dir", str(tmp / "state"), "--disk-bytes", disk_bytes, *args,
        ram_bytes=ram_bytes, log_path=tmp / "tierd.log",
    )  # fmt: skip


@pytest.fixture
def daemon(short_tmp: Path) -> Iterator[launch.Daemon]:
    """A fresh tierd with a 64 MiB RAM tier and no disk tier."""
    d = _start(short_tmp)
    yield d
    running = d.proc.poll() is None
    rc = d.stop()
    if running:  # a test that killed the daemon itself has its own checks
        assert rc == 0, f"tierd exited with {rc} on SIGTERM; log:\n{d.log()}"


@pytest.fixture
def start_daemon(short_tmp: Path) -> Iterator:
    """Factory: start_daemon(*flags, ram_bytes=..., disk_bytes=...) -> Daemon, on the same socket and
    state dir each time (a restart); all are stopped at teardown."""
    started: list[launch.Daemon] = []

    def make(*args: str, ram_bytes: str = "64MiB", disk_bytes: str = "0") -> launch.Daemon:
        d = _start(short_tmp, *args, ram_bytes=ram_bytes, disk_bytes=disk_bytes)
        started.append(d)
        return d

    yield make
    for d in started:
        d.stop()


def pytest_asyncio_loop_factories(config: pytest.Config, item: pytest.Item):
    """Run every asyncio test on both loops the client must work with."""
    import asyncio

    factories = {"asyncio": asyncio.new_event_loop}
    try:
        import uvloop
    except ImportError:
        pass
    else:
        factories["uvloop"] = uvloop.new_event_loop
    return factories


def wait_until(cond, timeout: float = 5.0, what: str = "condition"):
    """Re-check ``cond`` (each check is a round trip to the daemon) until true or timeout; no sleeps."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        v = cond()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")


class HungPeer:
    """A Unix socket server that plays a daemon which stops answering: it accepts connections,
    answers HELLO with a real WELCOME and arena memfd (or, with ``welcome=False``, never answers
    it), optionally sends ``then`` (say, half a frame), and from there on only reads: every request
    it gets is kept in ``received`` (as (type, payload) frames), none is ever answered."""

    ARENA_BYTES = 1 << 20

    def __init__(self, path: Path, *, welcome: bool = True, then: bytes = b"") -> None:
        self.socket = path
        self.welcome = welcome
        self.then = then
        self.received: list[tuple[int, bytes]] = []
        self._srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._srv.bind(str(path))
        self._srv.listen()
        self._conns: list[socket.socket] = []
        self._thread = threading.Thread(target=self._serve, name="hung-peer", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._srv.accept()
            except OSError:  # close(): the listening socket was shut down
                return
            self._conns.append(conn)
            self._talk(conn)

    def _talk(self, conn: socket.socket) -> None:
        frames = protocol.FrameReader(protocol.MAX_REQUEST_BYTES)
        try:
            while True:
                data = conn.recv(65536)
                if not data:
                    return  # the client closed
                frames.feed(data)
                while (frame := frames.next_frame()) is not None:
                    mtype, payload = frame
                    self.received.append((mtype, bytes(payload)))
                    if mtype == protocol.HELLO and self.welcome:
                        self._send_welcome(conn)
        except OSError:  # the client aborted the connection
            return

    def _send_welcome(self, conn: socket.socket) -> None:
        fd = os.memfd_create("hung-peer-arena", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, self.ARENA_BYTES)
            arena = protocol.ArenaInfo(0, self.ARENA_BYTES, writable=True, backed=False)
            welcome = protocol.Welcome(protocol.PROTOCOL_VERSION, os.getpid(), 1, "hung", [arena])
            conn.sendmsg(
                [protocol.encode(welcome)], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))]
            )
        finally:
            os.close(fd)
        if self.then:
            conn.sendall(self.then)

    def close(self) -> None:
        self._srv.shutdown(socket.SHUT_RDWR)
        self._srv.close()
        for c in self._conns:
            with contextlib.suppress(OSError):  # already closed by the client
                c.shutdown(socket.SHUT_RDWR)
        self._thread.join(timeout=10)
        assert not self._thread.is_alive(), "the hung peer's thread did not stop"
        for c in self._conns:
            c.close()


@pytest.fixture
def hung_peer(short_tmp: Path) -> Iterator:
    """Factory: hung_peer(welcome=True, then=b"") -> HungPeer listening on a fresh socket."""
    peers: list[HungPeer] = []

    def make(**kw) -> HungPeer:
        p = HungPeer(short_tmp / f"hung{len(peers)}.sock", **kw)
        peers.append(p)
        return p

    yield make
    for p in peers:
        p.close()


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator:
    """A real 3-node Redis Cluster on loopback (tests/redis_cluster.py), shared by the session's
    tests; each test keeps to its own key prefix. Tests that break nodes start their own."""
    from tests.redis_cluster import LocalCluster

    with tempfile.TemporaryDirectory(prefix="tierd-redis-") as d:
        cluster = LocalCluster(Path(d))
        try:
            yield cluster
        finally:
            cluster.close()


@pytest.fixture
def machines() -> Iterator:
    """Factory: machines(name, *flags) -> a daemon with its own socket and state dir (a machine)."""
    started: list[launch.Daemon] = []
    with tempfile.TemporaryDirectory(prefix="tierd-m-", dir="/tmp") as d:

        def make(name: str, *flags: str, ram_bytes: str = "64MiB", disk_bytes: str = "0") -> launch.Daemon:
            root = Path(d) / name
            root.mkdir()
            daemon = launch.start(
                root / "s", "--state-dir", str(root / "state"), "--disk-bytes", disk_bytes, *flags,
                ram_bytes=ram_bytes, log_path=root / "tierd.log",
            )  # fmt: skip
            started.append(daemon)
            return daemon

        yield make
        for daemon in started:
            running = daemon.proc.poll() is None
            rc = daemon.stop()
            assert not running or rc == 0, f"tierd exited with {rc}; log:\n{daemon.log()}"
