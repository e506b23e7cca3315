"""Scripted scenarios of the entry table: versions, leases, pins, lifetimes. No socket, no daemon."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tierd.errors import InvalidRequest, NotFound, TierFull, Unsupported
from tierd.manager import Manager
from tierd.protocol import Put
from tierd.tiers.ram import RamTier

MiB = 1 << 20


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def m(clock: Clock) -> Iterator[Manager]:
    ram = RamTier(4 * MiB)
    mgr = Manager(ram, clock=clock, mono=clock)
    yield mgr
    mgr.check()
    ram.close()


def put(m: Manager, cid: int, key: str, nbytes: int = 1024, **kw) -> int:
    pid, _off = m.begin_put(cid, Put(1, key, "uint8", [nbytes], nbytes, **kw))
    m.seal(cid, pid)
    return pid


def lease(m: Manager, cid: int, key: str, version: int = 0) -> int:
    return m.get(cid, [(key, version)])[0].lease


def test_put_get_release(m: Manager) -> None:
    c = m.add_client(1, 0, "a")
    v = put(m, c, "ns/a")
    [loc] = m.get(c, [("ns/a", 0)])
    assert (loc.key, loc.version, loc.nbytes) == ("ns/a", v, 1024)
    assert m.status()["leases"] == 1
    assert m.release(c, [loc.lease]) == 0
    assert m.status()["leases"] == 0
    assert m.release(c, [loc.lease]) == 1  # twice: counted as bad, nothing else happens
    assert m.metrics.bad_releases == 1
    m.check()


def test_unsealed_put_is_invisible_and_client_death_frees_it(m: Manager) -> None:
    c = m.add_client(1, 0, "a")
    m.begin_put(c, Put(1, "ns/a", "float32", [256], 1024))
    with pytest.raises(NotFound):
        m.get(c, [("ns/a", 0)])
    assert m.ls() == []
    assert m.ram.used_bytes == 1024
    m.client_gone(c)
    assert m.ram.used_bytes == 0
    m.check()


def test_new_version_keeps_old_for_its_readers(m: Manager) -> None:
    a, b = m.add_client(1, 0, "a"), m.add_client(2, 0, "b")
    v1 = put(m, a, "ns/w")
    l1 = lease(m, b, "ns/w")
    v2 = put(m, a, "ns/w")
    assert v2 > v1
    assert m.stat("ns/w")["version"] == v2
    # the old version is still readable by handle while leased, and its bytes are not reused
    assert m.get(b, [("ns/w", v1)])[0].version == v1
    used = m.ram.used_bytes
    assert used == 2 * 1024
    m.client_gone(b)  # b held two leases on v1: both end, v1 is freed
    assert m.ram.used_bytes == 1024
    with pytest.raises(NotFound):
        m.get(a, [("ns/w", v1)])
    assert l1 not in m.leases
    m.check()


def test_delete_of_leased_entry_hides_then_frees(m: Manager) -> None:
    a = m.add_client(1, 0, "a")
    put(m, a, "ns/x")
    lid = lease(m, a, "ns/x")
    m.delete("ns/x")
    with pytest.raises(NotFound):
        m.get(a, [("ns/x", 0)])
    assert m.ram.used_bytes == 1024  # still leased
    m.release(a, [lid])
    assert m.ram.used_bytes == 0
    with pytest.raises(NotFound):
        m.delete("ns/x")


def test_get_many_is_all_or_nothing(m: Manager) -> None:
    a = m.add_client(1, 0, "a")
    put(m, a, "ns/1")
    with pytest.raises(NotFound):
        m.get(a, [("ns/1", 0), ("ns/missing", 0)])
    assert m.status()["leases"] == 0


def test_tier_full_says_tier_asked_and_free(m: Manager) -> None:
    a = m.add_client(1, 0, "a")
    put(m, a, "ns/big", 3 * MiB)
    with pytest.raises(TierFull) as ei:
        put(m, a, "ns/more", 2 * MiB)
    d = ei.value.details
    assert d["tier"] == "ram" and d["requested_bytes"] == 2 * MiB and d["free_bytes"] == 1 * MiB
    assert "ram" in str(ei.value) and str(2 * MiB) in str(ei.value)
    with pytest.raises(TierFull, match="larger than the whole tier"):
        put(m, a, "ns/huge", 5 * MiB)
    assert [e["key"] for e in m.ls()] == ["ns/big"]  # nothing existing changed


@pytest.mark.parametrize(
    "req, err",
    [
        (Put(1, "nokey", "uint8", [4], 4), InvalidRequest),
        (Put(1, "/x", "uint8", [4], 4), InvalidRequest),
        (Put(1, "ns/", "uint8", [4], 4), InvalidRequest),
        (Put(1, "ns/x", "float128", [4], 64), InvalidRequest),
        (Put(1, "ns/x", "float32", [4], 4), InvalidRequest),  # nbytes does not match
        (Put(1, "ns/x", "float32", [-1], 4), InvalidRequest),
        (Put(1, "ns/x", "uint8", [4], 4, scope="global"), InvalidRequest),
        (Put(1, "ns/x", "uint8", [4], 4, ttl=-1.0), InvalidRequest),
        (Put(1, "ns/x", "uint8", [4], 4, tags=[""]), InvalidRequest),
        (Put(1, "ns/x", "uint8", [4], 4, durable=True), Unsupported),
        (Put(1, "ns/x", "uint8", [4], 4, codec="zstd"), Unsupported),
    ],
)
def test_bad_puts_are_refused_without_effect(m: Manager, req: Put, err: type) -> None:
    a = m.add_client(1, 0, "a")
    with pytest.raises(err):
        m.begin_put(a, req)
    assert m.ram.used_bytes == 0


def test_seal_abort_only_by_owner(m: Manager) -> None:
    a, b = m.add_client(1, 0, "a"), m.add_client(2, 0, "b")
    pid, _ = m.begin_put(a, Put(1, "ns/x", "uint8", [8], 8))
    with pytest.raises(InvalidRequest):
        m.seal(b, pid)
    with pytest.raises(InvalidRequest):
        m.abort(b, pid)
    m.abort(a, pid)
    with pytest.raises(InvalidRequest):
        m.seal(a, pid)
    assert m.ram.used_bytes == 0


def test_scope_client_entries_go_with_their_client(m: Manager) -> None:
    a, b = m.add_client(1, 0, "a"), m.add_client(2, 0, "b")
    put(m, a, "kv/blk0", scope="client")
    put(m, a, "ns/kept")
    lid = lease(m, b, "kv/blk0")
    m.client_gone(a)
    assert [e["key"] for e in m.ls()] == ["ns/kept"]
    assert m.ram.used_bytes == 2048  # blk0 still leased by b
    m.release(b, [lid])
    assert m.ram.used_bytes == 1024


def test_ttl_counts_from_last_access_and_waits_for_leases(m: Manager, clock: Clock) -> None:
    a = m.add_client(1, 0, "a")
    put(m, a, "ns/t", ttl=10.0)
    clock.t += 8
    lid = lease(m, a, "ns/t")  # access resets the clock
    clock.t += 8
    assert m.expire() == []
    clock.t += 30
    assert m.expire() == []  # leased: waits
    m.release(a, [lid])
    assert m.expire() == ["ns/t"]
    assert m.ram.used_bytes == 0 and m.metrics.expired == 1


def test_pin_unpin(m: Manager) -> None:
    a = m.add_client(1, 0, "a")
    put(m, a, "ns/p", ttl=1.0)
    m.pin("ns/p", "ram")
    assert m.stat("ns/p")["pinned"] == ["ram"]
    with pytest.raises(Unsupported):
        m.pin("ns/p", "gpu")
    with pytest.raises(NotFound):
        m.pin("ns/none", "ram")
    assert m.unpin("ns/p") is True
    assert m.unpin("ns/p") is False


def test_pinned_entries_do_not_expire(m: Manager, clock: Clock) -> None:
    a = m.add_client(1, 0, "a")
    put(m, a, "ns/p", ttl=1.0)
    m.pin("ns/p", "ram")
    clock.t += 100
    assert m.expire() == []
    m.unpin("ns/p")
    assert m.expire() == ["ns/p"]


def test_churn_keeps_invariants(m: Manager, seed: int) -> None:
    import random

    rng = random.Random(seed)
    clients = [m.add_client(i, 0, str(i)) for i in range(3)]
    held: list[tuple[int, int]] = []
    for step in range(2000):
        c = rng.choice(clients)
        op = rng.random()
        key = f"ns/{rng.randrange(20)}"
        try:
            if op < 0.35:
                put(m, c, key, rng.randrange(1, 64 * 1024))
            elif op < 0.65:
                held.append((c, lease(m, c, key)))
            elif op < 0.85 and held:
                cid, lid = held.pop(rng.randrange(len(held)))
                if cid in m.clients:
                    m.release(cid, [lid])
            elif op < 0.95:
                m.delete(key)
            else:
                m.client_gone(c)
                clients.remove(c)
                clients.append(m.add_client(100 + step, 0, "new"))
        except (NotFound, TierFull):
            pass
        m.check()
