"""Where the daemon's log lines go, and in what shape: a terminal's, or the systemd journal's.

Under systemd, stderr is a stream into the journal, which stamps every line with its own time and
reads a syslog priority from a ``<N>`` prefix (sd-daemon(3)). systemd says so by setting
``JOURNAL_STREAM=DEV:INODE`` to the stream's device and inode; a child that inherits the variable
but whose stderr goes elsewhere (a shell redirect, a pipe) sees a different pair, and keeps the
terminal format. So:

- stderr is the journal stream: ``<6>tierd: message`` (no time of our own; each line of a multi-line
  message, a traceback, carries the prefix so the journal gives it the record's priority);
- otherwise: ``2026-12-01 18:43:05,123 INFO tierd: message``.

Python's levels map onto syslog's: DEBUG 7 (debug), INFO 6 (info), WARNING 4 (warning), ERROR 3
(err), CRITICAL 2 (crit).
"""

from __future__ import annotations

import logging
import os
import sys
from typing import TextIO

TERMINAL_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
JOURNAL_FORMAT = "%(name)s: %(message)s"


def syslog_priority(levelno: int) -> int:
    """The syslog priority of a Python log level (a level between two takes the lower one's)."""
    if levelno >= logging.CRITICAL:
        return 2
    if levelno >= logging.ERROR:
        return 3
    if levelno >= logging.WARNING:
        return 4
    if levelno >= logging.INFO:
        return 6
    return 7


class JournalFormatter(logging.Formatter):
    """``<N>name: message``, the prefix repeated on every line of the record."""

    def __init__(self) -> None:
        super().__init__(JOURNAL_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{syslog_priority(record.levelno)}>"
        return "\n".join(prefix + line for line in super().format(record).split("\n"))


def is_journal_stream(stream: TextIO, environ: dict[str, str] | None = None) -> bool:
    """Whether ``stream`` is the journal stream systemd named in ``$JOURNAL_STREAM``."""
    value = (os.environ if environ is None else environ).get("JOURNAL_STREAM", "")
    dev, sep, ino = value.partition(":")
    if not sep or not dev.isdigit() or not ino.isdigit():
        return False
    try:
        st = os.fstat(stream.fileno())
    except (OSError, ValueError):  # closed, or not a real file (a test's StringIO)
        return False
    return (st.st_dev, st.st_ino) == (int(dev), int(ino))


def setup(level: str, stream: TextIO | None = None) -> bool:
    """Send the daemon's logs to ``stream`` (stderr) at ``level``; returns whether in journal format."""
    stream = sys.stderr if stream is None else stream
    journal = is_journal_stream(stream)
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JournalFormatter() if journal else logging.Formatter(TERMINAL_FORMAT))
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    set_level(level)
    return journal


def set_level(level: str) -> None:
    """Change the log level (at start, and on a reload)."""
    logging.getLogger().setLevel(level.upper())
