"""A state directory the daemon cannot use as it is: refused at start with one line and exit status 2,
never a traceback, a SIGBUS or a silent fresh start; a second daemon never shares one. Real daemons,
real LMDB files damaged the way disks and people damage them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tierd import launch
from tierd_client import Client

MiB = 1 << 20


def run_tierd(tmp: Path, state: Path, sock: str = "refused.sock") -> subprocess.CompletedProcess[str]:
    """Start tierd in the foreground and return once it exits (it must, for these states)."""
    cmd = [sys.executable, "-m", "tierd", "--socket", str(tmp / sock), "--state-dir", str(state),
           "--ram-bytes", "16MiB", "--disk-bytes", "64MiB"]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60)


def refused(r: subprocess.CompletedProcess[str], *words: str) -> str:
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr, r.stderr
    line = next(x for x in r.stderr.splitlines() if x.startswith("tierd: "))
    for w in words:
        assert w in line, line
    return line


def put_durable(short_tmp: Path, state: Path) -> torch.Tensor:
    """Run a daemon on ``state``, put 8 durable MiB-sized entries, stop it; returns the first."""
    d = launch.start(short_tmp / "a.sock", "--state-dir", str(state), "--disk-bytes", "64MiB",
                     ram_bytes="16MiB", log_path=short_tmp / "a.log")  # fmt: skip
    try:
        with Client(d.socket) as c:
            for i in range(8):
                c.put(f"w/{i}", torch.full((MiB // 4,), float(i)), durable=True)
    finally:
        assert d.stop() == 0
    return torch.full((MiB // 4,), 0.0)


def test_a_second_daemon_on_the_same_state_dir_is_refused(short_tmp: Path) -> None:
    state = short_tmp / "state"
    d = launch.start(short_tmp / "a.sock", "--state-dir", str(state), "--disk-bytes", "64MiB",
                     ram_bytes="16MiB", log_path=short_tmp / "a.log")  # fmt: skip
    try:
        with Client(d.socket) as c:
            c.put("w/a", torch.arange(1000.0), durable=True)
            line = refused(run_tierd(short_tmp, state, "b.sock"), "in use by another tierd", f"pid {d.pid}")
            assert "--state-dir" in line
            assert torch.equal(c.get("w/a"), torch.arange(1000.0))  # the first one goes on, untouched
    finally:
        assert d.stop() == 0


def test_a_truncated_file_is_refused_not_a_sigbus(short_tmp: Path) -> None:
    state = short_tmp / "state"
    put_durable(short_tmp, state)
    db = state / "tierd.lmdb"
    os.truncate(db, db.stat().st_size // 2)
    refused(run_tierd(short_tmp, state), str(db), "truncated")


def test_damaged_meta_pages_are_refused(short_tmp: Path) -> None:
    state = short_tmp / "state"
    put_durable(short_tmp, state)
    db = state / "tierd.lmdb"
    with open(db, "r+b") as f:
        f.write(os.urandom(8192))  # both meta pages
    refused(run_tierd(short_tmp, state), str(db), "cannot be opened")


@pytest.mark.parametrize("how", ["emptied", "deleted"])
def test_a_vanished_file_is_refused_until_the_user_says_start_over(short_tmp: Path, how: str) -> None:
    state = short_tmp / "state"
    put_durable(short_tmp, state)
    db = state / "tierd.lmdb"
    if how == "emptied":
        os.truncate(db, 0)
    else:
        db.unlink()
    marker = state / "tierd.lmdb.id"
    refused(run_tierd(short_tmp, state), str(db), str(marker), "durable entries are gone")
    marker.unlink()  # what the message says to do to start over
    d = launch.start(short_tmp / "b.sock", "--state-dir", str(state), "--disk-bytes", "64MiB",
                     ram_bytes="16MiB", log_path=short_tmp / "b.log")  # fmt: skip
    try:
        with Client(d.socket) as c:
            assert c.ls() == []
        assert marker.exists()  # a new id for the new file
    finally:
        assert d.stop() == 0


def test_a_file_from_another_state_dir_is_refused(short_tmp: Path) -> None:
    one, two = short_tmp / "one", short_tmp / "two"
    put_durable(short_tmp, one)
    put_durable(short_tmp, two)
    (two / "tierd.lmdb").unlink()
    os.link(one / "tierd.lmdb", two / "tierd.lmdb")
    refused(run_tierd(short_tmp, two), "is not the disk tier this state directory had")


def test_a_restart_keeps_every_durable_entry(short_tmp: Path) -> None:
    state = short_tmp / "state"
    first = put_durable(short_tmp, state)
    d = launch.start(short_tmp / "b.sock", "--state-dir", str(state), "--disk-bytes", "64MiB",
                     ram_bytes="16MiB", log_path=short_tmp / "b.log")  # fmt: skip
    try:
        with Client(d.socket) as c:
            assert len(c.ls("w/")) == 8
            assert torch.equal(c.get("w/0"), first)
    finally:
        assert d.stop() == 0


def test_a_state_dir_that_is_a_file_is_refused(short_tmp: Path) -> None:
    state = short_tmp / "file"
    state.write_text("not a directory")
    refused(run_tierd(short_tmp, state), str(state), "not a directory")
    refused(run_tierd(short_tmp, state / "below"), str(state / "below"), "cannot create it")


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a read-only filesystem needs root")
def test_a_read_only_state_dir_is_refused(short_tmp: Path) -> None:
    ro = short_tmp / "ro"
    ro.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(ro)], check=True)
    try:
        refused(run_tierd(short_tmp, ro), str(ro))
    finally:
        subprocess.run(["umount", str(ro)], check=True)
