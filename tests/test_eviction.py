"""Eviction policies (issue 17, part 2): each one's order on small scripted streams, the learned
model's export, auto's shadow scoring, offline replay, and a real daemon under each --eviction.

No timing is asserted. The learned policy is trained inline (the daemon trains in a child process;
that path is covered by the daemon test, which waits for a fit)."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import wait_until
from tests.test_reload import reload, write_config
from tests.test_tierctl import tierctl
from tierd.policy import NAMES, Policy, make_policy
from tierd.policy.auto import PRIOR_RUNS, START, T_MIN, Auto
from tierd.policy.learned import TRAIN_EVERY, Forest, Learned, boundary_of, train
from tierd.policy.s3fifo import S3FIFO
from tierd.policy.shadow import Shadow, SimItem
from tierd.policy.simulate import replay
from tierd.predict.log import Access
from tierd_client import Client

KIB = 1 << 10


def item(v: int, key: str = "", nbytes: int = KIB, uid: int = 1) -> SimItem:
    return SimItem(key or f"k/{v}", nbytes, [], uid, v)


def order(policy) -> list[int]:
    return [x.version for x in policy.candidates()]


def test_lru_orders_least_recently_read_first() -> None:
    p = make_policy("lru")
    for v in (1, 2, 3, 4):
        p.on_put(v, item(v), new=True)
    p.on_hit(1)  # put 1,2,3,4, read 1 -> 2 goes first, 1 last
    assert order(p) == [2, 3, 4, 1]
    p.on_remove(3)
    assert order(p) == [2, 4, 1] and len(p) == 3


def test_s3fifo_lets_read_once_entries_go_before_reread_ones() -> None:
    p = S3FIFO()
    for v in (1, 2):
        p.on_put(v, item(v), new=True)
        p.on_hit(v)
        p.on_hit(v)
    for v in range(10, 30):  # a scan of entries put and never read
        p.on_put(v, item(v), new=True)
    first = order(p)
    assert first[:20] == list(range(10, 30)), first  # the scan goes first, oldest first
    assert set(first[20:]) == {1, 2}
    # out of the probation queue into the ghost list: when it comes back, it goes to the main queue
    p.on_remove(10)
    p.on_put(10, item(10))
    for v in range(30, 60):
        p.on_put(v, item(v), new=True)
    assert order(p).index(10) > order(p).index(59)


def test_s3fifo_main_queue_gives_a_read_entry_another_round() -> None:
    p = S3FIFO()
    for v in range(1, 11):  # all re-read while in probation: all move to the main queue
        p.on_put(v, item(v), new=True)
        p.on_hit(v)
    assert order(p)[0] == 1  # settled: each was moved once, frequency reset
    p.on_hit(1)
    assert order(p)[0] == 2  # 1 was read again: passed over once, back at the tail


def dead_and_hot(n: int, seed: int = 0) -> list[Access]:
    """A stream where "hot/" keys come back every ~40 references and "dead/" keys, put then read
    once, never come back."""
    rng = random.Random(seed)
    out, t = [], 0.0
    dead = 0
    for _ in range(n):
        t += 0.001
        if rng.random() < 0.5:
            dead += 1
            out.append(Access(t, 2, f"dead/{dead}", "put", "-", 4 * KIB))
            out.append(Access(t, 2, f"dead/{dead}", "get", "ram", 4 * KIB))
        else:
            out.append(Access(t, 1, f"hot/{rng.randrange(20)}", "get", "ram", 4 * KIB))
    return out


def refs(trace: list[Access]) -> list[tuple]:
    return [(a.t, a.key, a.nbytes, 0, a.client, a.op) for a in trace]


def test_learned_puts_predicted_dead_entries_first_once_trained() -> None:
    model = train(refs(dead_and_hot(6000)), capacity=30 * 4 * KIB)
    assert model is not None and model["boundary"] >= 64
    clock = iter(range(10**9))
    p = Learned(capacity=30 * 4 * KIB, clock=lambda: float(next(clock)) * 0.001)
    sim, lru = Shadow(p, capacity=1 << 40), Shadow(make_policy("lru"), capacity=1 << 40)
    for a in dead_and_hot(400, seed=1):
        sim.ref(a.key, a.nbytes, [], a.client, a.op)
        lru.ref(a.key, a.nbytes, [], a.client, a.op)
    assert [x.key for x in p.candidates()] == [x.key for x in lru.policy.candidates()]  # no model: LRU
    p.install(model)
    ranked = [x.key for x in p.candidates()]
    top = ranked[:16]
    assert sum(k.startswith("dead/") for k in top) >= 14, top
    assert p.stats()["dead_first"] >= 1


def test_forest_export_predicts_what_scikit_learn_does() -> None:
    from sklearn.ensemble import HistGradientBoostingRegressor

    rng = np.random.default_rng(7)
    x = rng.normal(size=(2000, 6))
    x[rng.random(x.shape) < 0.2] = np.nan  # missing values take the learned side
    y = np.nansum(x[:, :2], axis=1) + rng.normal(size=2000) * 0.1
    m = HistGradientBoostingRegressor(max_iter=20, early_stopping=False, random_state=0).fit(x, y)
    probe = rng.normal(size=(64, 6))
    probe[rng.random(probe.shape) < 0.2] = np.nan
    assert np.allclose(Forest(m).predict(probe), m.predict(probe))


def test_boundary_is_twice_the_lru_eviction_age() -> None:
    # 1000 distinct 1 KiB keys in a cycle: 100 KiB of capacity is touched in 100 references
    big = [(float(i), f"k/{i % 1000}", KIB, 0, 1, "get") for i in range(4000)]
    assert boundary_of(big, 100 * KIB) == 200
    # 10 keys never fill 40 KiB: nothing would be evicted, the boundary is half the history
    cyc = [(float(i), f"k/{i % 10}", KIB, 0, 1, "get") for i in range(400)]
    assert boundary_of(cyc, 40 * KIB) == 200


def loop_stream(n_keys: int, rounds: int) -> list[tuple[str, int, str]]:
    return [(f"loop/{i}", KIB, "get") for _ in range(rounds) for i in range(n_keys)]


def hot_and_scan(hot: int, rounds: int) -> list[tuple[str, int, str]]:
    """Each hot key read twice in a row, then the hot keys in a loop, each read followed by a key
    read once and never again."""
    out = [(f"hot/{i}", KIB, "get") for i in range(hot) for _ in range(2)]
    for j in range(rounds * hot):
        out += [(f"hot/{j % hot}", KIB, "get"), (f"scan/{j}", KIB, "get")]
    return out


def test_auto_follows_the_policy_with_the_lower_shadow_miss_ratio() -> None:
    # 30 hot keys, 40 KiB: under LRU the read-once keys push every hot key out before it returns;
    # S3-FIFO keeps the hot ones in its main queue and lets the others go through the small one
    cap = 40 * KIB
    p = Auto(capacity=cap, candidates=("lru", "s3fifo"), start="lru", sync=True, batch=64)
    assert p.using == "lru"  # the start given, until evidence
    for v, (key, n, _op) in enumerate(hot_and_scan(30, 40)):
        p.on_put(v, item(v, key, n), new=False)
        p.on_hit(v)
        p.on_remove(v)  # the real tier is not what is scored here: the shadows are
    scores = p.scores()
    assert scores["lru"] is not None and scores["lru"] > 0.95, scores
    assert scores["s3fifo"] is not None and scores["s3fifo"] < 0.6, scores
    assert p.using == "s3fifo" and p.switches == 1
    st = p.stats()
    assert st["using"] == "s3fifo" and st["scores"]["lru"]["byte_miss_ratio"] > 0.95


def test_auto_stays_with_lru_when_nothing_beats_it() -> None:
    p = Auto(capacity=100 * KIB, candidates=("lru", "s3fifo"), start="lru", sync=True, batch=25)
    for v, (key, n, _op) in enumerate(loop_stream(50, 40)):  # everything fits: all policies equal
        p.on_put(v, item(v, key, n))
        p.on_hit(v)
        p.on_remove(v)
    assert p.using == "lru" and p.switches == 0


def test_shadow_recent_is_over_the_last_gets_and_restarts_with_its_window() -> None:
    sh = Shadow(make_policy("lru"), capacity=2 * KIB, window=4)
    for key in ("a", "b", "a", "c", "a", "b"):  # miss miss hit miss hit miss
        sh.ref(key, KIB, [], 1, "get")
    assert sh.recent_gets == 4 and sh.recent(4) == (4 * KIB, 2 * KIB)  # a c a b
    assert sh.recent(2) == (2 * KIB, KIB) and sh.recent(99) == sh.recent(4)
    assert sh.recent_byte_miss_ratio() == 0.5 and sh.recent_requested == 4 * KIB
    sh.reset_window()
    assert sh.recent_gets == 0 and sh.recent(3) == (0, 0) and sh.recent_byte_miss_ratio() is None
    sh.ref("b", KIB, [], 1, "get")
    assert sh.recent(5) == (KIB, 0) and sh.byte_miss_ratio() == 4 / 7


def test_auto_compares_a_restarted_candidate_only_over_the_gets_since() -> None:
    """A candidate whose window restarted (the learned one at an install) is compared with the one
    followed over the same gets, and only once those are min_batches runs; the others do not wait
    on it."""
    cap = 40 * KIB
    p = Auto(capacity=cap, candidates=("lru", "s3fifo"), start="lru", sync=True, batch=64, min_batches=8)
    stream = hot_and_scan(30, 40)

    def feed(lo: int, hi: int) -> None:
        for v in range(lo, hi):
            key, n, _op = stream[v]
            p.on_put(v, item(v, key, n), new=False)
            p.on_hit(v)
            p.on_remove(v)

    feed(0, 400)
    assert p.using == "lru"
    p.shadows["s3fifo"].reset_window()  # as at an install: scored from here on
    feed(400, 899)
    assert p.shadows["lru"].recent_gets == 899 and p.shadows["s3fifo"].recent_gets == 499
    assert p.using == "lru"  # 499 gets of its own: not yet 8 runs of 64 gets, not yet evidence
    feed(899, 1400)
    assert p.using == "s3fifo" and p.switches == 1


def test_auto_does_not_count_misses_before_a_restart_against_the_one_followed() -> None:
    # everything fits: the first round's misses are every policy's; a candidate scored only since
    # after them must not look better than LRU scored over them too
    p = Auto(capacity=100 * KIB, candidates=("lru", "s3fifo"), start="lru", sync=True, batch=25)
    for v, (key, n, _op) in enumerate(loop_stream(50, 40)):
        if v == 50:
            p.shadows["s3fifo"].reset_window()
        p.on_put(v, item(v, key, n))
        p.on_hit(v)
        p.on_remove(v)
    assert p.scores()["lru"] == 50 / 2000 and p.scores()["s3fifo"] == 0.0
    assert p.using == "lru" and p.switches == 0


class Coin(Policy):
    """Evicts a resident copy drawn at random (seeded): two of them have equal means and noise."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.items: dict[int, SimItem] = {}

    def on_put(self, version: int, item: SimItem, new: bool = False) -> None:
        self.items[version] = item

    def on_hit(self, version: int) -> None:
        pass

    def on_remove(self, version: int) -> None:
        self.items.pop(version, None)

    def candidates(self):
        order = list(self.items.values())
        self.rng.shuffle(order)
        return iter(order)

    def __len__(self) -> int:
        return len(self.items)


def feed(p: Auto, stream: list[tuple[str, int, str]], start: int = 0) -> int:
    for v, (key, n, _op) in enumerate(stream, start):
        p.on_put(v, item(v, key, n), new=False)
        p.on_hit(v)
        p.on_remove(v)  # the real tier is not what is scored here: the shadows are
    return start + len(stream)


def test_auto_does_not_switch_on_noise_with_equal_means() -> None:
    # both shadows evict at random (other seeds): their miss ratios differ get by get, not on
    # average. The rule bounds, not excludes, a switch on such noise: over 24 runs of 30,000 gets
    # like this one (other seeds), the largest t of a run passed 2.5 in 4 (3.0 in 2); this run's
    # largest is 1.9, a typical one. What the test checks is that such a t does not move it, and
    # that without the threshold the same noise does.
    rng = random.Random(2)
    stream = [(f"z/{rng.randrange(80)}", KIB, "get") for _ in range(30000)]
    cap = 40 * KIB
    results = {}
    for t_min in (T_MIN, 0.0):  # the stated threshold, and none (a positive mean alone)
        p = Auto(capacity=cap, candidates=("lru", "s3fifo"), start="lru", sync=True, t_min=t_min)
        p.shadows = {n: Shadow(Coin(seed), cap, p.window) for n, seed in (("lru", 21), ("s3fifo", 22))}
        feed(p, stream)
        results[t_min] = p.switches
        ev = p.stats()["evidence"]
        assert any(e["t"] is not None for e in ev.values()), ev  # tested, on enough runs
    assert results[T_MIN] == 0, results
    assert results[0.0] > 0, results  # without the test, noise alone moves it: the test has teeth


def test_a_significant_lead_smaller_than_the_switch_cost_over_the_horizon_does_not_switch() -> None:
    cap = 40 * KIB
    stream = hot_and_scan(30, 40)
    short = Auto(capacity=cap, candidates=("lru", "s3fifo"), start="lru", sync=True, batch=64, horizon=8)
    feed(short, stream)
    ev = short.stats()["evidence"]["s3fifo"]
    assert ev["t"] >= short.t_min and ev["lead"] > 0.3, ev  # S3-FIFO leads, significantly
    assert ev["gain_bytes"] < ev["switch_bytes"] and not ev["switch"], ev  # 8 gets do not pay for it
    assert short.using == "lru" and short.switches == 0
    # the same lead over the default horizon pays for the switch
    full = Auto(capacity=cap, candidates=("lru", "s3fifo"), start="lru", sync=True, batch=64)
    feed(full, stream)
    assert full.using == "s3fifo" and full.switches == 1
    last = full.stats()["last_switch"]
    assert last["from"] == "lru" and last["gain_bytes"] > last["switch_bytes"] > 0, last


def zipf(n_keys: int, n: int, seed: int) -> list[tuple[str, int, str]]:
    """Reads of ``n_keys`` keys with Zipf popularity (s = 1), like the vision workload's images."""
    rng = random.Random(seed)
    weights = [1 / (i + 1) for i in range(n_keys)]
    return [(f"img/{k}", KIB, "get") for k in rng.choices(range(n_keys), weights=weights, k=n)]


def test_a_sparse_but_real_lead_switches() -> None:
    # half of 400 Zipf-popular keys fit: most gets hit or miss in both shadows, S3-FIFO misses a few
    # of LRU's misses less, steadily (a lead of under 10% at a miss ratio of about 16%)
    cap = 200 * KIB
    stream = zipf(400, 6000, seed=1)
    p = Auto(capacity=cap, candidates=("lru", "s3fifo"), start="lru", sync=True)
    feed(p, stream)
    lru, s3 = p.shadows["lru"], p.shadows["s3fifo"]
    assert s3.missed < lru.missed < 0.2 * lru.requested and lru.missed - s3.missed < 0.1 * lru.missed
    discordant = p._q[("lru", "s3fifo")][-1] / KIB**2  # gets one shadow missed and the other hit
    assert discordant < 0.08 * 6000, discordant  # sparse: the test has few gets to go on
    assert p.using == "s3fifo" and p.switches == 1, p.stats()["evidence"]
    last = p.stats()["last_switch"]
    assert last["t"] >= p.t_min and last["batches"] >= p.min_batches and last["dispersion"] is not None


def chat_refs() -> list:
    """The references of the committed chat recording (``bench/traces/chat.jsonl.zst``)."""
    import json

    import zstandard

    from tierd.policy.simulate import refs_of
    from tierd.predict.log import from_row

    raw = (Path(__file__).resolve().parent.parent / "bench/traces/chat.jsonl.zst").read_bytes()
    text = zstandard.ZstdDecompressor().decompress(raw).decode()
    return refs_of([from_row(json.loads(line)) for line in text.splitlines() if line])


def test_bursts_of_discordant_gets_count_as_bursts() -> None:
    """The independence variance (the discordant gets' squared bytes) alone is the McNemar test; it
    takes correlated bursts of discordant gets for evidence. On the recorded chat workload at a
    quarter of its footprint, LRU's shadow misses a third of what S3-FIFO's does over the second
    half, yet early on S3-FIFO leads in bursts: with the run sums' own variance weighed in, auto
    stays with LRU; with the independence variance alone it follows S3-FIFO."""
    refs = chat_refs()
    sizes: dict[str, int] = {}
    for _t, key, n, _tags, _o, _op in refs:
        sizes[key] = n
    cap = sum(sizes.values()) // 4
    switched = {}
    for prior in (PRIOR_RUNS, 1e12):  # the rule's weight, and the independence variance alone
        p = Auto(capacity=cap, candidates=("lru", "s3fifo"), start="lru", sync=True, prior=prior)
        live = Shadow(p, cap)
        for _t, key, n, tags, owner, op in refs[: len(refs) // 2]:
            live.ref(key, n, list(tags), owner, op)
        switched[prior] = p.switches
        if prior == PRIOR_RUNS:
            disp = p.stats()["evidence"]["s3fifo"]["dispersion"]
            assert disp is not None and disp > 4, disp  # the run sums vary far more than independence says
    assert switched[PRIOR_RUNS] == 0 and switched[1e12] > 0, switched


def reread_after(n: int, gap: int) -> list[tuple[str, int, str]]:
    """Each new key read, then read again ``gap`` reads later: LRU keeps it when the cache holds
    about 2 x gap keys; S3-FIFO has let it go from its small queue by then."""
    out = []
    for i in range(n):
        out.append((f"re/{i}", KIB, "get"))
        if i >= gap:
            out.append((f"re/{i - gap}", KIB, "get"))
    return out


def test_switching_back_needs_the_same_evidence() -> None:
    cap = 40 * KIB
    p = Auto(capacity=cap, candidates=("lru", "s3fifo"), start="lru", sync=True, batch=64)
    at = feed(p, hot_and_scan(30, 40))
    assert p.using == "s3fifo" and p.switches == 1
    to_s3 = p.stats()["last_switch"]
    back = reread_after(3000, 12)
    at2 = feed(p, back, at)
    assert p.using == "lru" and p.switches == 2, p.stats()
    last = p.stats()["last_switch"]
    assert last["from"] == "s3fifo" and last["to"] == "lru"
    for ev in (to_s3, last):  # both ways: enough runs, significant, worth the switch's cost
        assert ev["batches"] >= p.min_batches and ev["t"] >= p.t_min and ev["gain_bytes"] > ev["switch_bytes"]
    # not before its own evidence: at least min_batches runs of gets after the pattern changed
    assert last["at_get"] - to_s3["at_get"] >= p.min_batches * p.batch
    assert at2 > at


def test_auto_starts_with_s3fifo_and_leaves_it_where_lru_leads_by_much() -> None:
    """The default start: S3-FIFO, whose loss when it is the wrong one is large and soon seen. Each
    key read again 12 reads later: LRU (40 keys) keeps it, S3-FIFO's small queue (a tenth) has let
    it go, so S3-FIFO misses every get and LRU half of them."""
    p = Auto(capacity=40 * KIB, candidates=("lru", "s3fifo"), sync=True)
    assert p.using == START == "s3fifo"
    feed(p, reread_after(3000, 12))
    assert p.using == "lru" and p.switches == 1, p.stats()["evidence"]
    last = p.stats()["last_switch"]
    assert last["from"] == "s3fifo" and last["batches"] == p.min_batches, last  # at its first test
    with pytest.raises(ValueError, match="start"):
        Auto(capacity=KIB, candidates=("lru", "s3fifo"), start="learned")
    with pytest.raises(ValueError, match="start"):
        Auto(capacity=KIB, candidates=("lru", "learned"))  # the default start is not a candidate


def test_on_the_recorded_chat_workload_auto_leaves_s3fifo_before_the_half() -> None:
    """The recorded chat workload at a quarter of its footprint, where LRU misses a third of what
    S3-FIFO does: started with S3-FIFO, auto follows LRU well before the split the replay measures
    from, and stays."""
    refs = chat_refs()
    sizes = {key: n for _t, key, n, _tags, _o, _op in refs}
    cap = sum(sizes.values()) // 4
    p = Auto(capacity=cap, candidates=("lru", "s3fifo"), sync=True)
    live = Shadow(p, cap)
    for _t, key, n, tags, owner, op in refs[: len(refs) // 2]:
        live.ref(key, n, list(tags), owner, op)
    assert p.using == "lru" and p.switches == 1, p.stats()["evidence"]
    gets = sum(op == "get" for *_r, op in refs[: len(refs) // 2])
    assert p.stats()["last_switch"]["at_get"] < gets // 2, (p.stats()["last_switch"], gets)


def evicted_after_switch(converge: bool) -> tuple[set[str], list[str]]:
    """What the live tier held at the first switch and the followed shadow did not, and the keys the
    live tier evicted after it (oldest first)."""
    cap = 40 * KIB
    p = Auto(capacity=cap, candidates=("lru", "s3fifo"), start="lru", sync=True, batch=64, converge=converge)
    live = Shadow(p, cap)  # the real tier, as replay runs it
    stale: set[str] | None = None
    gone: list[str] = []
    for key, n, op in hot_and_scan(30, 40):
        before = {it.key for it in live.resident.values()}
        if stale is None and p.switches:  # the switch was made on the references so far
            stale = {k for k in before if not p.shadows[p.using].holds(k)}
        live.ref(key, n, [], 1, op)
        if stale is not None:
            gone += sorted(before - {it.key for it in live.resident.values()})
    assert stale is not None and p.using == "s3fifo"
    return stale, gone


def test_after_a_switch_the_live_copies_the_followed_shadow_lacks_go_first() -> None:
    stale, gone = evicted_after_switch(converge=True)
    assert len(stale) >= 5, stale  # LRU and S3-FIFO held different things at the switch
    assert set(gone[: len(stale)]) <= stale, (stale, gone[: len(stale)])
    assert len(gone) > 2 * len(stale)  # and it went on evicting after them


def test_replay_trains_on_the_first_part_and_scores_the_rest() -> None:
    trace = dead_and_hot(6000)
    res = {r.policy: r for r in replay(trace, 30 * 4 * KIB, train_fraction=0.5)}
    assert set(res) == {"lru", "s3fifo", "learned", "auto"}
    gets = sum(a.op == "get" for a in trace[len(trace) // 2 :])
    # auto observed the whole trace, as a daemon observes everything from start-up: its shadows
    # scored the training half too; only the second half is counted
    assert res["auto"].detail["scores"]["lru"]["gets"] == sum(a.op == "get" for a in trace)
    for r in res.values():
        assert 0.0 <= r.byte_miss_ratio <= 1.0
        assert abs(r.gets - gets) < 200  # the evaluation half only
    # hot keys are pushed out by dead ones under LRU; the model learns that dead/ never returns
    assert res["learned"].byte_miss_ratio < res["lru"].byte_miss_ratio * 0.9
    assert (
        res["auto"].byte_miss_ratio <= min(res["lru"].byte_miss_ratio, res["s3fifo"].byte_miss_ratio) * 1.02
    )


@pytest.mark.parametrize("name", NAMES)
def test_daemon_runs_with_each_eviction_policy(start_daemon, name: str) -> None:
    """A 4 MiB RAM tier and 48 entries of 256 KiB read in a loop: every read returns what was put,
    entries are demoted and read back, and status names the policy."""
    d = start_daemon("--eviction", name, ram_bytes="4MiB", disk_bytes="64MiB")
    with Client(str(d.socket)) as c:
        for i in range(48):
            c.put(f"ev/{i}", torch.full((64 * KIB,), float(i)))
        for r in range(3):
            for i in range(48):
                t = c.get(f"ev/{i}")
                assert bool((t == float(i)).all()), (name, r, i)
                c.release(t)
        s = c.stats()
        assert s["counters"]["demotions"] > 0 and s["counters"]["reads_disk"] > 0
        assert s["eviction"]["name"] == name
        if name == "auto":
            assert s["eviction"]["using"] in ("lru", "s3fifo", "learned")
            assert set(s["eviction"]["scores"]) == {"lru", "s3fifo", "learned"}
        assert s["eviction_training"]["failures"] == 0
    out = tierctl(d.socket, "status").stdout
    line = next(x for x in out.splitlines() if x.startswith("eviction: "))
    assert line.startswith(f"eviction: {name}"), out
    if name == "auto":  # which one it follows, and why: each candidate's shadow byte miss ratio
        assert " following " in line and "byte miss ratio" in line and "s3fifo " in line, line
        # the switching test as it stands (144 gets: under the first batch of references scored)
        assert "a switch needs t >= 2.5 over >= 8 runs" in line and "not tested yet" in line, line
    assert "Traceback" not in d.log()


def test_learned_policy_is_trained_in_the_background_of_a_real_daemon(start_daemon) -> None:
    """Past TRAIN_EVERY references the daemon fits the model in a child process and installs it;
    the reads go on returning what was put meanwhile."""
    d = start_daemon("--eviction", "learned", ram_bytes="4MiB", disk_bytes="64MiB")
    rng = random.Random(3)
    with Client(str(d.socket)) as c:
        for i in range(64):
            c.put(f"tr/{i}", torch.full((16 * KIB,), float(i)))
        for _ in range(TRAIN_EVERY + 200):
            i = min(63, int(rng.paretovariate(1.0)) - 1)
            t = c.get(f"tr/{i}")
            assert float(t[0]) == float(i)
            c.release(t)
        wait_until(lambda: c.stats()["eviction"]["trained"] >= 1, timeout=90, what="a fitted eviction model")
        s = c.stats()
        assert s["eviction_training"]["fits"] >= 1 and s["eviction_training"]["failures"] == 0
        for i in range(64):  # demotions now ranked by the model: the data is intact
            t = c.get(f"tr/{i}")
            assert bool((t == float(i)).all())
            c.release(t)
    assert "Traceback" not in d.log()


def test_a_reload_changes_the_eviction_policy_live_and_keeps_the_entries(
    short_tmp: Path, start_daemon
) -> None:
    cfg = short_tmp / "tierd.toml"
    write_config(cfg, eviction="lru")
    d = start_daemon("--config", str(cfg), ram_bytes="4MiB", disk_bytes="64MiB")
    with Client(str(d.socket)) as c:
        for i in range(32):
            c.put(f"rl/{i}", torch.full((64 * KIB,), float(i)))
        held = c.get("rl/31")
        assert c.stats()["eviction"]["name"] == "lru"
        write_config(cfg, eviction="s3fifo")
        reload(d)
        s = c.stats()
        assert s["eviction"]["name"] == "s3fifo" and s["eviction"]["entries"] > 0
        assert s["reload"]["last"]["applied"]["eviction"] == {"from": "lru", "to": "s3fifo"}
        for i in range(32):  # demotions and promotions under the new order; the lease is kept
            t = c.get(f"rl/{i}")
            assert bool((t == float(i)).all())
            c.release(t)
        assert bool((held == 31.0).all())
        c.release(held)
    assert "Traceback" not in d.log()


def test_a_shadow_cache_forgets_old_keys_on_an_endless_stream_of_new_ones() -> None:
    """A daemon that runs for weeks sees new keys forever (KV blocks): the shadow's key table stays
    bounded, and what it keeps still scores the recent stream."""
    from tierd.policy.shadow import MAX_KEYS

    sh = Shadow(make_policy("lru"), capacity=100 * KIB)
    for i in range(2 * MAX_KEYS + 100):
        sh.ref(f"kv/{i}", KIB, [], 1, "put")
        assert sh.ref(f"kv/{i}", KIB, [], 1, "get") is True
    assert len(sh.current) <= MAX_KEYS and len(sh.resident) == 100
    assert sh.byte_miss_ratio() == 0.0


@pytest.mark.asyncio
async def test_the_unread_prefetch_loaded_last_goes_first_under_a_non_lru_order(tmp_path: Path) -> None:
    """Placement.victim's last resort (nothing but unread prefetches left in RAM) takes the one
    loaded last, by the load's sequence number: under S3-FIFO the policy's order is not load order
    (a version remembered in the ghost list goes to the main queue, the others to the small one)."""
    from tests.test_tiers import put
    from tierd.config import Config
    from tierd.manager import Manager
    from tierd.placement import Placement
    from tierd.tiers import registry

    cfg = Config(ram_bytes="4MiB", disk_bytes="64MiB", state_dir=str(tmp_path / "state"))
    tiers = registry.build(cfg)
    m = Manager(*tiers, eviction="s3fifo")  # type: ignore[arg-type]
    pl = Placement(m)
    try:
        cid = m.add_client(1, 0, "t")
        await put(m, pl, cid, "w/x", 1)
        await put(m, pl, cid, "w/y", 2)
        # y: out of the small queue (into the ghost list), read back (ghost: main queue), out of
        # the main queue (not into the ghost list); x: out of the small queue, into the ghost list
        await pl.evict("w/y")
        await pl.get(cid, [m.resolve("w/y")])
        m.release(cid, list(m.clients[cid].leases))
        await pl.evict("w/y")
        await pl.evict("w/x")
        x, y = m.resolve("w/x"), m.resolve("w/y")
        assert x.tiers == ["disk"] and y.tiers == ["disk"]
        await pl.load(x, for_prefetch=True)  # in the ghost list: the main queue
        await pl.load(y, for_prefetch=True)  # loaded last: the small queue
        m.check()
        assert x.prefetched and y.prefetched and y.loaded_seq > x.loaded_seq
        # the policy's own order does not say which was loaded last: y's queue is evicted first
        assert [e.key for e in m.policies["ram"].candidates()] == ["w/y", "w/x"]
        assert pl.victim(take_prefetched=False) is None  # unread prefetches are kept...
        assert pl.victim(take_prefetched=True) is y  # ...unless a demand read needs the room
    finally:
        await pl.close()
        for t in tiers:
            t.close()
