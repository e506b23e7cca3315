"""kill -9 in a loop: a writer does durable puts and deletes while the daemon is SIGKILLed and
restarted on the same state dir, ``CHAOS_KILLS`` times.

The writer (a thread with its own Client) keeps requests going back to back, so most kills land
while one is in flight. After each restart, every key the writer ever touched is checked against
what was acknowledged: an acknowledged durable put is there with exactly its bytes (sha256), an
acknowledged delete is gone, and the one request in flight at the kill may have happened or not,
but wholly (the old value or the new one, nothing else). The disk tier's checksums all verify.
"""

from __future__ import annotations

import hashlib
import os
import random
import signal
import threading
import time
from pathlib import Path

import pytest
import torch

from tests.chaos.budget import FIGURES, KILLS, NOTES
from tests.chaos.conftest import start
from tierd import launch
from tierd_client import Client, DaemonUnavailable, TierdError

pytestmark = pytest.mark.chaos

KEYS = [f"k9/{i:02d}" for i in range(40)]
SEED = int(os.environ.get("TIERD_TEST_SEED", "0"))


def digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.numpy().tobytes()).hexdigest()


class Writer(threading.Thread):
    """Durable puts (70%) and deletes (30%) of random keys until the daemon goes away.

    ``state`` is shared with the test: ``acked`` maps a key to its acknowledged digest (None:
    deleted), ``in_flight`` is the request sent and not yet answered (key, digest or None).
    """

    def __init__(self, sock: Path, rng: random.Random, acked: dict[str, str | None]) -> None:
        super().__init__(name="k9-writer", daemon=True)
        self.sock = sock
        self.rng = rng
        self.acked = acked
        self.in_flight: tuple[str, str | None] | None = None
        self.count = 0
        self.done = threading.Condition()
        self.killed = False
        self.failure: BaseException | None = None

    def run(self) -> None:
        try:
            with Client(self.sock) as c:
                while True:
                    self._one(c)
        except DaemonUnavailable:
            if not self.killed:
                self.failure = AssertionError("the daemon went away before it was killed")
        except TierdError as e:  # a typed error with the daemon alive is a finding
            if not self.killed:
                self.failure = e
        finally:
            with self.done:
                self.count = -1 if self.count == 0 else self.count
                self.done.notify_all()

    def _one(self, c: Client) -> None:
        rng = self.rng
        present = [k for k, v in self.acked.items() if v is not None]
        key = rng.choice(KEYS)
        if present and rng.random() < 0.3:
            key = rng.choice(present)
            self.in_flight = (key, None)
            c.delete(key)
        else:
            x = torch.randn(
                rng.randrange(1, 64 << 10), generator=torch.Generator().manual_seed(rng.getrandbits(62))
            )
            self.in_flight = (key, digest(x))
            c.put(key, x, durable=True)
        self.acked[key] = self.in_flight[1]
        self.in_flight = None
        with self.done:
            self.count += 1
            self.done.notify_all()


def check(d: launch.Daemon, acked: dict[str, str | None], maybe: tuple[str, str | None] | None) -> None:
    """Every key as acknowledged (the one in flight: either way)."""
    with Client(d.socket) as c:
        listed = {e["key"] for e in c.ls("k9/")}
        assert listed <= set(KEYS), listed - set(KEYS)
        for key in KEYS:
            want = {acked.get(key)}
            if maybe is not None and maybe[0] == key:
                want.add(maybe[1])
            if key in listed:
                t = c.get(key)
                got: str | None = digest(t)
                c.release(t)
                FIGURES["kill9 values verified (sha256) after restarts"] += 1
            else:
                got = None
            assert got in want, f"{key}: {got} after the restart, acknowledged {want}"
            acked[key] = got  # the request in flight: now known whether it happened
            FIGURES["kill9 keys checked after restarts (value or absence)"] += 1
        bad = [r for r in c.verify("k9/") if not r["ok"]]
        assert not bad, bad


def test_kill_9_loop_keeps_every_acknowledged_durable_put_and_delete(chaos_tmp: Path) -> None:
    rng = random.Random(SEED)
    acked: dict[str, str | None] = {}
    maybe: tuple[str, str | None] | None = None
    restarts: list[float] = []
    d: launch.Daemon | None = None
    try:
        for _ in range(KILLS):
            t0 = time.monotonic()
            d = start(chaos_tmp, ram_bytes="32MiB", disk_bytes="512MiB")
            restarts.append(time.monotonic() - t0)
            check(d, acked, maybe)
            w = Writer(d.socket, rng, acked)
            w.start()
            target = rng.randint(1, 40)
            with w.done:
                w.done.wait_for(lambda w=w, target=target: w.count >= target or w.count < 0, timeout=120)
            assert w.count >= target, f"the writer stopped after {w.count} requests: {w.failure}"
            w.killed = True
            os.kill(d.pid, signal.SIGKILL)  # the writer is sending its next request meanwhile
            d.kill()
            w.join(60)
            assert not w.is_alive() and w.failure is None, w.failure
            maybe = w.in_flight
            FIGURES["kill9 kills survived"] += 1
            FIGURES["kill9 acknowledged requests"] += w.count
            FIGURES["kill9 kills with a request in flight"] += maybe is not None
        d = start(chaos_tmp, ram_bytes="32MiB", disk_bytes="512MiB")
        check(d, acked, maybe)
    finally:
        if d is not None:
            rc = d.stop()
    assert rc == 0, d.log()
    NOTES["kill9 restart to READY (s)"] = (
        f"median {sorted(restarts)[len(restarts) // 2]:.2f}, max {max(restarts):.2f}"
    )
