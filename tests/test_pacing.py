"""The prefetch depth chosen from measured compute and read times (model_integration/pacing.py).

Pure: no daemon, no model, no clock. Blocks here are a decoding cycle of ``n`` layers (``after[i] =
i + 1``, the last back to the first) unless said otherwise.
"""

from __future__ import annotations

from tierd_integration.pacing import Pacer, chain, choose_depths

MB = 1 << 20


def cycle(n: int) -> list[int]:
    return [(i + 1) % n for i in range(n)]


def test_chain_stops_where_the_walk_comes_back() -> None:
    assert chain(cycle(4), 2, 2) == [2, 3, 0]
    assert chain(cycle(3), 0, 8) == [0, 1, 2]
    assert chain([1, 1], 0, 5) == [0, 1]  # a block that hints itself: nothing more


def test_reads_hidden_by_one_block_of_compute_keep_the_base_depth() -> None:
    # 10 ms of compute per layer, 4 ms of read: the next layer is read while this one runs
    d = choose_depths([0.010] * 6, [0.004] * 6, [100 * MB] * 6, cycle(6), base=1, cap_bytes=10**12)
    assert d == [1] * 6


def test_the_depth_grows_until_the_lead_covers_the_read() -> None:
    # 10 ms of compute, 25 ms of read: the block hinted 3 ahead has 30 ms of compute before it
    d = choose_depths([0.010] * 8, [0.025] * 8, [100 * MB] * 8, cycle(8), base=1, cap_bytes=10**12)
    assert d == [3] * 8


def test_the_window_never_leaves_the_room() -> None:
    # the same need (3 ahead: 4 blocks of 100 MB), but only 300 MB for the window: 2 blocks ahead
    d = choose_depths([0.010] * 8, [0.025] * 8, [100 * MB] * 8, cycle(8), base=1, cap_bytes=300 * MB)
    assert d == [2] * 8
    # and never below the base, whatever the room (the minimum was sized for it)
    d = choose_depths([0.010] * 8, [0.025] * 8, [100 * MB] * 8, cycle(8), base=2, cap_bytes=0)
    assert d == [2] * 8


def test_a_large_block_is_hinted_early_enough() -> None:
    # five small blocks (5 ms compute, 2 ms read) then a big one read in 12 ms: the block three
    # before it hints it (15 ms ahead), the next one hints it again; the others keep the base
    compute = [0.005] * 5 + [0.005]
    read = [0.002] * 5 + [0.012]
    size = [10 * MB] * 5 + [60 * MB]
    d = choose_depths(compute, read, size, cycle(6), base=1, cap_bytes=10**12)
    assert d == [1, 1, 3, 2, 1, 1]


def test_a_disk_that_cannot_keep_up_gets_the_deepest_window_that_fits() -> None:
    # compute 1 ms, read 100 ms: no depth within 8 covers it; keep as many reads queued as fit
    d = choose_depths([0.001] * 12, [0.1] * 12, [50 * MB] * 12, cycle(12), base=1, cap_bytes=250 * MB)
    assert d == [4] * 12
    # a cycle shorter than the depth: at most every other block
    d = choose_depths([0.001] * 3, [0.1] * 3, [1] * 3, cycle(3), base=1, cap_bytes=10**12)
    assert d == [2] * 3


class _Stats:
    def __init__(self, gbps: float | None) -> None:
        self.gbps = gbps
        self.calls = 0

    def stats(self) -> dict:
        self.calls += 1
        return {"placement": {"calibration": {"disk_read_gbps": self.gbps} if self.gbps else None}}


def test_the_pacer_chooses_after_each_pass_from_the_averages() -> None:
    # 4 blocks of 25 MB at 1 GB/s: 25 ms of read each; measured compute 10 ms -> 3 ahead
    client = _Stats(1.0)
    p = Pacer([25_000_000] * 4, cycle(4), base=1, cap_bytes=10**12, client=client)
    assert [p.depth(i) for i in range(4)] == [1] * 4  # nothing measured yet: the base
    for i in range(4):
        p.stalled(i, 0.05)
        p.computed(i, 0.010)
    assert p.passes == 1 and client.calls == 1
    assert [p.depth(i) for i in range(4)] == [3] * 4
    # compute grows to 30 ms per block (a long prefill): one ahead covers 25 ms
    for _ in range(3):
        for i in range(4):
            p.computed(i, 0.0366667)
    assert [p.depth(i) for i in range(4)] == [1] * 4
    assert client.calls == 1  # the calibration is read once
    s = p.stats()
    assert s["passes"] == 4 and s["forwards"] == 16 and abs(s["stall_s"] - 0.2) < 1e-9


def test_without_a_calibrated_disk_the_pacer_keeps_the_base() -> None:
    p = Pacer([25_000_000] * 4, cycle(4), base=2, cap_bytes=10**12, client=_Stats(None))
    for i in range(4):
        p.computed(i, 0.001)
    assert [p.depth(i) for i in range(4)] == [2] * 4
