"""The daemon's log lines fit the journal when systemd says stderr is the journal stream.

systemd sets ``JOURNAL_STREAM=DEV:INODE`` to the device and inode of the stream it connected to
stderr; the daemon then writes ``<N>logger: message`` (a syslog priority, no timestamp of its own).
With the variable naming some other file (inherited through a shell redirect) or absent, it keeps
its terminal format. Checked on a real daemon whose stderr is a file standing in for the stream.
"""

from __future__ import annotations

import io
import logging
import os
import re
from pathlib import Path

from tierd import launch, logs

TERMINAL_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR) [\w.]+: ")
JOURNAL_LINE = re.compile(r"^<[2-7]>[\w.]+: ")


def run_daemon(tmp: Path, journal_stream: str | None) -> str:
    """Start a daemon with stderr into ``tmp/tierd.log`` and JOURNAL_STREAM as given, stop it; its log.

    ``journal_stream="match"`` names the log file's own device and inode."""
    log = tmp / "tierd.log"
    log.touch()
    env = dict(os.environ)
    env.pop("JOURNAL_STREAM", None)
    if journal_stream == "match":
        st = log.stat()
        env["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}"
    elif journal_stream is not None:
        env["JOURNAL_STREAM"] = journal_stream
    d = launch.start(tmp / "tierd.sock", "--state-dir", str(tmp / "state"), "--disk-bytes", "0",
                     ram_bytes="16MiB", env=env, log_path=log)  # fmt: skip
    assert d.stop() == 0, d.log()
    return log.read_text()


def test_journal_stream_gets_priorities_and_no_timestamps(short_tmp: Path) -> None:
    text = run_daemon(short_tmp, "match")
    lines = text.splitlines()
    assert lines, text
    assert all(JOURNAL_LINE.match(line) for line in lines), text
    assert any(line.startswith("<6>tierd: tierd ") and " ready " in line for line in lines), text
    assert not any(re.search(r"\d\d:\d\d:\d\d", line) for line in lines), text


def test_a_journal_stream_that_is_not_stderr_keeps_the_terminal_format(short_tmp: Path) -> None:
    st = os.stat("/")  # an inherited JOURNAL_STREAM naming another file: stderr was redirected
    for value in (f"{st.st_dev}:{st.st_ino}", "garbage", None):
        text = run_daemon(short_tmp, value)
        lines = text.splitlines()
        assert lines and all(TERMINAL_LINE.match(line) for line in lines[-3:]), (value, text)
        (short_tmp / "tierd.log").unlink()


def test_priorities_follow_levels_on_every_line() -> None:
    assert [logs.syslog_priority(lv) for lv in (10, 20, 30, 40, 50)] == [7, 6, 4, 3, 2]
    record = logging.LogRecord("tierd.x", logging.WARNING, __file__, 1, "two\nlines", None, None)
    assert logs.JournalFormatter().format(record) == "<4>tierd.x: two\n<4>lines"
    # a stream with no file descriptor is never the journal
    assert not logs.is_journal_stream(io.StringIO(), {"JOURNAL_STREAM": "1:2"})
