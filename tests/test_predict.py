"""Access prediction (tierd.predict): the access log and trace files, each predictor on small
synthetic logs, and the offline replay.

Everything is seeded and offline (no daemon): no sleeps, no timing assertions.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from tierd.predict import PREDICTOR_NAMES, Access, AccessLog, make_predictor
from tierd.predict.auto import AutoPredictor
from tierd.predict.base import Predictor
from tierd.predict.learned import FEATURES, LearnedModel, LearnedPredictor
from tierd.predict.log import from_row, read_trace, to_row, write_trace
from tierd.predict.sequence import SequencePredictor
from tierd.predict.simulate import ReplayResult, format_result, replay
from tierd.predict.traces import (
    SCENARIO_NAMES,
    Scenario,
    cyclic,
    interleaved,
    make_scenario,
    recorded,
    uniform_random,
    vision,
    with_hints,
)

MIB = 1 << 20


def get(key: str, t: float = 0.0, client: int = 1, nbytes: int = MIB, tier: str = "disk") -> Access:
    return Access(t, client, key, "get", tier, nbytes)


def feed(p: Predictor, keys: list[str], client: int = 1, t0: float = 0.0) -> None:
    for i, k in enumerate(keys):
        p.observe(get(k, t0 + i * 0.01, client))


# -- the access log ---------------------------------------------------------------------------------


def test_log_is_a_bounded_ring() -> None:
    log = AccessLog(capacity=4)
    for i in range(10):
        log.append(get(f"k{i}", t=float(i)))
    assert len(log) == 4 and log.total == 10
    assert [a.key for a in log.snapshot()] == ["k6", "k7", "k8", "k9"]
    assert [a.key for a in log] == ["k6", "k7", "k8", "k9"]
    with pytest.raises(ValueError):
        AccessLog(capacity=0)


def test_log_since_is_strictly_after() -> None:
    log = AccessLog(capacity=5)
    for i in range(8):  # wrapped: holds t = 3..7
        log.append(get(f"k{i}", t=float(i)))
    assert [a.t for a in log.since(5.0)] == [6.0, 7.0]
    assert [a.t for a in log.since(5.5)] == [6.0, 7.0]
    assert [a.t for a in log.since(-1.0)] == [3.0, 4.0, 5.0, 6.0, 7.0]
    assert log.since(7.0) == []


def test_log_recent_hit_rate_counts_gets_only() -> None:
    log = AccessLog(capacity=100)
    assert log.recent_hit_rate() is None
    log.append(Access(0.0, 1, "p", "put", "-", MIB))
    assert log.recent_hit_rate() is None
    for i, tier in enumerate(["disk", "disk", "ram", "ram", "ram", "ram"]):
        log.append(get(f"k{i}", t=float(i), tier=tier))
        log.append(Access(float(i), 1, f"h{i}", "hint", "-", 0))
    assert log.recent_hit_rate() == pytest.approx(4 / 6)
    assert log.recent_hit_rate(n=4) == 1.0
    assert log.recent_hit_rate(n=5) == pytest.approx(4 / 5)


# -- wire rows and trace files ----------------------------------------------------------------------


def test_rows_round_trip_and_refuse_bad_rows() -> None:
    a = Access(1.5, 3, "ns/w", "get", "ram", 1024, ("weight", "llm"))
    assert from_row(to_row(a)) == a
    assert from_row(json.loads(json.dumps(to_row(a)))) == a
    assert from_row([1, 3, "ns/w", "put", "-", 0]) == Access(1.0, 3, "ns/w", "put", "-", 0, ())
    for bad in (
        "x",
        [1.0, 3, "ns/w", "get"],
        [1.0, 3, "ns/w", "read", "ram", 1],
        [1.0, 3, "ns/w", "get", "cloud", 1],
        [1.0, "3", "ns/w", "get", "ram", 1],
        [1.0, 3, "", "get", "ram", 1],
        [1.0, 3, "ns/w", "get", "ram", -1],
        [1.0, 3, "ns/w", "get", "ram", 1, [2]],
    ):
        with pytest.raises(ValueError):
            from_row(bad)


def test_a_recorded_trace_becomes_a_scenario_sized_like_the_others(tmp_path: Path) -> None:
    s = cyclic(1, layers=3, weights_per_layer=2, steps=4)
    path = tmp_path / "rec.jsonl"
    write_trace(path, s.trace)
    r = recorded(path)
    assert r.name == "rec.jsonl" and len(r.trace) == len(s.trace)
    assert r.working_set_bytes == s.working_set_bytes and r.ram_bytes == int(s.working_set_bytes / 1.5)
    res = replay(r.trace, make_predictor("sequence"), ram_bytes=r.ram_bytes,
                 prefetch_budget_bytes=r.prefetch_budget_bytes)  # fmt: skip
    assert res.accesses == s_gets(s) and res.hit_rate > 0.5  # a cycle: sequence learns it
    puts_only = tmp_path / "puts.jsonl"
    write_trace(puts_only, [Access(0.0, 1, "k", "put", "-", MIB)])
    with pytest.raises(ValueError, match="no reads"):
        recorded(puts_only)


def s_gets(s: Scenario) -> int:
    return sum(a.op == "get" for a in s.trace)


def test_trace_file_round_trip_and_append(tmp_path: Path) -> None:
    s = cyclic(1, layers=2, weights_per_layer=2, steps=3)
    path = tmp_path / "t.jsonl"
    assert write_trace(path, s.trace[:5]) == 5
    write_trace(path, s.trace[5:], append=True)
    lines = path.read_text().splitlines()
    assert json.loads(lines[0]) == {"tierd_trace": 1}
    assert sum("tierd_trace" in ln for ln in lines) == 1
    back = read_trace(path)
    assert [(a.key, a.op, a.nbytes, a.tags) for a in back] == [
        (a.key, a.op, a.nbytes, a.tags) for a in s.trace
    ]
    assert [a.t for a in back] == pytest.approx([a.t for a in s.trace])
    write_trace(path, [])  # a header and nothing else: an empty trace
    assert read_trace(path) == []


def test_trace_file_bad_line_names_its_number(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    write_trace(path, [get("a"), get("b")])
    with open(path, "a") as f:
        f.write('{"t": 1, "client": 1, "key": "c", "op": "fly"}\n')
    with pytest.raises(ValueError, match=r"line 4: op must be"):
        read_trace(path)
    path.write_text('{"tierd_trace": 1}\n{"t": 0, "client": 1, "key": "a", "op": "get"}\nnot json\n')
    with pytest.raises(ValueError, match=r"line 3: not JSON"):
        read_trace(path)
    path.write_text('{"t": 0, "client": 1, "key": "a", "op": "get"}\n')
    with pytest.raises(ValueError, match=r"line 1: not a tierd trace"):
        read_trace(path)
    path.write_text('{"tierd_trace": 1}\n{"t": 0, "key": "a", "op": "get"}\n')
    with pytest.raises(ValueError, match=r"line 2: missing client"):
        read_trace(path)


# -- predictors -------------------------------------------------------------------------------------


def test_make_predictor_and_none() -> None:
    assert PREDICTOR_NAMES == ("none", "sequence", "learned", "auto")
    for name in PREDICTOR_NAMES:
        p = make_predictor(name)
        assert p.name == name
        assert isinstance(p.stats(), dict)
    with pytest.raises(ValueError, match="unknown predictor"):
        make_predictor("oracle")
    p = make_predictor("none")
    feed(p, ["a", "b", "c"] * 5)
    assert p.predict(get("a"), 4) == []
    assert not p.wants_training()


def test_a_predictor_registers_itself_by_name(monkeypatch: pytest.MonkeyPatch) -> None:
    from tierd.predict import base

    monkeypatch.setattr(base, "_REGISTRY", dict(base._REGISTRY))  # this test's registrations go with it

    @base.register
    class Echo(Predictor):
        name = "echo"

        def __init__(self, *, k: int = 1) -> None:
            self.k = k

    p = make_predictor("echo", k=3)
    assert isinstance(p, Echo) and p.k == 3 and base.predictor_names()[-1] == "echo"

    class Impostor(Predictor):
        name = "sequence"

    with pytest.raises(ValueError, match="already taken"):
        base.register(Impostor)
    assert isinstance(make_predictor("sequence"), SequencePredictor)
    with pytest.raises(TypeError, match="takes no options"):
        make_predictor("none", depth=2)


def test_sequence_learns_a_cycle_after_one_lap() -> None:
    p = SequencePredictor()
    feed(p, ["A", "B", "C", "A"])  # one lap, back at A
    preds = p.predict(get("A"), 2)
    assert preds[0] == ("B", 1.0)
    assert preds[1] == ("C", 1.0)  # two steps ahead, soonest first
    assert [k for k, _ in p.predict(get("B"), 5)] == ["C", "A"]  # never the key itself, no repeats
    assert p.predict(get("unknown"), 2) == []
    assert p.predict(get("A"), 0) == []


def test_sequence_keeps_clients_apart_and_is_bounded() -> None:
    p = SequencePredictor(max_rows=16, max_successors=2)
    for i in range(50):  # two clients interleaved: each one's own order is what is learned
        p.observe(get("x1", float(i), client=1))
        p.observe(get("y1", float(i), client=2))
        p.observe(get("x2", float(i), client=1))
        p.observe(get("y2", float(i), client=2))
    assert p.predict(get("x1"), 1)[0][0] == "x2"
    assert p.predict(get("y1"), 1)[0][0] == "y2"
    feed(p, [f"k{i}" for i in range(200)])
    st = p.stats()
    assert st["rows"] <= 16
    assert st["transitions"] <= 16 * 2


def test_sequence_confidence_falls_on_random_keys() -> None:
    s = uniform_random(5, keys=200, gets=1500)
    p = SequencePredictor()
    for a in s.trace:
        p.observe(a)
    # rows seen once claim 100%; the calibration has learned that they are wrong
    confident = [c for a in s.trace[-200:] for _, c in p.predict(a, 2) if c >= 0.2]
    assert len(confident) < 10


def _interleaved_small(seed: int = 3) -> Scenario:
    return interleaved(seed, fast_layers=6, slow_layers=8, fast_steps=40)


def test_learned_trains_installs_and_beats_sequence_on_interleaved_models() -> None:
    s = _interleaved_small()
    half = len(s.trace) // 2
    lp, sp = LearnedPredictor(first_train_after=300), SequencePredictor()
    for a in s.trace[:half]:
        lp.observe(a)
        sp.observe(a)
    assert lp.wants_training()
    before = lp.stats()
    model = lp.train(s.trace[:half])
    assert lp.stats() == before  # train() did not touch the live state
    assert isinstance(model, LearnedModel)
    lp.install(model)
    assert not lp.wants_training()
    st = lp.stats()
    assert st["trained"] and st["samples"] > 0 and 0 < st["positives"] < st["samples"]
    assert set(st["feature_weights"]) == set(FEATURES)
    assert sum(st["feature_weights"].values()) == pytest.approx(1.0, abs=0.01)
    # The slow model's next weight follows its current one only through the other model's reads.
    # Predicting after every get (as the daemon does), was each read of the slow model named (with
    # confidence >= 0.2) within the 16 gets before it? Learned: nearly always; sequence (successors
    # in the mixed stream): rarely.
    said: dict[str, dict[str, int]] = {"learned": {}, "sequence": {}}
    covered = {"learned": 0, "sequence": 0}
    slow = 0
    for i, a in enumerate(s.trace[half:]):
        for name, p in (("learned", lp), ("sequence", sp)):
            p.observe(a)
            if a.key.startswith("big/"):
                covered[name] += i - said[name].get(a.key, -100) <= 16
            for k, c in p.predict(a, 2):
                if c >= 0.2:
                    said[name][k] = i
        slow += a.key.startswith("big/")
    assert slow > 50
    assert covered["learned"] > 0.9 * slow
    assert covered["sequence"] < 0.3 * slow


def test_learned_templates_generalize_to_keys_never_read() -> None:
    p = LearnedPredictor()
    for img in range(1, 6):  # tiles of 5 images read in order, once each
        feed(p, [f"vis/img{img:03d}/tile{j}" for j in range(4)], t0=img)
    for j in range(4):  # image 9: put (encoded), never read
        p.observe(Access(10.0, 1, f"vis/img009/tile{j}", "put", "-", MIB))
    p.observe(get("vis/img009/tile0", 11.0))
    assert p.predict(get("vis/img009/tile0", 11.0), 1)[0][0] == "vis/img009/tile1"
    assert SequencePredictor().predict(get("vis/img009/tile0"), 1) == []  # nothing to go on
    # the same with content hashes for names, and across layers of a model ("layers.9" -> "layers.10")
    p = LearnedPredictor()
    for h in ("3fa9c2e01b7d", "a0b1c2d3e4f5", "77e1d0c9b8a6"):
        feed(p, [f"vis/{h}/tile{j}" for j in range(3)])
    p.observe(Access(1.0, 1, "vis/c0ffee123456/tile1", "put", "-", MIB))
    p.observe(get("vis/c0ffee123456/tile0", 2.0))
    assert p.predict(get("vis/c0ffee123456/tile0", 2.0), 1)[0][0] == "vis/c0ffee123456/tile1"
    p = LearnedPredictor()
    feed(p, [f"m/layers.{i}.{w}" for i in range(3) for w in ("attn", "mlp")])
    p.observe(Access(1.0, 1, "m/layers.10.attn", "put", "-", MIB))
    p.observe(get("m/layers.9.mlp", 2.0))
    assert p.predict(get("m/layers.9.mlp", 2.0), 1)[0][0] == "m/layers.10.attn"


def test_learned_install_refuses_other_models() -> None:
    p = LearnedPredictor()
    p.install(None)  # nothing learned yet: fine
    with pytest.raises(TypeError):
        p.install({"weights": []})
    assert p.train([]) is None


def test_auto_picks_the_better_candidate() -> None:
    s = cyclic(2, layers=8, steps=12)
    a = AutoPredictor(candidates=("none", "sequence"), min_gets=50, cost_budget_us=None)
    replay(s.trace, a, ram_bytes=s.ram_bytes, prefetch_budget_bytes=s.prefetch_budget_bytes)
    st = a.stats()
    assert st["using"] == "sequence" and st["switches"] == 1
    assert st["scores"]["sequence"]["hit_rate"] > 0.8 > st["scores"]["none"]["hit_rate"]

    s = _interleaved_small()
    a = AutoPredictor(options={"learned": {"first_train_after": 300}}, cost_budget_us=None)
    r = replay(
        s.trace, a, ram_bytes=s.ram_bytes, prefetch_budget_bytes=s.prefetch_budget_bytes, train_every=500
    )
    st = a.stats()
    assert st["using"] == "learned"
    assert st["scores"]["learned"]["hit_rate"] > st["scores"]["sequence"]["hit_rate"] + 0.1
    assert st["candidates"]["learned"]["trained"]
    assert r.trained >= 1 and "auto is using learned" in format_result(r)


def test_auto_follows_none_when_the_hints_cover_the_stream() -> None:
    # a streaming model hints its next reads: the predictors would only repeat the hints, which
    # counts neither as a win nor as a cost, so nothing beats none
    s = with_hints(cyclic(2, layers=8, steps=12))
    a = AutoPredictor(min_gets=50, cost_budget_us=None, options={"learned": {"first_train_after": 100}})
    r = replay(s.trace, a, ram_bytes=s.ram_bytes, prefetch_budget_bytes=s.prefetch_budget_bytes,
               train_every=100)  # fmt: skip
    st = a.stats()
    assert st["using"] == "none" and st["switches"] == 0, st["scores"]
    # learned would train, but it is not followed and does not beat none: no CPU spent on it
    assert a._children["learned"].wants_training() and not a.wants_training() and r.trained == 0
    assert st["scores"]["sequence"]["score"] <= 0 and st["scores"]["sequence"]["hit_rate"] == 0
    none = replay(s.trace, "none", ram_bytes=s.ram_bytes, prefetch_budget_bytes=s.prefetch_budget_bytes)
    assert r.hit_rate == none.hit_rate and r.prefetch_issued == none.prefetch_issued

    # the same reads without the hints: sequence saves reads, and auto moves to a predictor
    s = cyclic(2, layers=8, steps=12)
    a = AutoPredictor(min_gets=50, cost_budget_us=None)
    replay(s.trace, a, ram_bytes=s.ram_bytes, prefetch_budget_bytes=s.prefetch_budget_bytes)
    assert a.stats()["using"] != "none" and a.stats()["scores"]["sequence"]["score"] > 0.5


def test_auto_scores_in_bursts_to_keep_its_work_bounded() -> None:
    # a budget of 0 leaves the least duty: one burst of 64 accesses in every 32 * 64
    s = cyclic(2, layers=8, steps=100)
    a = AutoPredictor(cost_budget_us=0.0, burst=64, min_gets=32)
    replay(s.trace, a, ram_bytes=s.ram_bytes, prefetch_budget_bytes=s.prefetch_budget_bytes)
    st = a.stats()
    assert 1 / 32 <= st["shadowed_share"] < 1 / 16, st["shadowed_share"]
    assert st["using"] != "none", st["scores"]  # the bursts are evidence enough to move


# -- replay -----------------------------------------------------------------------------------------


class Scripted(Predictor):
    """Predicts whatever the script says after a key."""

    name = "scripted"

    def __init__(self, script: dict[str, list[tuple[str, float]]]) -> None:
        self.script = script

    def predict(self, a: Access, k: int) -> list[tuple[str, float]]:
        return self.script.get(a.key, [])[:k]


def test_replay_cyclic_trace_sequence_far_above_lru() -> None:
    s = cyclic(4, layers=8, steps=12)
    assert s.ram_bytes == pytest.approx(s.working_set_bytes / 1.5, rel=0.01)
    kw: dict[str, Any] = {"ram_bytes": s.ram_bytes, "prefetch_budget_bytes": s.prefetch_budget_bytes}
    lru = replay(s.trace, "none", **kw)
    seq = replay(s.trace, "sequence", lru_only=True, **kw)
    assert lru.hit_rate < 0.05  # a scan 1.5x the cache: LRU evicts each entry just before its reuse
    assert seq.hit_rate > 0.75
    assert seq.stall_s < 0.3 * lru.stall_s
    assert seq.prefetch_used > 0.95 * seq.prefetch_issued
    assert seq.lru_only is not None and seq.lru_only["hits"] == lru.hits
    assert isinstance(seq, ReplayResult) and seq.to_dict()["hit_rate"] == seq.hit_rate
    out = format_result(seq)
    assert "lru only" in out and "hits (ram)" in out


@pytest.mark.parametrize("name", ["sequence", "learned", "auto"])
def test_replay_random_keys_waste_little(name: str) -> None:
    s = uniform_random(6, keys=150, gets=1500)
    r = replay(
        s.trace, name, ram_bytes=s.ram_bytes, prefetch_budget_bytes=s.prefetch_budget_bytes, train_every=500
    )
    lru = replay(s.trace, "none", ram_bytes=s.ram_bytes, prefetch_budget_bytes=s.prefetch_budget_bytes)
    assert r.wasted_bytes < 0.02 * lru.disk_read_bytes
    assert r.stall_s < 1.02 * lru.stall_s
    assert r.predictor_errors == 0


def test_replay_vision_learned_beats_sequence() -> None:
    s = vision(7, images=300, requests=500)
    kw: dict[str, Any] = {
        "ram_bytes": s.ram_bytes,
        "prefetch_budget_bytes": s.prefetch_budget_bytes,
        "train_every": 500,
    }
    lru, seq, lrn = (replay(s.trace, n, **kw) for n in ("none", "sequence", "learned"))
    assert lrn.hit_rate > seq.hit_rate + 0.02 > lru.hit_rate + 0.04
    assert lrn.trained >= 1


def test_replay_prefetch_timing() -> None:
    n = 150_000_000  # 0.1 s at 1.5 GB/s
    trace = [Access(-10.0, 1, k, "put", "-", n) for k in "BC"]  # sized; evicted below
    trace += [get("A", 0.0, nbytes=n), get("B", 0.15, nbytes=n), get("C", 0.16, nbytes=n)]
    script = Scripted({"A": [("B", 0.9), ("C", 0.9)]})
    r = replay(trace, script, ram_bytes=2 * n, prefetch_budget_bytes=10 * n, disk_gbps=1.5)
    # A misses: read 0-0.1 s (evicting B), the client is 0.1 s late from then on. B and C are
    # prefetched at t=0 behind A: ready at 0.2 and 0.3. B is asked at 0.25: a hit. C is asked at
    # 0.26: used, but late, a 0.04 s partial stall.
    assert (r.hits, r.demand_misses, r.prefetch_issued, r.prefetch_used, r.prefetch_late) == (1, 1, 2, 2, 1)
    assert r.stall_s == pytest.approx(0.1 + 0.04)
    assert r.wasted_bytes == 0
    assert r.disk_read_bytes == 3 * n


def test_replay_prefetch_never_evicts_a_speculative_entry_and_keeps_the_budget() -> None:
    n = MIB
    trace = [Access(-10.0, 1, k, "put", "-", n) for k in "BC"]
    trace += [get("A", 0.0, nbytes=n), get("B", 1.0, nbytes=n), get("C", 2.0, nbytes=n)]
    script = {"A": [("B", 0.9), ("C", 0.9)]}
    # room for one entry: B evicts A; C would have to evict the speculative B: skipped
    r = replay(trace, Scripted(script), ram_bytes=n, prefetch_budget_bytes=10 * n)
    assert (r.prefetch_issued, r.prefetch_skipped, r.prefetch_used, r.hits) == (1, 1, 1, 1)
    r = replay(trace, Scripted(script), ram_bytes=10 * n, prefetch_budget_bytes=n - 1)
    assert r.prefetch_issued == 0  # B and C still resident from their puts: nothing to do
    r = replay(trace, Scripted(script), ram_bytes=2 * n, prefetch_budget_bytes=n)
    assert (r.prefetch_issued, r.prefetch_skipped) == (1, 1)  # the budget holds one
    r = replay(trace, Scripted({"A": [("B", 0.1), ("C", 0.1)]}), ram_bytes=n, prefetch_budget_bytes=10 * n)
    assert r.prefetch_issued == r.prefetch_skipped == 0  # under min_confidence


def test_replay_counts_unused_prefetches_as_waste() -> None:
    n = MIB
    trace = [Access(0.0, 1, "X", "put", "-", n)]
    trace += [get(k, float(i + 1), nbytes=n) for i, k in enumerate("ABCD")]
    r = replay(trace, Scripted({"B": [("X", 1.0)]}), ram_bytes=2 * n, prefetch_budget_bytes=n)
    # B's read evicts X; X is prefetched after B (evicting A); C evicts B, D evicts X unread
    assert (r.prefetch_issued, r.prefetch_used, r.wasted_bytes) == (1, 0, n)


def test_scenarios_are_seeded_and_sized() -> None:
    for name in SCENARIO_NAMES:
        small = {
            "cyclic": {"layers": 4, "steps": 3},
            "interleaved": {"fast_layers": 3, "slow_layers": 4, "fast_steps": 5},
            "vision": {"images": 50, "requests": 40},
            "random": {"keys": 20, "gets": 100},
        }[name]
        a, b = make_scenario(name, 11, **small), make_scenario(name, 11, **small)
        c = make_scenario(name, 12, **small)
        assert a.trace == b.trace and a.trace != c.trace
        assert a.trace == sorted(a.trace, key=lambda x: x.t)
        assert a.ram_bytes == pytest.approx(a.working_set_bytes / 1.5, rel=0.01)
        assert all(MIB <= x.nbytes <= 64 * MIB for x in a.trace)
    s = make_scenario("interleaved-2clients", 1, fast_layers=3, slow_layers=4, fast_steps=5)
    assert {x.client for x in s.trace} == {1, 2} and s.name == "interleaved-2clients"
    s = make_scenario("vision-hashed", 1, images=20, requests=10)
    assert all(re.fullmatch(r"vis/[0-9a-f]{12}/tile\d", x.key) for x in s.trace)
    with pytest.raises(ValueError):
        make_scenario("nope")
