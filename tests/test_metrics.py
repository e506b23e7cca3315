"""The counters' one owner: names that users read stay, every counter says what it counts, status
shows exactly the registry (the GPU tier's counters only where there is one), and the code paths
count through it (a scripted get and release)."""

from __future__ import annotations

from tierd.entry import PutArgs
from tierd.manager import Manager
from tierd.metrics import GPU_COUNTERS, HELP, NAMES, Metrics
from tierd.tiers.ram import RamTier

#: counters that users' scripts, tierctl and the docs name: renaming one breaks them
PUBLIC = ("gets", "hits_ram", "reads_disk", "prefetch_issued", "prefetch_used", "demotions",
          "promotions", "puts", "releases", "bad_releases", "expired", "prefetch_hints",
          "prefetch_hinted", "internal_errors", "pressure_released_bytes", "stall_us",
          "hits_gpu")  # fmt: skip


def test_public_names_stay_and_every_counter_says_what_it_counts() -> None:
    assert set(PUBLIC) <= set(NAMES)
    assert len(set(NAMES)) == len(NAMES)
    assert all(HELP[n] and "\n" not in HELP[n] for n in NAMES)
    assert Metrics().snapshot() == dict.fromkeys(NAMES, 0)


def test_status_counters_are_the_registry_counted_by_the_manager() -> None:
    ram = RamTier(1 << 20)
    metrics = Metrics()
    m = Manager(ram, metrics=metrics)
    try:
        cid = m.add_client(1, 0, "t")
        pid, _ = m.begin_put(cid, PutArgs("t/a", "uint8", [16], 16))
        m.seal(cid, pid)
        [loc] = m.get(cid, [("t/a", 0), ("t/a", pid)])[:1]
        assert m.release(cid, [loc.lease, 999]) == 1
        counters = m.status()["counters"]
        assert set(GPU_COUNTERS) <= set(NAMES)
        assert list(counters) == [n for n in NAMES if n not in GPU_COUNTERS]  # no GPU tier here
        assert (metrics.puts, metrics.gets, metrics.hits_ram, metrics.releases, metrics.bad_releases) == (
            1, 2, 2, 1, 1)  # fmt: skip
        assert counters == {k: v for k, v in metrics.snapshot().items() if k not in GPU_COUNTERS}
        m.check()
    finally:
        ram.close()
