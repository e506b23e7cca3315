"""The chaos suite's budget knobs, its shared daemon and the figures it prints at the end.

Run by ``make chaos`` (or ``pytest -m chaos tests/chaos``); the default test run leaves it out
(``-m "not chaos"`` in pytest's addopts). Budget, from the environment:

- ``CHAOS_EXAMPLES``: hypothesis examples per message type (each one connection and 1-6 frames)
- ``CHAOS_KILLS``: kill -9s of the daemon in the durable-writer loop
- ``CHAOS_HOSTILE_SECONDS``: how long the hostile clients keep at it

Every test adds what it did to :data:`tests.chaos.budget.FIGURES`; they are printed after the run
(and written as JSON to ``$CHAOS_REPORT`` when set), so a run's size and outcome can be quoted.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.chaos.budget import FIGURES, NOTES
from tierd import launch


def pytest_terminal_summary(terminalreporter) -> None:
    if not FIGURES and not NOTES:
        return
    terminalreporter.section("chaos figures")
    for name, value in sorted(FIGURES.items()):
        terminalreporter.write_line(f"{name:>44}: {value:,}")
    for name, text in sorted(NOTES.items()):
        terminalreporter.write_line(f"{name:>44}: {text}")
    out = os.environ.get("CHAOS_REPORT")
    if out:
        Path(out).write_text(json.dumps({"figures": dict(FIGURES), "notes": NOTES}, indent=1) + "\n")


@pytest.fixture(scope="module")
def chaos_tmp() -> Iterator[Path]:
    """A short directory for one module's daemons (AF_UNIX paths are limited to 107 bytes)."""
    with tempfile.TemporaryDirectory(prefix="tierd-c-", dir="/tmp") as d:
        yield Path(d)


def start(tmp: Path, *args: str, ram_bytes: str = "64MiB", disk_bytes: str = "256MiB") -> launch.Daemon:
    """A tierd on ``tmp``'s socket and state dir (the same each time: a second start is a restart)."""
    return launch.start(
        tmp / "tierd.sock", "--state-dir", str(tmp / "state"), "--disk-bytes", disk_bytes, *args,
        ram_bytes=ram_bytes, log_path=tmp / "tierd.log",
    )  # fmt: skip
