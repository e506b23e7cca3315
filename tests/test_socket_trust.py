"""Who may serve the socket: the daemon refuses a socket directory someone else could swap its socket
in, and a client refuses, before it sends a byte, a process serving the socket as another user (a
fake daemon that got there first). Real daemons, real processes of another uid where root can make
them."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from tierd import launch
from tierd_client import Client, DaemonUnavailable

NOBODY = 65534
as_root = pytest.mark.skipif(os.geteuid() != 0, reason="another uid's process or file needs root")


def run_tierd(sock: Path, tmp: Path) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "tierd", "--socket", str(sock), "--state-dir", str(tmp / "state"),
           "--ram-bytes", "16MiB", "--disk-bytes", "0"]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60)


def test_a_socket_dir_others_can_write_is_refused(short_tmp: Path) -> None:
    shared = short_tmp / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    r = run_tierd(shared / "tierd.sock", short_tmp)
    assert r.returncode == 2 and "writable by others" in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_a_sticky_shared_dir_is_fine(short_tmp: Path) -> None:
    """Like /tmp: others may add files there but not remove or rename the daemon's socket."""
    sticky = short_tmp / "sticky"
    sticky.mkdir()
    sticky.chmod(0o1777)
    d = launch.start(sticky / "tierd.sock", "--state-dir", str(short_tmp / "state"), "--disk-bytes", "0",
                     ram_bytes="16MiB", log_path=short_tmp / "d.log")  # fmt: skip
    try:
        with Client(d.socket) as c:
            c.put("t/x", torch.ones(4))
    finally:
        assert d.stop() == 0


@as_root
def test_a_socket_dir_made_by_another_user_is_refused_even_by_root(short_tmp: Path) -> None:
    squatted = short_tmp / "tierd-0"  # what another user can pre-create in /tmp
    squatted.mkdir(mode=0o700)
    os.chown(squatted, NOBODY, NOBODY)
    r = run_tierd(squatted / "tierd.sock", short_tmp)
    assert r.returncode == 2 and f"belongs to uid {NOBODY}" in r.stderr, r.stderr


FAKE = textwrap.dedent(
    """
    import os, socket, sys
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(sys.argv[1])
    os.setgid({uid}); os.setuid({uid})  # the peer credentials a client sees are those at listen()
    s.listen(1)
    print("ready", flush=True)
    conn, _ = s.accept()
    conn.settimeout(10)
    got = conn.recv(65536)  # HELLO, or b"" when the client hangs up without a word
    conn.close()
    print(len(got), flush=True)
    """
)


def fake_daemon(short_tmp: Path) -> tuple[subprocess.Popen[str], Path]:
    """A process of uid ``nobody`` listening where a client will look for tierd."""
    sock = short_tmp / "tierd.sock"
    p = subprocess.Popen([sys.executable, "-c", FAKE.format(uid=NOBODY), str(sock)], stdout=subprocess.PIPE,
                         text=True)  # fmt: skip
    assert p.stdout is not None and p.stdout.readline().strip() == "ready"
    return p, sock


@as_root
def test_a_client_sends_nothing_to_a_daemon_of_another_user(short_tmp: Path, monkeypatch) -> None:
    monkeypatch.delenv("TIERD_DAEMON_USER", raising=False)
    p, sock = fake_daemon(short_tmp)
    with pytest.raises(DaemonUnavailable, match=f"runs as uid {NOBODY}") as err:
        Client(sock)
    assert "TIERD_DAEMON_USER" in str(err.value)
    out, _ = p.communicate(timeout=30)
    assert out.strip() == "0"  # not one byte reached it: not even HELLO


@as_root
def test_a_client_trusts_the_user_it_is_told_to(short_tmp: Path, monkeypatch) -> None:
    monkeypatch.setenv("TIERD_DAEMON_USER", str(NOBODY))
    p, sock = fake_daemon(short_tmp)
    with pytest.raises(DaemonUnavailable, match="closed the connection during HELLO"):
        Client(sock, timeout=10)  # the check passed: HELLO went out, and the fake closed on it
    out, _ = p.communicate(timeout=30)
    assert int(out) > 0
