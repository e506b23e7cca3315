"""``sequence``: a successor table, the strong simple baseline.

For each key, counts of the key that the same client read right after it (transitions are taken
within each client's own stream of gets, so two processes reading at once do not garble each
other; the table is shared, so two processes running the same model teach each other). Only gets
make transitions: put order (e.g. a checkpoint's ingestion order) says nothing about read order.

``predict`` walks the table best-first from the key just read: the successors of the key, then
their successors (the 2-step, 3-step... look-ahead that gives a prefetch lead time), each with a
confidence = product of count shares along the path, times a calibration factor. The factor is
the measured precision of the top successor over its claimed share, per support bucket (rows seen
once, 2-3 times, 4-7, ...), starting at 1: a cycle seen once predicts its next key with
confidence 1, while on random keys (where every row seen once claims 100%) it falls to ~0 after a
few misses, so a confidence threshold stops the waste.

Memory is bounded: at most ``max_rows`` rows (the least recently used eighth is dropped when
full), ``max_successors`` per row (the rarest is replaced), and counts are halved when a row's
total passes ``halve_at`` so that the table follows a changing workload.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict
from typing import Any

from tierd.predict.base import Predictor, register
from tierd.predict.log import Access

N_BUCKETS = 5


def _bucket(total: float) -> int:
    """Support bucket of a row: seen once, 2-3, 4-7, 8-15, 16+ times."""
    if total < 2:
        return 0
    if total < 4:
        return 1
    if total < 8:
        return 2
    if total < 16:
        return 3
    return 4


class Row:
    """Counts of what followed one key."""

    __slots__ = ("succ", "total", "used")

    def __init__(self, used: int) -> None:
        self.succ: dict[str, float] = {}
        self.total = 0.0
        self.used = used

    def add(self, key: str, max_successors: int, halve_at: float) -> None:
        succ = self.succ
        if key in succ:
            succ[key] += 1.0
        else:
            if len(succ) >= max_successors:
                rare = min(succ, key=succ.__getitem__)
                self.total -= succ.pop(rare)
            succ[key] = 1.0
        self.total += 1.0
        if self.total > halve_at:
            for k in list(succ):
                v = succ[k] * 0.5
                if v < 0.5:
                    del succ[k]
                else:
                    succ[k] = v
            self.total = sum(succ.values())

    def top(self) -> tuple[str | None, float]:
        if not self.succ or self.total <= 0:
            return None, 0.0
        k = max(self.succ, key=self.succ.__getitem__)
        return k, self.succ[k] / self.total


class RowTable:
    """key -> Row, bounded: when full, the least recently used eighth of the rows is dropped."""

    __slots__ = ("halve_at", "max_rows", "max_successors", "rows", "tick")

    def __init__(self, max_rows: int, max_successors: int, halve_at: float) -> None:
        self.rows: dict[str, Row] = {}
        self.max_rows = max_rows
        self.max_successors = max_successors
        self.halve_at = halve_at
        self.tick = 0

    def get(self, key: str) -> Row | None:
        return self.rows.get(key)

    def add(self, key: str, succ: str) -> Row:
        self.tick += 1
        row = self.rows.get(key)
        if row is None:
            if len(self.rows) >= self.max_rows:
                self._shrink()
            row = self.rows[key] = Row(self.tick)
        row.used = self.tick
        row.add(succ, self.max_successors, self.halve_at)
        return row

    def _shrink(self) -> None:
        drop = max(1, len(self.rows) // 8)
        for k, _ in heapq.nsmallest(drop, self.rows.items(), key=lambda kv: kv[1].used):
            del self.rows[k]

    def __len__(self) -> int:
        return len(self.rows)

    def transitions(self) -> int:
        return sum(len(r.succ) for r in self.rows.values())


@register
class SequencePredictor(Predictor):
    name = "sequence"

    def __init__(
        self,
        *,
        max_rows: int = 65536,
        max_successors: int = 8,
        halve_at: float = 256.0,
        max_clients: int = 4096,
        max_steps: int = 8,
        min_path_confidence: float = 0.01,
    ) -> None:
        self._table = RowTable(max_rows, max_successors, halve_at)
        self._last: OrderedDict[int, str] = OrderedDict()  # client -> its last get
        self._max_clients = max_clients
        self._max_steps = max_steps
        self._min_conf = min_path_confidence
        self._cal_hits = [0.0] * N_BUCKETS
        self._cal_claimed = [0.0] * N_BUCKETS
        self._gets = 0

    # -- learning ------------------------------------------------------------------------------
    def observe(self, a: Access) -> None:
        if a.op != "get":
            return
        self._gets += 1
        last = self._last
        prev = last.get(a.client)
        if prev is not None and prev != a.key:
            row = self._table.get(prev)
            if row is not None:  # score the prediction this row would have made
                top, share = row.top()
                b = _bucket(row.total)
                self._cal_claimed[b] += share
                self._cal_hits[b] += top == a.key
                if self._cal_claimed[b] > 4096:
                    self._cal_claimed[b] *= 0.5
                    self._cal_hits[b] *= 0.5
            self._table.add(prev, a.key)
        last[a.client] = a.key
        last.move_to_end(a.client)
        if len(last) > self._max_clients:
            last.popitem(last=False)

    def calibration(self, total: float) -> float:
        b = _bucket(total)
        return min(1.0, (self._cal_hits[b] + 1.0) / (self._cal_claimed[b] + 1.0))

    # -- predicting ----------------------------------------------------------------------------
    def predict(self, a: Access, k: int) -> list[tuple[str, float]]:
        if k <= 0:
            return []
        rows = self._table.rows
        out: list[tuple[str, float]] = []
        seen = {a.key}
        # best-first over paths from a.key: (-confidence, step, tie, key)
        heap: list[tuple[float, int, int, str]] = [(-1.0, 0, 0, a.key)]
        tie = 0
        while heap and len(out) < k:
            negc, step, _, key = heapq.heappop(heap)
            conf = -negc
            if step > 0:
                if key in seen:
                    continue
                seen.add(key)
                out.append((key, conf))
            if step >= self._max_steps:
                continue
            row = rows.get(key)
            if row is None or row.total <= 0:
                continue
            f = conf * self.calibration(row.total) / row.total
            for nxt, c in row.succ.items():
                pc = f * c
                if pc >= self._min_conf and nxt not in seen:
                    tie += 1
                    heapq.heappush(heap, (-pc, step + 1, tie, nxt))
        return out

    def stats(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "rows": len(self._table),
            "transitions": self._table.transitions(),
            "gets_seen": self._gets,
            "clients": len(self._last),
            "calibration": [
                round(min(1.0, (h + 1.0) / (c + 1.0)), 3)
                for h, c in zip(self._cal_hits, self._cal_claimed, strict=True)
            ],
        }
