"""tierctl top in a real 80x24 pseudo-terminal against a real daemon (RAM and disk tiers)."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import numpy as np

from tierd_client import Client

ANSI = re.compile(rb"\x1b\[[0-9;?]*[a-zA-Z]|\x1b[()][0-9A-Za-z]|\x1b[=>78]")


def in_pty(
    args: list[str], *, keys: bytes = b"", until: bytes = b"", timeout: float = 30.0
) -> tuple[int, str]:
    """Run ``args`` on an 80x24 pseudo-terminal; type ``keys`` once ``until`` has been drawn; return
    its exit status and what it drew (escape sequences removed)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    env["TERM"] = "xterm-256color"
    proc = subprocess.Popen(args, stdin=slave, stdout=slave, stderr=slave, env=env, start_new_session=True)
    os.close(slave)
    out = b""
    sent = not keys
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.2)
            if ready:
                try:
                    chunk = os.read(master, 65536)
                except OSError:  # the child closed the terminal
                    break
                if not chunk:
                    break
                out += chunk
            if not sent and until in ANSI.sub(b"", out):
                os.write(master, keys)
                sent = True
            if proc.poll() is not None and not ready:
                break
        else:
            os.killpg(proc.pid, signal.SIGKILL)
        rc = proc.wait(10)
    finally:
        os.close(master)
    return rc, ANSI.sub(b"", out).decode(errors="replace").replace("\r", "")


def workload(sock: Path) -> Client:
    c = Client(sock)
    for i in range(4):
        c.put(f"top/{i}", np.full(100_000, i, dtype=np.float32), durable=True)
    c.evict("top/0")
    for _ in range(5):
        c.release(c.get("top/1"))
    c.release(c.get("top/0"))  # promoted from disk
    return c


def tierctl(sock: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "tierd_client.tierctl", "--socket", str(sock), *args]


def test_top_once_fits_80x24_and_shows_every_tier(start_daemon) -> None:
    d = start_daemon(disk_bytes="64MiB")
    c = workload(d.socket)
    try:
        held = c.get("top/2")
        rc, screen = in_pty(tierctl(d.socket, "top", "--once"))
        status = c.stats()
    finally:
        del held
        c.close()
    assert rc == 0, screen
    lines = screen.rstrip("\n").split("\n")
    assert len(lines) <= 24, screen
    assert max(len(line) for line in lines) <= 80, screen
    for t in status["tiers"]:  # every tier, as a bar with its numbers
        row = next((line for line in lines if line.startswith(t["name"] + " ")), None)
        assert row is not None, f"no row for tier {t['name']}:\n{screen}"
        assert "#" in row or "-" in row, row
        assert row.split()[-1] == str(t["entries"]), row
    assert "RAM hits" in screen and "promote" in screen and "demote" in screen
    assert "BUSIEST CLIENTS" in screen and "HOTTEST ENTRIES" in screen
    hot = [line.split() for line in lines[lines.index(next(x for x in lines if "HOTTEST" in x)) + 1 :]]
    assert hot[0][:2] == ["top/1", "5"], screen  # the most read key first, with its gets


def test_top_live_refreshes_and_q_quits(start_daemon) -> None:
    d = start_daemon(disk_bytes="64MiB")
    c = workload(d.socket)
    try:
        rc, screen = in_pty(tierctl(d.socket, "top"), keys=b"q", until=b"q quits", timeout=30)
    finally:
        c.close()
    assert rc == 0, screen
    assert "ram " in screen and "disk " in screen and "q quits" in screen


def test_top_with_no_daemon_is_one_line(short_tmp: Path) -> None:
    r = subprocess.run(tierctl(short_tmp / "none.sock", "top", "--once"), capture_output=True, text=True,
                       timeout=30)  # fmt: skip
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "no tierd at" in r.stderr
