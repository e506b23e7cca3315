"""Background training of eviction models: a child process, at most a stated share of one core.

Every ``check_s`` seconds the loop asks each memory tier's policy for a training job
(``Policy.training_job``: the learned policy has one once it has seen ``TRAIN_EVERY`` new
references); a job runs in a spawned child process (niced to 19, one BLAS/OpenMP thread), so the
fit never holds the daemon's GIL, and what it returns is installed on the loop. After a fit of
``d`` seconds the next one waits at least ``d / CPU_SHARE``: training takes at most ``CPU_SHARE``
of one core however often the stream asks. A failed fit is logged and counted; the policy keeps
its previous model.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from typing import Any

from tierd.policy.base import Policy

log = logging.getLogger("tierd.policy")
CPU_SHARE = 0.10
CHECK_S = 5.0


def _child_init() -> None:
    os.nice(19)
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = "1"


class Trainer:
    def __init__(self, policies: Callable[[], dict[str, Policy[Any]]], check_s: float = CHECK_S) -> None:
        #: the policies now (a reload may replace them)
        self.policies = policies
        self.check_s = check_s
        self.fits = 0
        self.failures = 0
        self.last_fit_s = 0.0
        self.last_error = ""
        self._pool: ProcessPoolExecutor | None = None

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        wait = self.check_s
        while True:
            await asyncio.sleep(wait)
            wait = self.check_s
            for tier, policy in list(self.policies().items()):
                job = policy.training_job()
                if job is None:
                    continue
                fn, args = job
                if self._pool is None:
                    self._pool = ProcessPoolExecutor(
                        1, mp_context=multiprocessing.get_context("spawn"), initializer=_child_init
                    )
                t0 = time.monotonic()
                try:
                    model = await loop.run_in_executor(self._pool, fn, *args)
                except Exception as ex:  # noqa: BLE001 - a failed fit costs the model, not the daemon
                    self.failures += 1
                    self.last_error = f"{type(ex).__name__}: {ex}"
                    log.warning("eviction model for %s: training failed: %s", tier, self.last_error)
                    continue
                took = time.monotonic() - t0
                if self.policies().get(tier) is policy:  # not replaced by a reload meanwhile
                    policy.install(model)
                self.fits += 1
                self.last_fit_s = took
                wait = max(wait, took / CPU_SHARE)

    def stats(self) -> dict[str, Any]:
        return {"fits": self.fits, "failures": self.failures, "last_fit_s": round(self.last_fit_s, 3),
                "cpu_share": CPU_SHARE, "last_error": self.last_error}  # fmt: skip

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
