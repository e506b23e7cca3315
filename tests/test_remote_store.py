"""The remote tier's chunk store (tierd/tiers/remote.py) against a real 3-node Redis Cluster.

What the store promises: content-addressed chunks (stored once across entries and machines), a
record only after all of its chunks, checksums checked before a byte is handed out, Redis full =
TierFull with nothing left behind, a dead or paused node = a StorageError naming the remote tier
within the configured timeout. Each test has its own key prefix on the shared cluster; the tests
that break nodes or fill Redis start a cluster of their own.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from tests.redis_cluster import LocalCluster
from tierd.codecs import get_codec
from tierd.config import RemoteSettings, parse_remote_url
from tierd.errors import CorruptEntry, StorageError, TierFull
from tierd.tiers.remote import RemoteStore

MiB = 1 << 20
_prefixes = itertools.count()


def _store(cluster: LocalCluster, timeout: float = 2.0, prefix: str | None = None) -> RemoteStore:
    nodes, _tls, _u, _p = parse_remote_url(cluster.url)
    return RemoteStore(RemoteSettings(nodes, prefix=prefix or f"t{next(_prefixes)}-{time.time_ns()}",
                                    timeout=timeout))  # fmt: skip


@pytest.fixture
def store(redis_cluster: LocalCluster) -> Iterator[RemoteStore]:
    s = _store(redis_cluster)
    yield s
    s.close()


@pytest.fixture(scope="module")
def pool() -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(4) as p:
        yield p


def _write(store: RemoteStore, pool, version: int, raw: np.ndarray, key: str = "", chunk: int = 64 * 1024):
    plan = get_codec("raw").prepare(memoryview(raw), "uint8", [raw.size], chunk)
    meta = {"key": key or f"m/{version}", "version": version, "dtype": "uint8", "shape": [raw.size],
            "nbytes": raw.size, "tags": ["weight"], "durable": False, "ttl": None, "scope": "shared",
            "created": 1.0}  # fmt: skip
    return store.write(meta, plan, memoryview(raw), pool)


def _chunk_keys(store: RemoteStore) -> set[bytes]:
    return set(store.rc.scan_iter(match=f"{store.cfg.prefix}:c:*", target_nodes=store.rc.PRIMARIES))


def test_round_trip_through_another_daemons_store(redis_cluster: LocalCluster, store, pool, seed) -> None:
    """What one store writes, a second (another machine's daemon) finds by key and reads back."""
    raw = np.random.default_rng(seed).integers(0, 255, 1_000_003, dtype=np.uint8)
    rec = _write(store, pool, 5, raw, key="ns/w")
    other = _store(redis_cluster, prefix=store.cfg.prefix)
    try:
        found = other.lookup("ns/w")
        assert found is not None and found.version != rec.version  # renumbered: a local token
        assert (found.key, found.shape, found.chunks) == ("ns/w", rec.shape, rec.chunks)
        out = np.zeros_like(raw)
        other.read_into(found, memoryview(out), pool)
        assert np.array_equal(out, raw)
        assert other.verify(found) is None
        assert other.lookup("ns/absent") is None
        assert other.keys("ns/") == ["ns/w"] and other.keys("nt/") == []
        # the chunks are spread over the shards: every node holds some of the 16
        nodes = {redis_cluster.node_of(k.decode()) for k in _chunk_keys(store)}
        assert nodes == {0, 1, 2}
    finally:
        other.close()


def test_same_chunks_are_stored_once(store, pool, seed) -> None:
    raw = np.random.default_rng(seed).integers(0, 255, 8 * 64 * 1024, dtype=np.uint8)
    _write(store, pool, 1, raw, key="a")
    before = _chunk_keys(store)
    assert len(before) == 8
    _write(store, pool, 2, raw, key="b")  # the same bytes under another key: no new chunk
    assert _chunk_keys(store) == before
    assert store.keys() == ["a", "b"]


def test_a_damaged_chunk_is_refused_never_served(store, pool, seed) -> None:
    raw = np.random.default_rng(seed).integers(0, 255, 4 * 64 * 1024, dtype=np.uint8)
    _write(store, pool, 3, raw, key="d")
    rec = store.lookup("d")
    assert rec is not None
    ids = store._known[rec.version][1]
    store.rc.set(f"{store.cfg.prefix}:c:{ids[2]}", b"\x00" * rec.chunks[2][0])  # same size, other bytes
    assert store.verify(rec) == "chunk 2 checksum mismatch"
    with pytest.raises(CorruptEntry) as ei:
        store.read_into(rec, memoryview(np.zeros_like(raw)), pool)
    assert ei.value.details["chunk"] == 2 and store.stats()["corrupt"] == 1
    assert "on remote" in str(ei.value)
    store.rc.set(f"{store.cfg.prefix}:c:{ids[1]}", b"short")  # read in pieces: a short chunk, then none
    with pytest.raises(CorruptEntry, match="chunk 1 of 4: wrong size"):
        store.read_into(rec, memoryview(np.zeros_like(raw)), pool)
    store.rc.delete(f"{store.cfg.prefix}:c:{ids[1]}")
    with pytest.raises(CorruptEntry, match="chunk 1 of 4: missing"):
        store.read_into(rec, memoryview(np.zeros_like(raw)), pool)


def test_ls_pages_in_key_order(store, pool) -> None:
    raw = np.arange(1000, dtype=np.uint8)
    for k in ["p/c", "p/a", "q/x", "p/b"]:
        _write(store, pool, 10, raw, key=k)
    assert store.keys("p/") == ["p/a", "p/b", "p/c"]
    assert store.keys("p/", after="p/a", limit=1) == ["p/b"]
    assert [r.key for r in store.records("", limit=10)] == ["p/a", "p/b", "p/c", "q/x"]


def test_redis_full_is_tier_full_and_leaves_no_chunk(tmp_path: Path, pool, seed) -> None:
    cluster = LocalCluster(tmp_path, maxmemory="8mb")  # per node: 24 MB in all
    try:
        store = _store(cluster)
        raw = np.random.default_rng(seed).integers(0, 255, 48 * MiB, dtype=np.uint8)
        with pytest.raises(TierFull) as ei:
            _write(store, pool, 1, raw, key="big", chunk=MiB)
        assert ei.value.details["tier"] == "remote" and "maxmemory" in str(ei.value)
        assert _chunk_keys(store) == set() and store.keys() == [] and store.used_bytes == 0
        small = np.arange(100_000, dtype=np.uint32).view(np.uint8)
        _write(store, pool, 2, small, key="small")  # what fits still goes
        assert store.keys() == ["small"]
        store.close()
    finally:
        cluster.close()


def test_a_killed_node_is_a_clear_error_naming_the_remote_tier(tmp_path: Path, pool, seed) -> None:
    cluster = LocalCluster(tmp_path)
    try:
        store = _store(cluster, timeout=1.0)
        raw = np.random.default_rng(seed).integers(0, 255, 16 * 64 * 1024, dtype=np.uint8)
        _write(store, pool, 1, raw, key="k")
        rec = store.lookup("k")
        assert rec is not None
        cluster.kill(cluster.node_of(f"{store.cfg.prefix}:c:{store._known[rec.version][1][0]}"))
        t0 = time.monotonic()
        with pytest.raises(StorageError) as ei:
            store.read_into(rec, memoryview(np.zeros_like(raw)), pool)
        assert time.monotonic() - t0 < 10 * store.cfg.timeout  # bounded, not a hang
        assert "remote tier (redis://" in str(ei.value)
        store.close()
    finally:
        cluster.close()


def test_a_paused_node_costs_at_most_the_timeout_per_call(tmp_path: Path, seed) -> None:
    cluster = LocalCluster(tmp_path)
    try:
        store = _store(cluster, timeout=0.5)
        key = next(f"p{i}" for i in range(1000) if cluster.node_of(f"{store.cfg.prefix}:r:p{i}") == 1)
        assert store.lookup(key) is None  # a connection to node 1 is open now
        cluster.pause(1)
        errors: list[float] = []

        def one() -> None:
            t0 = time.monotonic()
            with pytest.raises(StorageError, match="remote tier"):
                store.lookup(key)
            errors.append(time.monotonic() - t0)

        threads = [threading.Thread(target=one) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert len(errors) == 3 and max(errors) < 4 * store.cfg.timeout, errors
        cluster.resume(1)
        assert store.lookup(key) is None  # answers again once the node does
        store.close()
    finally:
        cluster.close()


def test_a_damaged_or_inconsistent_record_is_refused(store, pool) -> None:
    """Another machine's record is checked before it sizes anything: garbage, a plan that disagrees
    with the shape, a chunk list of the wrong length are CorruptEntry, and ls leaves them out."""
    import msgspec

    from tierd.tiers.remote import RemoteRecord

    _write(store, pool, 1, np.arange(200_000, dtype=np.uint8), key="ok")
    good = msgspec.msgpack.decode(store.rc.get(f"{store.cfg.prefix}:r:ok"), type=RemoteRecord)
    bad = {
        "garbage": b"\x93not a record",
        "bigger": msgspec.msgpack.encode(
            RemoteRecord(rec=msgspec.structs.replace(good.rec, nbytes=10**12), ids=good.ids)
        ),
        "fewer_ids": msgspec.msgpack.encode(RemoteRecord(rec=good.rec, ids=good.ids[:-1])),
        "bad_id": msgspec.msgpack.encode(RemoteRecord(rec=good.rec, ids=["../x", *good.ids[1:]])),
    }
    for key, blob in bad.items():
        store.rc.set(f"{store.cfg.prefix}:r:{key}", blob)
        store.rc.zadd(f"{store.cfg.prefix}:index", {key: 0})
        with pytest.raises(CorruptEntry, match="remote tier"):
            store.lookup(key)
    assert [r.key for r in store.records()] == ["ok"]
    assert store.stats()["corrupt"] == 2 * len(bad)
