"""The access log: what the predictors learn from, what `tierctl trace` saves, what replay reads.

``Access`` is one request as the daemon saw it. ``AccessLog`` is a bounded ring of them (O(1)
append, the oldest dropped first). A trace file is JSON lines: a header ``{"tierd_trace": 1}``
then one object per access; ``to_row``/``from_row`` are the compact list form used on the wire.

Times are seconds, monotonic in the daemon or relative to the start in a trace; the log assumes
they do not go backwards (``since`` bisects on them).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

OPS = ("get", "hint", "put")
TIERS = ("ram", "disk", "gpu", "-")
TRACE_VERSION = 1


@dataclass(slots=True)
class Access:
    t: float
    """Seconds (monotonic in the daemon, relative to the first access in a trace)."""
    client: int
    key: str
    op: str
    """"get" | "hint" | "put"."""
    tier: str
    """Where a get was served from: "ram" | "disk" ("gpu" later); "-" for other ops."""
    nbytes: int
    tags: tuple[str, ...] = ()


class AccessLog:
    """A ring of the last ``capacity`` accesses (the oldest are dropped first)."""

    __slots__ = ("_buf", "_capacity", "_start", "_total")

    def __init__(self, capacity: int = 65536) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self._capacity = capacity
        self._buf: list[Access] = []
        self._start = 0  # index in _buf of the oldest access once the ring is full
        self._total = 0

    @property
    def capacity(self) -> int:
        return self._capacity

    @property
    def total(self) -> int:
        """How many accesses were ever appended (including those dropped since)."""
        return self._total

    def __len__(self) -> int:
        return len(self._buf)

    def append(self, a: Access) -> None:
        if len(self._buf) < self._capacity:
            self._buf.append(a)
        else:
            self._buf[self._start] = a
            self._start = (self._start + 1) % self._capacity
        self._total += 1

    def _at(self, i: int) -> Access:
        """The i-th access, oldest first (0 <= i < len)."""
        return self._buf[(self._start + i) % len(self._buf)]

    def __iter__(self) -> Iterator[Access]:
        return iter(self.snapshot())

    def snapshot(self) -> list[Access]:
        """Every access held, oldest first (a new list; the Access objects are shared)."""
        return self._buf[self._start :] + self._buf[: self._start]

    def since(self, t: float) -> list[Access]:
        """The accesses with a time strictly after t, oldest first."""
        lo, hi = 0, len(self._buf)
        while lo < hi:  # first index with .t > t
            mid = (lo + hi) // 2
            if self._at(mid).t <= t:
                lo = mid + 1
            else:
                hi = mid
        return [self._at(i) for i in range(lo, len(self._buf))]

    def recent_hit_rate(self, n: int = 1000) -> float | None:
        """Share of the last n gets (at most) that were served from RAM; None when there was none."""
        gets = hits = 0
        for i in range(len(self._buf) - 1, -1, -1):
            a = self._at(i)
            if a.op != "get":
                continue
            gets += 1
            hits += a.tier == "ram"
            if gets >= n:
                break
        return hits / gets if gets else None

    def clear(self) -> None:
        self._buf.clear()
        self._start = 0


# -- wire rows --------------------------------------------------------------------------------------


def to_row(a: Access) -> list[Any]:
    """[t, client, key, op, tier, nbytes, [tags...]]"""
    return [a.t, a.client, a.key, a.op, a.tier, a.nbytes, list(a.tags)]


def from_row(row: Any) -> Access:
    """The inverse of to_row; ValueError when the row is not one (tags may be left out)."""
    if not isinstance(row, list | tuple) or len(row) not in (6, 7):
        raise ValueError(f"an access row is a list of 6 or 7 items, got {_short(row)}")
    t, client, key, op, tier, nbytes = row[:6]
    tags = row[6] if len(row) == 7 else ()
    return _checked(t, client, key, op, tier, nbytes, tags)


def _checked(t: Any, client: Any, key: Any, op: Any, tier: Any, nbytes: Any, tags: Any) -> Access:
    if isinstance(t, bool) or not isinstance(t, int | float):
        raise ValueError(f"t must be a number, got {_short(t)}")
    if isinstance(client, bool) or not isinstance(client, int):
        raise ValueError(f"client must be an integer, got {_short(client)}")
    if not isinstance(key, str) or not key:
        raise ValueError(f"key must be a non-empty string, got {_short(key)}")
    if op not in OPS:
        raise ValueError(f"op must be one of {', '.join(OPS)}, got {_short(op)}")
    if tier not in TIERS:
        raise ValueError(f"tier must be one of {', '.join(TIERS)}, got {_short(tier)}")
    if isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes < 0:
        raise ValueError(f"nbytes must be an integer >= 0, got {_short(nbytes)}")
    if not isinstance(tags, list | tuple) or not all(isinstance(x, str) for x in tags):
        raise ValueError(f"tags must be a list of strings, got {_short(tags)}")
    return Access(float(t), client, key, op, tier, nbytes, tuple(tags))


def _short(v: Any) -> str:
    s = repr(v)
    return s if len(s) <= 60 else s[:57] + "..."


# -- trace files ------------------------------------------------------------------------------------


def _to_obj(a: Access) -> dict[str, Any]:
    d: dict[str, Any] = {"t": round(a.t, 9), "client": a.client, "key": a.key, "op": a.op}
    d["tier"] = a.tier
    d["nbytes"] = a.nbytes
    if a.tags:
        d["tags"] = list(a.tags)
    return d


def write_trace(path: str | os.PathLike[str], accesses: Iterable[Access], append: bool = False) -> int:
    """Write accesses as JSON lines (a header line first, unless appending to a non-empty file).

    Returns how many accesses were written.
    """
    n = 0
    need_header = not append or not os.path.exists(path) or os.path.getsize(path) == 0
    with open(path, "a" if append else "w", encoding="utf-8") as f:
        if need_header:
            f.write(json.dumps({"tierd_trace": TRACE_VERSION}) + "\n")
        for a in accesses:
            f.write(json.dumps(_to_obj(a), separators=(",", ":")) + "\n")
            n += 1
    return n


def read_trace(path: str | os.PathLike[str]) -> list[Access]:
    """Read a trace file; ValueError naming the file and line number on the first bad line."""
    out: list[Access] = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: line {lineno}: not JSON ({e.msg})") from None
            if lineno == 1:
                if not isinstance(obj, dict) or "tierd_trace" not in obj:
                    raise ValueError(f'{path}: line 1: not a tierd trace (no {{"tierd_trace": 1}} header)')
                if obj["tierd_trace"] != TRACE_VERSION:
                    got = obj["tierd_trace"]
                    raise ValueError(
                        f"{path}: line 1: trace version {got!r}, this tierd reads {TRACE_VERSION}"
                    )
                continue
            if not isinstance(obj, dict):
                raise ValueError(f"{path}: line {lineno}: an access is a JSON object, got {_short(obj)}")
            if "tierd_trace" in obj:
                continue  # a header from a later appending writer
            try:
                missing = [k for k in ("t", "client", "key", "op") if k not in obj]
                if missing:
                    raise ValueError(f"missing {', '.join(missing)}")
                a = _checked(
                    obj["t"], obj["client"], obj["key"], obj["op"], obj.get("tier", "-"),
                    obj.get("nbytes", 0), obj.get("tags", ()),
                )  # fmt: skip
            except ValueError as e:
                raise ValueError(f"{path}: line {lineno}: {e}") from None
            out.append(a)
    if not out and not _has_header(path):
        raise ValueError(f"{path}: line 1: empty file, not a tierd trace")
    return out


def _has_header(path: str | os.PathLike[str]) -> bool:
    with open(path, encoding="utf-8") as f:
        return bool(f.readline().strip())
