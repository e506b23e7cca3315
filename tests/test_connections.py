"""Many connections: past max_connections a client is refused with the daemon's reason (not a broken
pipe), and a daemon out of file descriptors keeps serving the connections it has, keeps its
background checks alive and accepts again once descriptors free up. Real daemons, real sockets."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch

from tests.conftest import wait_until
from tierd import launch
from tierd_client import Client, DaemonUnavailable


def test_one_connection_past_the_cap_is_refused_with_the_reason(short_tmp: Path) -> None:
    d = launch.start(short_tmp / "d.sock", "--state-dir", str(short_tmp / "state"), "--disk-bytes", "0",
                     "--max-connections", "3", ram_bytes="16MiB", log_path=short_tmp / "d.log")  # fmt: skip
    try:
        held = [Client(d.socket) for _ in range(3)]
        held[0].put("t/x", torch.arange(10.0))
        with pytest.raises(DaemonUnavailable, match="at most 3 connections") as err:
            Client(d.socket)
        assert "Broken pipe" not in str(err.value)
        assert torch.equal(held[1].get("t/x"), torch.arange(10.0))  # the others go on
        held.pop().close()
        with Client(d.socket) as c:  # a slot is free again
            assert torch.equal(c.get("t/x"), torch.arange(10.0))
        for c in held:
            c.close()
    finally:
        assert d.stop() == 0


def test_out_of_file_descriptors_the_daemon_lives_and_recovers(short_tmp: Path) -> None:
    """The daemon runs with 64 descriptors (soft = hard); 150 idle connections use them all up."""
    d = launch.start(short_tmp / "d.sock", "--state-dir", str(short_tmp / "state"), "--disk-bytes", "0",
                     ram_bytes="16MiB", log_path=short_tmp / "d.log",
                     prefix=["prlimit", "--nofile=64:64"])  # fmt: skip
    flood: list[socket.socket] = []
    try:
        c = Client(d.socket)
        c.put("t/x", torch.arange(10.0))
        for _ in range(150):  # connect() succeeds into the listen backlog even when accept() cannot
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(5)
            try:
                s.connect(str(d.socket))
            except OSError:
                s.close()
                break
            flood.append(s)
        # the once-a-second memory-pressure check cannot open /proc files now: skipped, not fatal
        wait_until(lambda: "memory pressure check skipped" in d.log(), timeout=30, what="a skipped check")
        assert d.proc.poll() is None
        assert torch.equal(c.get("t/x"), torch.arange(10.0))  # an open connection is served
        for s in flood:
            s.close()
        flood.clear()
        wait_until(lambda: _serves(d.socket), timeout=30, what="a new connection to be served")
        assert d.proc.poll() is None
        c.close()
    finally:
        for s in flood:
            s.close()
        assert d.stop() == 0, d.log()


def _serves(path: Path) -> bool:
    try:
        with Client(path, timeout=5) as c:
            return bool(torch.equal(c.get("t/x"), torch.arange(10.0)))
    except DaemonUnavailable:
        return False
