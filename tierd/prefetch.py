"""The prefetcher: reads the access stream, asks a predictor what comes next, promotes it early.

Where each piece runs, so that a slow or broken predictor can never delay serving::

    event loop                               predictor thread (one)          trainer (io pool)
    ----------                               ----------------------          -----------------
    get/hint -> record(Access) ----------->  observe(a); predict(a, depth)
                (log ring append, O(1);       (exceptions counted, never
                 a bounded hand-off: when      raised; a predictor too slow
                 the thread lags, accesses     to keep up loses accesses,
                 are dropped and counted)      not the daemon its loop)
    _on_prediction(a, keys) <-------------   call_soon_threadsafe
    queue -> worker task -> placement.load(e, for_prefetch=True)
    every TRAIN_EVERY accesses, if wanted:   install(model) <------------  train(history) in a child
                                                                            process (no GIL contention)

Hints and predictions share one plan. A prediction of an entry already hinted, in RAM, being
loaded or queued costs nothing: no queue slot, no disk read (``prefetch_covered``). The worker
takes candidates in order (client hints first, then predictions by confidence), skips what is
already in RAM or stale (an older prediction for a client that has since moved on), and keeps
predictions within the speculative budget: bytes prefetched and not read yet. A prefetch never
evicts a leased, pinned or moving entry, nor another prefetched-unread one, except that a hint's
load may take the room of predicted ones not read yet; a prediction's load never takes that of an
entry hinted and not read yet, even one that was in RAM already (what the hinted window needs
ranks above every guess). What would need more is dropped. Counters: prefetch_issued /
prefetch_hinted / prefetch_used / prefetch_wasted_bytes / prefetch_dropped / prefetch_covered.

The predictor thread's work per access (observe, and predict after a get) is timed: ``status``
shows its mean and the largest of the last 1000 (``bench/bench_predict.py --per-access`` measures
each predictor alone). Training is throttled to ``TRAIN_CPU_SHARE`` of one core: after a training
that used c CPU seconds in the (niced) child, the next one starts no sooner than c / share seconds
after the first began.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import logging
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from tierd.errors import TierdError
from tierd.predict import DEFAULT_MIN_CONFIDENCE, make_predictor
from tierd.predict.log import Access, AccessLog

if TYPE_CHECKING:
    from tierd.manager import Entry
    from tierd.placement import Placement

log = logging.getLogger("tierd.prefetch")
#: accesses waiting for the predictor thread before new ones are dropped
MAX_BACKLOG = 1024
#: prefetch loads in flight at once: two keep the disk busy while one read's result goes back to
#: the loop and the next one's room is found (the disk tier has as many reader threads)
LOADS_AT_ONCE = 2
#: queued candidates kept at most (older ones go first)
MAX_QUEUE = 256
#: a prediction is stale once its client has made this many more accesses
STALE_AFTER = 4
TRAIN_EVERY = 2000
#: the most of one core that training may use, averaged over a training and the pause after it
TRAIN_CPU_SHARE = 0.10
#: per-access times kept for the status's worst-recent figure
TIMES_KEPT = 1000
#: the latest predictions remembered for ``tierctl why`` (key -> when, confidence, after what, client)
PREDICTIONS_KEPT = 4096


class Prefetcher:
    def __init__(
        self,
        placement: Placement,
        *,
        predictor: str = "auto",
        budget_bytes: int = 0,
        depth: int = 2,
        min_confidence: float = DEFAULT_MIN_CONFIDENCE,
        log_capacity: int = 65536,
    ) -> None:
        self.placement = placement
        self.m = placement.m
        self.predictor_name = predictor
        self._opts = _options(predictor, min_confidence)
        self.predictor = make_predictor(predictor, **self._opts)
        self._trainer: ProcessPoolExecutor | None = None
        self.budget = budget_bytes
        self.depth = depth
        self.min_confidence = min_confidence
        self.log = AccessLog(log_capacity)
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="tierd-predict")
        self._backlog = 0
        self._queue: collections.deque[tuple[int, int, str, int]] = (
            collections.deque()
        )  # (prio, client, key, gen)
        self._gen: dict[int, int] = collections.defaultdict(int)  # accesses seen per client
        self._wake = asyncio.Event()
        self._training = False
        self._since_train = 0
        self._t0 = time.monotonic()
        self._predicted: collections.OrderedDict[str, tuple[float, float, str, int]] = (
            collections.OrderedDict()
        )
        self._queued: collections.Counter[str] = collections.Counter()  # key -> times in the queue
        self._train_after = 0.0  # monotonic time before which no training starts (the CPU share)
        self._train_cpu_s = 0.0  # CPU seconds the trainings have used
        self._trainings = 0
        self._work_ns = 0  # predictor-thread time, all accesses
        self._work_n = 0
        self._recent_ns: collections.deque[int] = collections.deque(maxlen=TIMES_KEPT)
        self._loading = 0  # prefetch loads in progress
        self._loading_bytes = 0  # and the room they take in RAM
        self.errors = 0
        self.dropped_accesses = 0
        self.last_error = ""

    # ---- input ---------------------------------------------------------------------------------
    def record(self, client: int, e: Entry, op: str, tier: str) -> None:
        """One access (on the loop): log it and hand it to the predictor thread."""
        a = Access(time.monotonic() - self._t0, client, e.key, op, tier, e.nbytes, tuple(e.tags))
        self.log.append(a)
        if op == "get":
            self._gen[client] += 1
        if self.predictor_name == "none" or len(self.m.tiers) == 1:
            return
        if self._backlog >= MAX_BACKLOG:
            self.dropped_accesses += 1
            return
        self._backlog += 1
        loop = asyncio.get_running_loop()
        # puts and hints are observed too (a new key the predictor can relate to others), but only
        # a get asks for predictions
        fut = loop.run_in_executor(self._thread, self._predict if op == "get" else self._observe, a)
        fut.add_done_callback(lambda f: self._on_prediction(a, f))
        self._since_train += 1
        if self._since_train >= TRAIN_EVERY and not self._training:
            self._since_train = 0
            self._maybe_train()

    def hint(self, client: int, keys: list[str]) -> int:
        """Client hints go ahead of predictions; returns how many are known entries."""
        known: list[tuple[int, int, str, int]] = []
        home = self.placement.home
        n = nbytes = 0
        for key in keys:
            e = self.m.entries.get(key)
            if e is None:
                continue
            n += 1
            nbytes += self.m.ram.region_bytes(e.nbytes)
            self.record(client, e, "hint", "-")
            if home in e.where:  # nothing to load: keep it from a prediction's load until read
                self.m.mark_hinted(e)
                continue
            known.append((0, client, key, self._gen[client]))
        # ahead of everything queued, in the order given: the first hinted key is loaded first
        for item in reversed(known):
            self._push(item, front=True)
        info = self.m.clients.get(client)
        if info is not None:
            info.hint_bytes = nbytes
        return n

    def set_predictor(self, name: str) -> None:
        """Use another predictor from now on (a reload). It starts with no history: accesses still
        on their way to the predictor thread go to the new one, and a training in flight for the
        old one is thrown away when it ends. Prefetches already queued stay queued."""
        if name == self.predictor_name:
            return
        opts = _options(name, self.min_confidence)
        predictor = make_predictor(name, **opts)  # ValueError for an unknown name: nothing changes
        self.predictor_name, self._opts, self.predictor = name, opts, predictor
        log.info("predictor is now %s", name)

    # ---- predictor thread ----------------------------------------------------------------------
    def _predict(self, a: Access) -> list[tuple[str, float]]:
        t = time.perf_counter_ns()
        try:
            self.predictor.observe(a)
            return self.predictor.predict(a, self.depth)
        finally:
            self._timed(time.perf_counter_ns() - t)

    def _observe(self, a: Access) -> list[tuple[str, float]]:
        t = time.perf_counter_ns()
        try:
            self.predictor.observe(a)
            return []
        finally:
            self._timed(time.perf_counter_ns() - t)

    def _timed(self, ns: int) -> None:
        self._work_ns += ns
        self._work_n += 1
        self._recent_ns.append(ns)

    def _on_prediction(self, a: Access, fut: Any) -> None:
        self._backlog -= 1
        try:
            preds = fut.result()
        except Exception as ex:  # noqa: BLE001 - a broken predictor costs its predictions, nothing else
            self.errors += 1
            self.last_error = f"{type(ex).__name__}: {ex}"
            if self.errors in (1, 10, 100, 1000):
                log.warning(
                    "predictor %s failed (%d times): %s", self.predictor_name, self.errors, self.last_error
                )
            return
        gen = self._gen[a.client]
        now = self.log_time()
        home = self.placement.home
        for key, conf in preds:
            if conf >= self.min_confidence and key != a.key:
                e = self.m.entries.get(key)
                if e is None:
                    continue
                if home in e.where or self._queued[key] or self.placement.loading(e):
                    self.m.metrics.prefetch_covered += 1  # hinted, loaded or on its way: no cost
                else:
                    self._push((1, a.client, key, gen))
                self._predicted[key] = (now, conf, a.key, a.client)
                self._predicted.move_to_end(key)
                if len(self._predicted) > PREDICTIONS_KEPT:
                    self._predicted.popitem(last=False)

    def _push(self, item: tuple[int, int, str, int], front: bool = False) -> None:
        if front:
            self._queue.appendleft(item)
        else:
            self._queue.append(item)
        self._queued[item[2]] += 1
        while len(self._queue) > MAX_QUEUE:
            self._unqueue(self._queue.pop() if front else self._queue.popleft())
        self._wake.set()

    def _unqueue(self, item: tuple[int, int, str, int]) -> tuple[int, int, str, int]:
        key = item[2]
        self._queued[key] -= 1
        if self._queued[key] <= 0:
            del self._queued[key]
        return item

    def _maybe_train(self) -> None:
        try:
            wanted = self.predictor.wants_training()
        except Exception:  # noqa: BLE001 - a predictor bug must not reach the loop
            wanted = False
        if not wanted or time.monotonic() < self._train_after:
            return
        self._training = True
        started = time.monotonic()
        history = self.log.snapshot()
        loop = asyncio.get_running_loop()
        trained_for = self.predictor

        def done(f: Any) -> None:
            self._training = False
            try:
                model, cpu_s = f.result()
            except Exception as ex:  # noqa: BLE001
                self._train_after = time.monotonic() + 60.0  # a failing training: not every 2000 gets
                self.errors += 1
                self.last_error = f"training: {type(ex).__name__}: {ex}"
                log.warning("predictor training failed: %s", self.last_error)
                return
            self._trainings += 1
            self._train_cpu_s += cpu_s
            self._train_after = started + cpu_s / TRAIN_CPU_SHARE
            if self.predictor is not trained_for:  # replaced by a reload meanwhile
                return
            # install on the predictor thread: observe/predict never see a half-swapped model
            loop.run_in_executor(self._thread, self.predictor.install, model)

        # Training is seconds of pure Python: in a child process it cannot hold the loop's GIL. The
        # child builds a fresh predictor with the same options; train() reads only those and history.
        if self._trainer is None:
            # niced: on a small machine the model process needs the cores more than the predictor does
            self._trainer = ProcessPoolExecutor(
                1, mp_context=multiprocessing.get_context("spawn"), initializer=os.nice, initargs=(19,)
            )
        job = functools.partial(_train, self.predictor_name, self._opts, history)
        loop.run_in_executor(self._trainer, job).add_done_callback(done)

    # ---- worker --------------------------------------------------------------------------------
    async def run(self) -> None:
        """Take queued candidates in order and promote them, up to ``LOADS_AT_ONCE`` at a time (a
        background task). One load at a time left the disk idle between two reads (the hand-off
        from a reader thread to the loop and back, and the room taken for the next one): in a 2B
        model's streaming decode, 7.9 s of 40 s in 3,770 gaps, never two reads in flight."""
        slots = asyncio.Semaphore(LOADS_AT_ONCE)
        loads: set[asyncio.Task[None]] = set()

        def finished(t: asyncio.Task[None]) -> None:
            loads.discard(t)
            slots.release()

        try:
            while True:
                await self._wake.wait()
                self._wake.clear()
                while self._queue:
                    await slots.acquire()  # a load has finished (or fewer are running)
                    picked = self._next()
                    if picked is None:
                        slots.release()
                        continue
                    t = asyncio.create_task(self._load(*picked))
                    loads.add(t)
                    t.add_done_callback(finished)
        finally:
            for t in loads:
                t.cancel()

    def _next(self) -> tuple[Entry, bool] | None:
        """The next queued candidate worth loading (and whether a client hinted it); None when the
        queue holds none."""
        while self._queue:
            prio, client, key, gen = self._unqueue(self._queue.popleft())
            if prio and self._gen[client] - gen > STALE_AFTER:
                self.m.metrics.prefetch_dropped += 1
                continue
            e = self.m.entries.get(key)
            if e is None or self.placement.home in e.where:
                continue
            size = self.placement.ram.region_bytes(e.nbytes)
            if prio and self.m.spec_bytes + self._loading_bytes + size > self.budget:
                self.m.metrics.prefetch_dropped += 1
                continue
            return e, not prio
        return None

    async def _load(self, e: Entry, hinted: bool) -> None:
        if hinted:
            self.m.metrics.prefetch_hinted += 1
        else:
            self.m.metrics.prefetch_issued += 1
        size = self.placement.ram.region_bytes(e.nbytes)
        self._loading += 1
        self._loading_bytes += size
        try:
            await self.placement.load(e, for_prefetch=hinted, predicted=not hinted)
        except TierdError as ex:  # full of leases / pins / unread prefetches: not worth forcing
            self.m.metrics.prefetch_dropped += 1
            log.debug("prefetch of %s dropped: %s", e.key, ex)
        finally:
            self._loading -= 1
            self._loading_bytes -= size

    def log_time(self) -> float:
        """Now, on the access log's clock (seconds since the daemon started)."""
        return time.monotonic() - self._t0

    def expectation(self, e: Entry) -> dict[str, Any]:
        """Whether ``e`` is expected soon (``tierctl why``): queued for a prefetch (a client's hint
        or a prediction) and where in the queue, loaded on a prediction and not read yet, and the
        latest prediction that named it (when, how confident, after which key)."""
        queued = None
        for i, (prio, client, key, gen) in enumerate(self._queue):
            if key == e.key:
                stale = bool(prio) and self._gen[client] - gen > STALE_AFTER
                queued = {"position": i + 1, "hinted": prio == 0, "client": client, "stale": stale}
                break
        last = self._predicted.get(e.key)
        prediction = None
        if last is not None:
            t, conf, after, client = last
            prediction = {"seconds_ago": round(self.log_time() - t, 3), "confidence": round(conf, 4),
                          "after": after, "client": client}  # fmt: skip
        return {
            "predictor": self.predictor_name,
            "queued": queued,
            "prefetched_unread": e.prefetched,
            "last_prediction": prediction,
        }

    # ---- status --------------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        try:
            pstats = self.predictor.stats()
        except Exception as ex:  # noqa: BLE001
            pstats = {"error": f"{type(ex).__name__}: {ex}"}
        return {
            "predictor": self.predictor_name,
            "recent_hit_rate": self.log.recent_hit_rate(1000),
            "budget_bytes": self.budget,
            "speculative_bytes": self.m.spec_bytes,
            "depth": self.depth,
            "min_confidence": self.min_confidence,
            "queued": len(self._queue),
            "backlog": self._backlog,
            "loading": self._loading,
            "predictor_errors": self.errors,
            "last_error": self.last_error,
            "dropped_accesses": self.dropped_accesses,
            "accesses_logged": self.log.total,
            "predictor_stats": pstats,
            "work_us_mean": round(self._work_ns / self._work_n / 1e3, 2) if self._work_n else None,
            "work_us_max_recent": round(max(self._recent_ns) / 1e3, 2) if self._recent_ns else None,
            "trainings": self._trainings,
            "train_cpu_s": round(self._train_cpu_s, 3),
            "train_cpu_share": TRAIN_CPU_SHARE,
        }

    def close(self) -> None:
        self._thread.shutdown(wait=False, cancel_futures=True)
        if self._trainer is not None:
            self._trainer.shutdown(wait=False, cancel_futures=True)


def _options(predictor: str, min_confidence: float) -> dict[str, Any]:
    """The constructor options of a predictor by name (the cheap ones take none)."""
    return {} if predictor in ("none", "sequence") else {"min_confidence": min_confidence}


def _train(name: str, opts: dict[str, Any], history: list[Access]) -> tuple[object, float]:
    """In the trainer process: what ``install`` takes (a picklable model), and the CPU seconds
    the training used (the throttle's measure)."""
    t = time.process_time()
    model = make_predictor(name, **opts).train(history)
    return model, time.process_time() - t
