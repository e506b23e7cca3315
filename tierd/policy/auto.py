"""``auto``: every candidate policy keeps its own order of the real copies, and one shadow cache
per candidate (:mod:`tierd.policy.shadow`) replays the live references at the tier's capacity;
the copies are demoted in the order of the one whose shadow has the lowest recent byte miss ratio.

Hysteresis: LRU until evidence; another policy is followed only when its byte miss ratio is lower
than the followed one's by ``margin`` (absolute) or 3% of the followed one's, whichever is larger,
so two equal ones do not flap. The comparison is paired: over the gets both shadows have a score
for (the last ``window`` gets, or fewer since a candidate's window restarted), and only once those
are evidence (``min_gets`` gets and at least the capacity in bytes requested). So a switch to the
learned candidate needs evidence on its own model, and lru and s3fifo are compared without
waiting on it.

The shadows run on one thread of their own, fed in batches (the loop only appends a tuple per
reference); when that thread lags by ``MAX_PENDING`` references the oldest are dropped and
counted. The learned candidate's model is trained like the plain ``learned`` policy's and
installed in both its live order and its shadow; that shadow's window starts again then (it is
scored on its new model only, against the others over the same gets).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from tierd.policy.base import Item, Policy, make_policy, register
from tierd.policy.shadow import Shadow

T = TypeVar("T", bound=Item)
CANDIDATES = ("lru", "s3fifo", "learned")
BATCH = 256
MAX_PENDING = 65536


@register("auto")
class Auto(Policy[T]):
    name = "auto"

    def __init__(
        self,
        capacity: int = 0,
        *,
        candidates: tuple[str, ...] = CANDIDATES,
        sync: bool = False,
        min_gets: int = 1000,
        margin: float = 0.01,
        window: int = 8192,
        options: dict[str, dict[str, Any]] | None = None,
        **_: Any,
    ) -> None:
        if not candidates or "auto" in candidates or "lru" not in candidates:
            raise ValueError(f"auto: candidates must include lru and not auto, got {candidates!r}")
        opts = options or {}
        self.capacity = capacity
        self.live: dict[str, Policy[T]] = {
            n: make_policy(n, capacity=capacity, **opts.get(n, {})) for n in candidates
        }
        self.shadows = {
            n: Shadow(make_policy(n, capacity=capacity, **opts.get(n, {})), capacity, window)
            for n in candidates
        }
        self.using = "lru"
        self.switches = 0
        self.min_gets = min_gets
        self.margin = margin
        self.dropped = 0
        self._items: dict[int, T] = {}
        self._sync = sync
        self._pending: list[tuple[str, int, list[str], int, str]] = []
        self._lock = threading.Lock()  # guards the shadows: the worker thread vs stats()
        self._busy = False
        self._pool: ThreadPoolExecutor | None = None

    # ---- hooks: every live order, then the shadows ------------------------------------------------
    def on_put(self, version: int, item: T, new: bool = False) -> None:
        self._items[version] = item
        for p in self.live.values():
            p.on_put(version, item, new)
        if new:
            self._shadow_ref(item, "put")

    def on_hit(self, version: int) -> None:
        for p in self.live.values():
            p.on_hit(version)
        item = self._items.get(version)
        if item is not None:
            self._shadow_ref(item, "get")

    def on_remove(self, version: int) -> None:
        self._items.pop(version, None)
        for p in self.live.values():
            p.on_remove(version)

    def candidates(self) -> Iterator[T]:
        return self.live[self.using].candidates()

    def __len__(self) -> int:
        return len(self._items)

    # ---- shadows -------------------------------------------------------------------------------
    def _shadow_ref(self, item: T, op: str) -> None:
        ref = (item.key, item.nbytes, list(item.tags), item.uid, op)
        if self._sync:
            self._advance([ref])
            return
        self._pending.append(ref)
        if len(self._pending) > MAX_PENDING:
            drop = len(self._pending) - MAX_PENDING // 2
            del self._pending[:drop]
            self.dropped += drop
        if len(self._pending) >= BATCH and not self._busy:
            batch, self._pending = self._pending, []
            self._busy = True
            if self._pool is None:
                self._pool = ThreadPoolExecutor(1, thread_name_prefix="tierd-evict-shadow")
            self._pool.submit(self._advance, batch).add_done_callback(self._idle)

    def _idle(self, _f: Any) -> None:
        self._busy = False

    def _advance(self, batch: list[tuple[str, int, list[str], int, str]]) -> None:
        with self._lock:
            for sh in self.shadows.values():
                for key, nbytes, tags, owner, op in batch:
                    sh.ref(key, nbytes, tags, owner, op)
            self._choose()

    def scores(self) -> dict[str, float | None]:
        return {n: sh.recent_byte_miss_ratio() for n, sh in self.shadows.items()}

    def _choose(self) -> None:
        lead = self.shadows[self.using]
        if lead.gets < self.min_gets:
            return
        # Paired: each other candidate is compared with the one followed over the gets both have
        # a score for (the learned one's since its model was installed; lru's and s3fifo's over
        # the whole window), once those are evidence enough: min_gets gets, the capacity in bytes.
        best, best_gain = None, 0.0
        for name, sh in self.shadows.items():
            if name == self.using:
                continue
            k = min(sh.recent_gets, lead.recent_gets)
            if k < self.min_gets:
                continue
            req, miss = sh.recent(k)
            lreq, lmiss = lead.recent(k)
            if lreq < self.capacity or not req:
                continue
            cur, r = lmiss / lreq, miss / req
            gain = cur - r
            if gain > max(self.margin, 0.03 * cur) and gain > best_gain:
                best, best_gain = name, gain
        if best is not None:
            self.using = best
            self.switches += 1

    # ---- training: the learned candidate's -----------------------------------------------------
    def training_job(self) -> tuple[Callable[..., Any], tuple[Any, ...]] | None:
        learned = self.live.get("learned")
        return learned.training_job() if learned is not None else None

    def install(self, model: Any) -> None:
        if "learned" in self.live:
            self.live["learned"].install(model)
            with self._lock:
                shadow = self.shadows["learned"]
                shadow.policy.install(model)
                shadow.reset_window()  # scored from its new model on

    def stats(self) -> dict[str, Any]:
        with self._lock:
            scores = {
                n: {
                    "byte_miss_ratio": None if (r := sh.recent_byte_miss_ratio()) is None else round(r, 4),
                    "gets": sh.recent_gets,
                }
                for n, sh in self.shadows.items()
            }
        return {
            "name": self.name,
            "entries": len(self),
            "using": self.using,
            "switches": self.switches,
            "scores": scores,
            "dropped_refs": self.dropped,
            "candidates": {n: p.stats() for n, p in self.live.items()},
        }

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
