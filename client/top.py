"""``tierctl top``: a live view of a running tierd, drawn with rich, that fits an 80x24 terminal.

One frame, top to bottom: the daemon line; each tier as a bar (``#`` used, ``-`` free below the
RAM tier's ceiling, ``x`` above it, up to the capacity) with its numbers; the traffic line (gets per
second, RAM hit rate, promotion and demotion bandwidth, store reads/writes per second); the busiest
clients (most requests in the window) and the hottest entries (most gets in the window).

Rates are over the last refresh (about 1 s); ``--once`` takes two snapshots ``ONCE_WINDOW`` seconds
apart and prints one frame with the rates over that window (for scripts and for the README). The
hottest entries come from the daemon's access log (``trace``), over the last ``HOT_WINDOW`` seconds.
``q`` (or Ctrl-C) quits; the keyboard is read in cbreak mode only while the view runs.
"""

from __future__ import annotations

import collections
import contextlib
import os
import select
import sys
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from rich.console import Console, Group, RenderableType
from rich.table import Table
from rich.text import Text

if TYPE_CHECKING:
    from tierd_client import Client

#: seconds between two frames
REFRESH = 1.0
#: seconds --once waits between its two snapshots (the rates' window)
ONCE_WINDOW = 0.5
#: seconds of the access log the hottest entries are counted over
HOT_WINDOW = 30.0
#: rows of the client and entry tables (the frame must fit 24 lines with 4 tiers)
ROWS = 5
#: bar width, in characters
BAR = 22


def _b(n: float) -> str:
    for unit in ("B", "K", "M", "G", "T"):
        if abs(n) < 1024 or unit == "T":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024
    return f"{n:.1f}T"


@dataclass
class Sample:
    """One status snapshot and when it was taken (monotonic seconds)."""

    status: dict[str, Any]
    t: float


@dataclass
class Heat:
    """Gets per key over the last HOT_WINDOW seconds, from the daemon's access log."""

    since: float = -1.0
    rows: collections.deque[tuple[float, str, int]] = field(default_factory=collections.deque)

    def update(self, c: Client) -> None:
        if self.since < 0:  # start HOT_WINDOW seconds back on the log's clock
            self.since = c.trace(limit=0)["now"] - HOT_WINDOW
        got = c.trace(self.since, limit=20_000)
        for t, _client, key, op, _tier, nbytes, *_ in got["accesses"]:
            if op == "get":
                self.rows.append((t, key, nbytes))
            self.since = max(self.since, t)
        while self.rows and self.rows[0][0] < got["now"] - HOT_WINDOW:
            self.rows.popleft()

    def hottest(self, n: int) -> list[tuple[str, int, int]]:
        """(key, gets, bytes) of the ``n`` keys read most often."""
        counts: collections.Counter[str] = collections.Counter()
        size: dict[str, int] = {}
        for _, key, nbytes in self.rows:
            counts[key] += 1
            size[key] = nbytes
        return [(k, v, size[k]) for k, v in counts.most_common(n)]


def _bar(t: dict[str, Any], ceiling: int | None) -> Text:
    cap = t["capacity_bytes"] or 1
    used = min(BAR, round(BAR * t["used_bytes"] / cap))
    ceil = BAR if ceiling is None else max(used, min(BAR, round(BAR * ceiling / cap)))
    bar = Text()
    bar.append("#" * used, style="bold green" if ceil == BAR else "bold yellow")
    bar.append("-" * (ceil - used), style="dim")
    bar.append("x" * (BAR - ceil), style="red")
    return bar


def _table(*columns: str) -> Table:
    """A borderless table; a column named with a leading ">" is right-aligned."""
    t = Table(box=None, pad_edge=False, show_edge=False)
    for i, name in enumerate(columns):
        right = name.startswith(">")
        t.add_column(name.lstrip(">"), justify="right" if right else "left", no_wrap=True,
                     overflow="ellipsis", max_width=None if i else 44)  # fmt: skip
    return t


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.0%}"


def frame(now: Sample, before: Sample | None, heat: Heat, me: int = 0, live: bool = True) -> Group:
    """One frame of the view, from two snapshots (rates over the time between them)."""
    s = now.status
    d = s.get("daemon", {})
    c = s["counters"]
    level = (s.get("pressure") or {}).get("level", "-")
    head = Text.assemble(
        ("tierd ", "bold"), f"{d.get('version', '?')} pid {d.get('pid', '?')} ",
        f"up {d.get('uptime_s', 0):.0f}s  clients {s['clients']}  leases {s['leases']}  pressure ",
        (level, "bold red" if level in ("high", "critical") else "bold"),
    )  # fmt: skip
    tiers = _table("TIER", "USE", ">USED", ">CEILING", ">CAP", ">ENTRIES")
    for t in s["tiers"]:
        ceil = (s.get("placement") or {}).get("ram_ceiling_bytes") if t["name"] == "ram" else None
        tiers.add_row(t["name"], _bar(t, ceil), _b(t["used_bytes"]), "-" if ceil is None else _b(ceil),
                      _b(t["capacity_bytes"]), str(t["entries"]))  # fmt: skip
    dt = (now.t - before.t) if before is not None else 0.0
    old = before.status if before is not None and dt > 0 else None

    def rate(name: str) -> float:
        return (c.get(name, 0) - old["counters"].get(name, 0)) / dt if old else 0.0

    def store_rate(key: str) -> float:
        if not old:
            return 0.0
        was = {t["name"]: t.get(key, 0) for t in old["tiers"]}
        return sum(t[key] - was.get(t["name"], 0) for t in s["tiers"] if key in t) / dt

    gets = rate("gets")
    traffic = Text.assemble(
        ("gets ", "bold"), f"{gets:.0f}/s  ", ("RAM hits ", "bold"),
        f"{_pct(rate('hits_ram') / gets if gets else None)} now, ",
        f"{_pct(c['hits_ram'] / c['gets'] if c.get('gets') else None)} all  ",
        ("promote ", "bold"), f"{_b(rate('promoted_bytes'))}/s  ",
        ("demote ", "bold"), f"{_b(rate('demoted_bytes'))}/s\n",
        ("disk ", "bold"), f"read {_b(store_rate('read_bytes'))}/s ",
        f"write {_b(store_rate('write_bytes'))}/s  ", ("prefetch ", "bold"),
        f"{c.get('prefetch_used', 0)}/{c.get('prefetch_issued', 0)} used, ",
        f"stall {c.get('stall_us', 0) / 1e6:.1f}s",
    )  # fmt: skip
    clients = _table("BUSIEST CLIENTS", ">PID", ">REQ/S", ">LEASES", ">LEASED", ">PUT")
    was_req = {k["id"]: k["requests"] for k in old.get("client_list", [])} if old else {}

    def req_rate(k: dict[str, Any]) -> float:
        return (k["requests"] - was_req.get(k["id"], k["requests"])) / dt if dt > 0 else 0.0

    busy = sorted(s.get("client_list", []), key=lambda k: (req_rate(k), k["leased_bytes"]), reverse=True)
    for k in busy[:ROWS]:
        name = (k["name"] or "-") + (" (this top)" if k["id"] == me else "")
        clients.add_row(name, str(k["pid"]), f"{req_rate(k):.0f}", str(k["leases"]),
                        _b(k["leased_bytes"]), _b(k["put_bytes"]))  # fmt: skip
    hot = _table(f"HOTTEST ENTRIES (gets in the last {HOT_WINDOW:.0f}s)", ">GETS", ">SIZE")
    for key, n, nbytes in heat.hottest(ROWS):
        hot.add_row(key, str(n), _b(nbytes))
    parts: list[RenderableType] = [head, tiers, traffic, clients, hot]
    return Group(*parts, Text("q quits", style="dim")) if live else Group(*parts)


def run_top(c: Client, *, once: bool, console: Console | None = None) -> int:
    console = console or Console(highlight=False)
    heat = Heat()
    before = Sample(c.stats(), time.monotonic())
    if once:
        time.sleep(ONCE_WINDOW)
        heat.update(c)
        console.print(frame(Sample(c.stats(), time.monotonic()), before, heat, me=c.client_id, live=False))
        return 0
    from rich.live import Live

    with _keys() as key, Live(console=console, screen=True, auto_refresh=False) as live:
        while True:
            heat.update(c)
            now = Sample(c.stats(), time.monotonic())
            live.update(frame(now, before, heat, me=c.client_id), refresh=True)
            before = now
            if key(REFRESH) in ("q", "Q"):
                return 0


@contextlib.contextmanager
def _keys():
    """A function waiting up to N seconds for one key press (cbreak mode while inside)."""
    fd = sys.stdin.fileno() if sys.stdin is not None and sys.stdin.isatty() else None
    if fd is None:  # not a terminal: refresh until interrupted

        def wait(timeout: float) -> str:
            time.sleep(timeout)
            return ""

        yield wait
        return
    import termios
    import tty

    old = termios.tcgetattr(fd)
    tty.setcbreak(fd)

    def read(timeout: float) -> str:
        ready, _, _ = select.select([fd], [], [], timeout)
        return os.read(fd, 1).decode(errors="replace") if ready else ""

    try:
        yield read
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, old)
