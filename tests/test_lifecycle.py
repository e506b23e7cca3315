"""The daemon's life as systemd sees it: READY, STATUS, STOPPING, WATCHDOG, SIGTERM, the socket file.

Every test runs real ``python -m tierd`` processes and waits on their sd_notify datagrams or on
their exit, never on the clock. Nothing may be left in /dev/shm by any of it (the arena is a memfd).
"""

from __future__ import annotations

import grp
import os
import signal
import socket
import stat
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tierd import launch
from tierd_client import Client


def shm_tierd() -> set[str]:
    return {name for name in os.listdir("/dev/shm") if "tierd" in name.lower()}


@pytest.fixture(autouse=True)
def nothing_left_in_dev_shm() -> Iterator[None]:
    before = shm_tierd()
    yield
    left = shm_tierd() - before
    assert not left, f"tierd left files in /dev/shm: {sorted(left)}"


def fields(msg: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in msg.splitlines() if "=" in line)


def start(tmp: Path, *args: str, name: str = "tierd.sock") -> launch.Daemon:
    return launch.start(
        tmp / name,
        "--state-dir",
        str(tmp / "state"),
        *args,
        ram_bytes="16MiB",
        log_path=tmp / f"{name.replace('/', '-')}.log",
    )


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TIERD_", "NOTIFY_SOCKET", "WATCHDOG_"))}
    env.update(extra)
    return env


# -- READY / STATUS / STOPPING --------------------------------------------------------------------


def test_ready_carries_status_and_mainpid(short_tmp: Path) -> None:
    d = start(short_tmp)
    try:
        ready = fields(d.messages[0])
        assert ready["READY"] == "1"
        assert ready["MAINPID"] == str(d.pid)
        assert "serving" in ready["STATUS"] and str(d.socket) in ready["STATUS"]
        assert "GiB RAM tier" in ready["STATUS"]
        assert d.socket.exists()  # READY means the socket is there...
        with Client(str(d.socket)) as c:  # ...and serving
            assert c.stats()["tiers"]
    finally:
        assert d.stop() == 0, d.log()


def test_sigterm_is_graceful(short_tmp: Path) -> None:
    d = start(short_tmp)
    c = Client(str(d.socket))
    c.stats()
    d.proc.send_signal(signal.SIGTERM)
    stopping = fields(d.wait_message("STOPPING=1", timeout=5))
    assert stopping["STOPPING"] == "1"
    assert d.proc.wait(timeout=10) == 0, d.log()
    assert not d.socket.exists()
    c.close()
    log = d.log()
    assert "SIGTERM" in log and "tierd stopped" in log
    assert "Traceback" not in log
    assert d.stop() == 0


def test_sigint_is_graceful_too(short_tmp: Path) -> None:
    d = start(short_tmp)
    d.proc.send_signal(signal.SIGINT)
    d.wait_message("STOPPING=1", timeout=5)
    assert d.proc.wait(timeout=10) == 0, d.log()
    assert not d.socket.exists()
    d.stop()


# -- the socket file ------------------------------------------------------------------------------


def test_socket_mode_0600_and_private_directory(short_tmp: Path) -> None:
    d = start(short_tmp, name="run/deeper/tierd.sock")
    try:
        st = d.socket.lstat()
        assert stat.S_ISSOCK(st.st_mode)
        assert stat.S_IMODE(st.st_mode) == 0o600
        assert st.st_uid == os.getuid()
        # the socket's own directory, when the daemon has to create it, is private to its user
        assert stat.S_IMODE(d.socket.parent.stat().st_mode) == 0o700
    finally:
        assert d.stop() == 0


def other_group() -> grp.struct_group | None:
    """A group other than our primary one that this process may give files to."""
    if os.getuid() == 0:
        return next((g for g in grp.getgrall() if g.gr_gid != os.getegid()), None)
    return next((grp.getgrgid(g) for g in os.getgroups() if g != os.getegid()), None)


def test_socket_group_mode_0660(short_tmp: Path) -> None:
    group = other_group() or grp.getgrgid(os.getegid())
    d = start(short_tmp, "--socket-group", group.gr_name)
    try:
        st = d.socket.lstat()
        assert stat.S_IMODE(st.st_mode) == 0o660
        assert st.st_gid == group.gr_gid
    finally:
        assert d.stop() == 0, d.log()


def test_socket_group_refused_is_a_config_error(short_tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """chown refused (not a member, or a seccomp filter): a clear ConfigError, no socket left behind."""
    from tierd.config import ConfigError, load
    from tierd.server import Server

    group = other_group()
    if group is None:
        pytest.skip("this user belongs to no second group")
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    path = short_tmp / "tierd.sock"
    server = Server(load(["--socket", str(path), "--socket-group", group.gr_name], {}))

    def refuse(*args: object, **kwargs: object) -> None:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "chown", refuse)
    with pytest.raises(ConfigError, match=f"socket_group: cannot give .* to group '{group.gr_name}'"):
        server._bind()
    assert not path.exists()


def test_second_daemon_on_same_socket_refuses(short_tmp: Path) -> None:
    first = start(short_tmp)
    try:
        inode = first.socket.stat().st_ino
        r = subprocess.run(
            [sys.executable, "-m", "tierd", "--socket", str(first.socket), "--ram-bytes", "8MiB",
             "--state-dir", str(short_tmp / "state2")],
            capture_output=True, text=True, timeout=20, env=clean_env(), stdin=subprocess.DEVNULL,
        )  # fmt: skip
        assert r.returncode == 2, r.stderr
        last = r.stderr.strip().splitlines()[-1]
        assert last == f"tierd: another tierd is already serving {first.socket}"
        assert "Traceback" not in r.stderr
        # the first one is untouched and still serving
        assert first.proc.poll() is None
        assert first.socket.stat().st_ino == inode
        with Client(str(first.socket)) as c:
            assert c.stats()["tiers"]
    finally:
        assert first.stop() == 0, first.log()


def test_stale_socket_is_replaced(short_tmp: Path) -> None:
    dead = start(short_tmp)
    dead.kill()  # SIGKILL: no shutdown, the socket file stays behind
    assert dead.proc.returncode == -signal.SIGKILL
    assert stat.S_ISSOCK(dead.socket.lstat().st_mode)
    with pytest.raises(ConnectionRefusedError):
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(dead.socket))
        finally:
            probe.close()

    d = start(short_tmp)
    try:
        assert "removing stale socket" in d.log()
        assert stat.S_IMODE(d.socket.stat().st_mode) == 0o600
        with Client(str(d.socket)) as c:
            assert c.stats()["tiers"]
    finally:
        assert d.stop() == 0, d.log()
    assert not d.socket.exists()


def test_a_file_that_is_not_a_socket_is_left_alone(short_tmp: Path) -> None:
    path = short_tmp / "tierd.sock"
    path.write_text("precious")
    r = subprocess.run(
        [sys.executable, "-m", "tierd", "--socket", str(path), "--ram-bytes", "8MiB",
         "--state-dir", str(short_tmp / "state")],
        capture_output=True, text=True, timeout=20, env=clean_env(), stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert r.returncode == 2
    assert "is not a socket" in r.stderr.strip().splitlines()[-1]
    assert path.read_text() == "precious"


# -- sd_notify details: abstract address, watchdog ------------------------------------------------


class Listener:
    """A datagram socket standing in for systemd's notify socket."""

    def __init__(self, address: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self.sock.bind(address)
        self.messages: list[dict[str, str]] = []

    def wait(self, key: str, proc: subprocess.Popen, timeout: float = 10.0) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            self.sock.settimeout(min(left, 0.25))
            try:
                msg = fields(self.sock.recv(4096).decode())
            except TimeoutError:
                assert proc.poll() is None, f"tierd exited with {proc.returncode} before {key}"
                continue
            self.messages.append(msg)
            if key in msg:
                return msg
        raise AssertionError(f"no {key} within {timeout}s; got {self.messages}")

    def close(self) -> None:
        self.sock.close()


def spawn(tmp: Path, **env: str) -> subprocess.Popen:
    log = open(tmp / "tierd.log", "wb")  # noqa: SIM115 - the child keeps it; closed below
    try:
        return subprocess.Popen(
            [sys.executable, "-m", "tierd", "--socket", str(tmp / "tierd.sock"), "--ram-bytes", "16MiB",
             "--state-dir", str(tmp / "state")],
            env=clean_env(**env), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )  # fmt: skip
    finally:
        log.close()


def stop(proc: subprocess.Popen) -> int:
    if proc.poll() is None:
        proc.terminate()
        try:
            return proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
    return proc.wait()


def test_abstract_notify_socket(short_tmp: Path) -> None:
    name = f"tierd-test-{uuid.uuid4().hex}"
    listener = Listener("\0" + name)
    proc = spawn(short_tmp, NOTIFY_SOCKET="@" + name)
    try:
        ready = listener.wait("READY", proc)
        assert ready["READY"] == "1" and ready["MAINPID"] == str(proc.pid) and ready["STATUS"]
        proc.send_signal(signal.SIGTERM)
        assert listener.wait("STOPPING", proc)["STOPPING"] == "1"
        assert proc.wait(timeout=10) == 0
        assert not (short_tmp / "tierd.sock").exists()
    finally:
        stop(proc)
        listener.close()
    assert "WATCHDOG" not in {k for m in listener.messages for k in m}  # no WATCHDOG_USEC, no pings


def test_watchdog_pings(short_tmp: Path) -> None:
    path = str(short_tmp / "notify")
    listener = Listener(path)
    proc = spawn(short_tmp, NOTIFY_SOCKET=path, WATCHDOG_USEC="200000")
    try:
        listener.wait("READY", proc)
        times = []
        for _ in range(3):
            listener.wait("WATCHDOG", proc, timeout=2)
            times.append(time.monotonic())
        # WATCHDOG_USEC=200000: a ping every 0.1 s (half the interval), not every 1 s (the idle tick)
        assert times[-1] - times[0] < 1.0, times
    finally:
        assert stop(proc) == 0
        listener.close()


def test_a_listener_that_stops_reading_never_blocks_the_daemon(short_tmp: Path) -> None:
    """The notify queue (10 datagrams by default) fills within 0.1 s of pings every 10 ms once the
    listener stops reading; the daemon drops messages and goes on answering (sendto would block)."""
    path = str(short_tmp / "notify")
    listener = Listener(path)
    proc = spawn(short_tmp, NOTIFY_SOCKET=path, WATCHDOG_USEC="20000")
    try:
        listener.wait("READY", proc)  # from here on nothing reads the listener's queue
        with Client(short_tmp / "tierd.sock", timeout=5) as c:
            t0, n = time.monotonic(), 0
            while time.monotonic() - t0 < 1.0:  # 100 pings' worth: the queue is long full
                c.stats()
                n += 1
        assert n > 10 and proc.poll() is None
    finally:
        assert stop(proc) == 0
        listener.close()
