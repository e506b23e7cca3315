"""Prefetching end to end: a cyclic read bigger than RAM is served from RAM once learned; a
prefetch never evicts a leased entry; a predictor that throws or hangs does not touch serving."""

from __future__ import annotations

import asyncio
import inspect
import threading
from pathlib import Path

import pytest
import pytest_asyncio
import torch

from tests.conftest import wait_until
from tierd.manager import Manager
from tierd.placement import Placement
from tierd.predict import DEFAULT_MIN_CONFIDENCE
from tierd.predict.simulate import replay
from tierd.prefetch import Prefetcher
from tierd.protocol import Put
from tierd.tiers.disk import DiskTier
from tierd.tiers.ram import RamTier
from tierd_client import Client

MiB = 1 << 20
N, SIZE = 12, 4 * MiB  # 48 MiB of weights through a 32 MiB RAM tier: 1.5x


def weight(i: int) -> torch.Tensor:
    return torch.full((SIZE // 4,), float(i))


def compute() -> None:
    """The model's work between two layer reads: the pause in which a prefetch can land."""
    a = torch.ones(384, 384)
    for _ in range(12):
        a = torch.tanh(a @ a / 384)


def settle(c: Client) -> None:
    """Wait until the prefetcher has caught up: every access seen by the predictor, nothing queued
    or loading. The model's compute gives a prefetch its time to land; on a loaded machine that
    time varies, and these tests are about what is predicted and kept, not about the race (the
    benchmarks measure that)."""
    wait_until(lambda: _idle(c.stats()["prefetch"]), timeout=30, what="the prefetcher to catch up")


def _idle(p: dict) -> bool:
    return p["backlog"] == 0 and p["queued"] == 0 and p["loading"] == 0


def lap_hit_rates(c: Client, laps: int, held: list[torch.Tensor] | None = None) -> list[float]:
    rates = []
    for _ in range(laps):
        before = c.stats()["counters"]
        for i in range(N):
            t = c.get(f"cyc/{i}")
            assert t[0].item() == float(i)
            c.release(t)
            compute()
            settle(c)
        after = c.stats()["counters"]
        rates.append((after["hits_ram"] - before["hits_ram"]) / (after["gets"] - before["gets"]))
    return rates


def start(start_daemon, predictor: str):
    return start_daemon("--predictor", predictor, "--prefetch-budget", "50%", "--prefetch-depth", "2",
                        "--ram-high-watermark", "0.95", ram_bytes="32MiB", disk_bytes="512MiB")  # fmt: skip


@pytest.mark.parametrize("predictor", ["sequence", "auto"])
def test_cyclic_reads_are_served_from_ram_once_learned(start_daemon, predictor: str) -> None:
    d = start(start_daemon, predictor)
    with Client(d.socket) as c:
        for i in range(N):
            c.put(f"cyc/{i}", weight(i), tags=["weight"])
        for i in range(N):  # lap 1 starts from disk: a hit in it can only be a prediction's
            if "ram" in c.stat(f"cyc/{i}")["tiers"]:
                c.evict(f"cyc/{i}")
        rates = lap_hit_rates(c, 5)
        st = c.stats()
        assert rates[0] < 0.5, f"lap 1 cannot be served from RAM (nothing learned yet): {rates}"
        # sequence learns the cycle in one lap; auto starts on none (hints only) and follows a
        # predictor once it has 32 reads of evidence that it saves more than it costs: one lap more
        learned_from = 2 if predictor == "sequence" else 3
        assert min(rates[learned_from:]) >= 0.75, f"after learning, reads should hit RAM: {rates}"
        assert st["counters"]["prefetch_used"] > 0 and st["prefetch"]["predictor"] == predictor
        if predictor == "auto":
            assert st["prefetch"]["predictor_stats"]["using"] != "none", st["prefetch"]["predictor_stats"]
        assert st["prefetch"]["recent_hit_rate"] is not None
        # the daemon acts on the threshold that offline replay measures with
        replay_default = inspect.signature(replay).parameters["min_confidence"].default
        assert st["prefetch"]["min_confidence"] == replay_default == DEFAULT_MIN_CONFIDENCE


def test_without_a_predictor_cyclic_reads_keep_missing(start_daemon) -> None:
    d = start(start_daemon, "none")
    with Client(d.socket) as c:
        for i in range(N):
            c.put(f"cyc/{i}", weight(i))
        rates = lap_hit_rates(c, 4)
        # the same workload as above: without prediction, eviction alone cannot keep up with a
        # cycle 1.5x the tier (LRU order evicts exactly what comes next)
        assert max(rates[2:]) < 0.6, rates
        assert c.stats()["counters"]["prefetch_issued"] == 0


def test_prefetch_never_evicts_a_leased_entry(start_daemon) -> None:
    d = start(start_daemon, "sequence")
    with Client(d.socket) as c:
        for i in range(N):
            c.put(f"cyc/{i}", weight(i))
        held = [c.get("cyc/0"), c.get("cyc/5")]
        for _ in range(3):
            for i in range(N):
                if i in (0, 5):
                    continue
                t = c.get(f"cyc/{i}")
                c.release(t)
        assert c.stat("cyc/0")["tiers"][0] == "ram" and c.stat("cyc/5")["tiers"][0] == "ram"
        assert torch.equal(held[0], weight(0)) and torch.equal(held[1], weight(5))


def test_hints_are_prefetched(start_daemon) -> None:
    d = start(start_daemon, "none")
    with Client(d.socket) as c:
        for i in range(N):
            c.put(f"cyc/{i}", weight(i))
        cold = [i for i in range(N) if c.stat(f"cyc/{i}")["tiers"] == ["disk"]]
        assert cold
        assert c.prefetch([f"cyc/{cold[0]}", "cyc/none"]) == 1
        from tests.conftest import wait_until

        wait_until(lambda: "ram" in c.stat(f"cyc/{cold[0]}")["tiers"], what="the hinted entry in RAM")
        assert c.stats()["counters"]["prefetch_hinted"] == 1


def test_hints_load_in_order_and_a_demand_read_takes_the_one_needed_last(start_daemon) -> None:
    # 64 MiB tier, 12 MiB entries: room for five. Hint three (all prefetched, in the order given),
    # lease two others, then read a sixth: the only room is an unread prefetch, and the one to give
    # up is the last hinted (needed last), not the first (needed next).
    d = start_daemon("--predictor", "none", "--ram-high-watermark", "1.0", "--ram-low-watermark", "1.0",
                     ram_bytes="64MiB", disk_bytes="256MiB")  # fmt: skip
    size = 12 * (1 << 20) // 4
    with Client(d.socket) as c:
        for i in range(6):
            c.put(f"hint/{i}", torch.full((size,), float(i)), durable=True)
        for i in range(6):
            if "ram" in c.stat(f"hint/{i}")["tiers"]:
                c.evict(f"hint/{i}")
        hinted = ["hint/0", "hint/1", "hint/2"]
        assert c.prefetch(hinted) == 3
        wait_until(lambda: all("ram" in c.stat(k)["tiers"] for k in hinted), what="the hinted entries in RAM")
        held = [c.get("hint/3"), c.get("hint/4")]
        t = c.get("hint/5")  # needs room: only the unread prefetches can give it
        assert torch.equal(t, torch.full((size,), 5.0))
        in_ram = {k: "ram" in c.stat(k)["tiers"] for k in hinted}
        assert in_ram == {"hint/0": True, "hint/1": True, "hint/2": False}, in_ram
        c.release([t, *held])


def test_a_prediction_of_a_hinted_entry_costs_nothing(start_daemon) -> None:
    # the model hints the next two reads itself; once sequence has learned the cycle it predicts
    # the same two: those predictions take no queue slot and start no load. Watermarks at 1.0: the
    # balancer may demote an entry that was in RAM already when hinted (it is not a prefetch), and
    # its prediction would then load it again (a fresh-clone CI run: one such load in 12 reads)
    d = start_daemon("--predictor", "sequence", "--prefetch-budget", "50%", "--prefetch-depth", "2",
                     "--ram-high-watermark", "1.0", "--ram-low-watermark", "1.0",
                     ram_bytes="32MiB", disk_bytes="512MiB")  # fmt: skip
    with Client(d.socket) as c:
        for i in range(N):
            c.put(f"cyc/{i}", weight(i))
        for _ in range(2):
            for i in range(N):
                c.release(c.get(f"cyc/{i}"))
        settle(c)  # the warm-up's last predictions too: one still in the backlog would load later
        before = c.stats()["counters"]
        for i in range(N):
            assert c.prefetch([f"cyc/{(i + 1) % N}", f"cyc/{(i + 2) % N}"]) == 2
            settle(c)  # the hinted entries are in RAM, as the model's compute would give them time to be
            t = c.get(f"cyc/{i}")
            assert t[0].item() == float(i)
            c.release(t)
            settle(c)  # and the read's predictions are made before the next hint
        wait_until(lambda: c.stats()["counters"]["prefetch_covered"] - before["prefetch_covered"] >= N,
                   what="the predictions of hinted entries")  # fmt: skip
        after = c.stats()["counters"]
    assert after["prefetch_issued"] == before["prefetch_issued"], {
        k: (before.get(k), v) for k, v in after.items() if before.get(k) != v
    }


def test_a_predicted_load_never_takes_the_room_of_a_hinted_unread_entry(start_daemon) -> None:
    # 64 MiB tier, 12 MiB entries: room for five. s/0 is in RAM and hinted, s/1 and s/2 are loaded
    # for a hint, s/3 and s/5 are leased; sequence then predicts s/6 after s/5. The only entry it
    # could push out is s/0, which the hint says is needed: the prediction is dropped instead.
    d = start_daemon("--predictor", "sequence", "--prefetch-budget", "100%", "--ram-high-watermark", "1.0",
                     "--ram-low-watermark", "1.0", ram_bytes="64MiB", disk_bytes="256MiB")  # fmt: skip
    size = 12 * MiB // 4
    with Client(d.socket) as c:
        for i in range(7):
            c.put(f"s/{i}", torch.full((size,), float(i)), durable=True)
        for _ in range(3):  # teach it that s/6 follows s/5
            c.release(c.get("s/5"))
            c.release(c.get("s/6"))

        def all_on_disk() -> bool:
            if not _idle(c.stats()["prefetch"]):  # a late prediction would load one again
                return False
            in_ram = [f"s/{i}" for i in range(7) if "ram" in c.stat(f"s/{i}")["tiers"]]
            for k in in_ram:
                c.evict(k)
            return not in_ram

        wait_until(all_on_disk, what="every entry back on disk only")
        c.release(c.get("s/0"))  # an ordinary entry in RAM, read already
        assert c.prefetch(["s/0", "s/1", "s/2"]) == 3
        wait_until(lambda: all("ram" in c.stat(f"s/{i}")["tiers"] for i in (1, 2)), what="s/1, s/2 loaded")
        held = [c.get("s/3")]
        before = c.stats()["counters"]["prefetch_dropped"]
        held.append(c.get("s/5"))  # the fifth slot; the predictor names s/6 next
        wait_until(lambda: c.stats()["counters"]["prefetch_dropped"] > before, what="the prediction dropped")
        in_ram = {f"s/{i}": "ram" in c.stat(f"s/{i}")["tiers"] for i in (0, 1, 2, 6)}
        assert in_ram == {"s/0": True, "s/1": True, "s/2": True, "s/6": False}, in_ram
        hits = c.stats()["counters"]["hits_ram"]
        for i in (0, 1, 2):  # the hinted window is served from RAM
            t = c.get(f"s/{i}")
            assert torch.equal(t, torch.full((size,), float(i)))
            c.release(t)
        assert c.stats()["counters"]["hits_ram"] == hits + 3
        c.release(held)


def test_status_says_which_predictor_auto_follows_and_why(start_daemon) -> None:
    import subprocess
    import sys

    d = start(start_daemon, "auto")
    with Client(d.socket) as c:
        for i in range(N):
            c.put(f"cyc/{i}", weight(i))
        for i in range(N):
            c.release(c.get(f"cyc/{i}"))
        ps = c.stats()["prefetch"]["predictor_stats"]
    assert ps["using"] == "none" and set(ps["scores"]) == {"none", "sequence", "learned"}
    out = subprocess.run([sys.executable, "-m", "tierd_client.tierctl", "--socket", str(d.socket), "status"],
                         capture_output=True, text=True, check=True).stdout  # fmt: skip
    assert "predictor: auto follows none (0 switches" in out, out
    lines = [ln for ln in out.splitlines() if ln.startswith("  ") and " score " in ln]
    assert [ln.split()[1] if ln.startswith("  *") else ln.split()[0] for ln in lines] == [
        "none", "sequence", "learned"], out  # fmt: skip
    assert lines[0].startswith("  * none") and "us/access" in lines[1] and "predictor thread" in out


class Exploding:
    name = "exploding"

    def __init__(self) -> None:
        self.calls = 0

    def observe(self, a) -> None:
        self.calls += 1
        raise RuntimeError("predictor bug")

    def predict(self, a, k):  # pragma: no cover - observe raises first
        return []

    def stats(self):
        raise RuntimeError("stats bug")

    def wants_training(self) -> bool:
        raise RuntimeError("wants_training bug")


class Hanging(Exploding):
    def __init__(self) -> None:
        super().__init__()
        self.release = threading.Event()

    def observe(self, a) -> None:
        self.calls += 1
        self.release.wait(30)  # hangs until the test lets it go


@pytest_asyncio.fixture
async def prefetcher(tmp_path: Path):
    ram = RamTier(16 * MiB)
    disk = DiskTier(tmp_path / "state", 64 * MiB)
    m = Manager(ram, disk)
    pl = Placement(m)
    pf = Prefetcher(pl, predictor="sequence", budget_bytes=8 * MiB)
    cid = m.add_client(1, 0, "t")
    for i in range(4):
        pid, _off = m.begin_put(cid, Put(1, f"p/{i}", "uint8", [MiB], MiB))
        m.seal(cid, pid)
    yield pf, m, cid
    pf.close()
    await pl.close()
    disk.close()
    ram.close()


@pytest.mark.asyncio
async def test_a_throwing_predictor_costs_only_its_predictions(prefetcher) -> None:
    pf, m, cid = prefetcher
    pf.predictor = Exploding()
    for _ in range(50):
        for i in range(4):
            e = m.entries[f"p/{i}"]
            m.lease(cid, [e])
            pf.record(cid, e, "get", "ram")  # never raises
    for _ in range(2):  # the thread runs jobs in order: once a no-op has run, every result is back
        await asyncio.get_running_loop().run_in_executor(pf._thread, lambda: None)
    assert pf.errors == 200 and "predictor bug" in pf.last_error
    st = pf.status()  # stats() raising is reported, not raised
    assert "stats bug" in st["predictor_stats"]["error"]
    pf._maybe_train()  # wants_training() raising is contained too


@pytest.mark.asyncio
async def test_a_hanging_predictor_drops_accesses_not_requests(prefetcher) -> None:
    from tierd import prefetch

    pf, m, cid = prefetcher
    hanging = Hanging()
    pf.predictor = hanging
    e = m.entries["p/0"]
    for _ in range(prefetch.MAX_BACKLOG + 100):
        pf.record(cid, e, "get", "ram")  # returns at once although the predictor is stuck
    assert pf.dropped_accesses == 100 and pf.log.total == prefetch.MAX_BACKLOG + 100
    assert m.lease(cid, [e])  # the table keeps serving meanwhile
    hanging.release.set()


def test_trace_record_and_replay(start_daemon, short_tmp: Path) -> None:
    import json
    import subprocess
    import sys

    from tierd.predict.log import read_trace

    d = start(start_daemon, "sequence")
    out = short_tmp / "trace.jsonl"
    tierctl = [sys.executable, "-m", "tierd_client.tierctl", "--socket", str(d.socket)]
    with Client(d.socket) as c:
        for i in range(N):
            c.put(f"cyc/{i}", weight(i))
        cmd = [*tierctl, "trace", "record", str(out), "--seconds", "3"]
        rec = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
        assert rec.stderr is not None
        assert rec.stderr.read(9).strip() == "recorded"  # it is polling: from now on reads are recorded
        for _ in range(2):
            for i in range(N):
                c.release(c.get(f"cyc/{i}"))
        assert rec.wait(30) == 0
        rec.stderr.close()
    trace = read_trace(out)
    assert [a.key for a in trace if a.op == "get"] == [f"cyc/{i}" for i in range(N)] * 2
    assert all(a.nbytes == SIZE for a in trace)
    res = subprocess.run([*tierctl, "trace", "replay", str(out), "--json"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)
    assert set(report["results"]) == {"none", "sequence", "learned", "auto"}
    assert report["results"]["sequence"]["hit_rate"] >= report["results"]["none"]["hit_rate"]
    human = subprocess.run([*tierctl, "trace", "replay", str(out), "--predictor", "sequence"],
                           capture_output=True, text=True)  # fmt: skip
    assert human.returncode == 0 and "sequence" in human.stdout


def test_learned_predictor_trains_in_the_background(start_daemon) -> None:
    from tests.conftest import wait_until

    d = start_daemon(
        "--predictor", "learned", "--prefetch-budget", "50%", ram_bytes="32MiB", disk_bytes="512MiB"
    )
    with Client(d.socket) as c:
        for i in range(8):
            c.put(f"lt/{i}", torch.full((1024,), float(i)))
        for _ in range(300):  # 2400 reads: past the first training point
            for i in range(8):
                c.release(c.get(f"lt/{i}"))

        def trained() -> bool:
            c.release(c.get("lt/0"))  # keep reading: training is looked at as reads come in
            return bool(c.stats()["prefetch"]["predictor_stats"].get("trained"))

        wait_until(trained, timeout=60, what="the learned predictor's first background training")
        st = c.stats()["prefetch"]
        assert st["predictor_errors"] == 0, st["last_error"]
        assert st["predictor_stats"]["installs"] >= 1


class _Placement:
    """What the prefetch worker asks of a placement, with a load that waits until let go."""

    def __init__(self, ram: RamTier) -> None:
        self.home = "elsewhere"  # nothing is home yet: every hinted entry is loaded
        self.ram = ram
        self.started: list[str] = []
        self.running = 0
        self.most = 0
        self.go = asyncio.Event()

    async def load(self, e, for_prefetch: bool = False, predicted: bool = False) -> None:
        self.started.append(e.key)
        self.running += 1
        self.most = max(self.most, self.running)
        try:
            await self.go.wait()
        finally:
            self.running -= 1


@pytest.mark.asyncio
async def test_the_worker_keeps_two_loads_in_flight_in_hint_order(prefetcher) -> None:
    # One load at a time left the disk idle while each read's result went back to the loop and the
    # next one's room was found. Two run at once, taken in the order hinted; a third waits for one.
    from tierd import prefetch

    pf, m, cid = prefetcher
    fake = _Placement(m.ram)
    pf.placement = fake
    keys = [f"p/{i}" for i in range(4)]
    assert pf.hint(cid, keys) == 4
    worker = asyncio.create_task(pf.run())
    try:
        for _ in range(50):
            await asyncio.sleep(0)
        assert fake.started == keys[: prefetch.LOADS_AT_ONCE] and fake.running == prefetch.LOADS_AT_ONCE
        fake.go.set()
        for _ in range(50):
            await asyncio.sleep(0)
        assert fake.started == keys and fake.running == 0 and fake.most == prefetch.LOADS_AT_ONCE
        assert pf.status()["loading"] == 0 and pf._loading_bytes == 0
    finally:
        worker.cancel()
        with pytest.raises(asyncio.CancelledError):
            await worker
