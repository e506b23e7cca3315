"""Shared fixtures: a real tierd subprocess per test (or per module), ready when it says READY=1."""

from __future__ import annotations

import os
import random
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tierd import launch


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
