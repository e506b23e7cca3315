"""The remote tier through real daemons: two daemons ("two machines": their own sockets and state
dirs) on one real 3-node Redis Cluster on loopback. A shares, B finds; faults give typed errors and
the daemons go on. Each test uses its own key prefix (--remote-prefix) on the shared cluster; the
ones that break nodes or fill Redis start their own cluster.
"""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from tests.redis_cluster import LocalCluster
from tests.test_config import run_tierd
from tests.test_tierctl import tierctl
from tierd import launch
from tierd_client import Client, CorruptEntry, InvalidRequest, NotFound, StorageError, TierFull, Unsupported

_prefixes = itertools.count()
Start = Callable[..., launch.Daemon]


def _remote(cluster: LocalCluster, prefix: str, *more: str) -> tuple[str, ...]:
    return ("--remote", cluster.url, "--remote-prefix", prefix, "--remote-timeout", "1", *more)


def _prefix() -> str:
    return f"rt{next(_prefixes)}-{time.time_ns()}"


def _counter(c: Client, name: str) -> int:
    return int(c.stats()["counters"][name])


def _until_shared(c: Client, n: int, what: str = "shares_written", timeout: float = 30.0) -> None:
    """Shares are written after SEAL in the background: wait (polling status with a back-off) until
    ``n`` have been counted."""
    deadline, delay = time.monotonic() + timeout, 0.005
    while _counter(c, what) < n:
        assert time.monotonic() < deadline, f"{what} stayed at {_counter(c, what)} < {n}"
        time.sleep(delay)
        delay = min(0.2, delay * 2)


def test_b_serves_what_a_shared(redis_cluster: LocalCluster, machines: Start, seed: int) -> None:
    prefix = _prefix()
    a = machines("a", *_remote(redis_cluster, prefix, "--remote-tags", "vision"))
    b = machines("b", *_remote(redis_cluster, prefix, "--remote-tags", "vision"))
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(3000, 700, generator=g, dtype=torch.float32)  # 8.4 MB: one chunk
    big = torch.randn(20 << 20, generator=g).to(torch.bfloat16)  # 40 MiB: three chunks
    feat = torch.randn(64, 128, generator=g)
    with Client(a.socket) as ca, Client(b.socket) as cb:
        ca.put("m/w", w, tags=["weight"], share=True)
        ca.put("m/big", big, share=True)
        ca.put("img/feat", feat, tags=["vision"])  # shared by the tag rule
        ca.put("m/private", w)  # not shared
        _until_shared(ca, 3)
        assert ca.stats()["remote"]["records"] == 3

        assert torch.equal(cb.get("m/w"), w)
        assert torch.equal(cb.get("m/big"), big)
        assert torch.equal(cb.get("img/feat"), feat)
        with pytest.raises(NotFound):
            cb.get("m/private")
        st = cb.stats()["counters"]
        assert (st["remote_hits"], st["remote_misses"]) == (3, 1)
        assert st["shares_written"] == 0
        # promoted: B holds them now, a second get is a RAM hit
        rows = {e["key"]: e for e in cb.ls("m/")}
        assert set(rows) == {"m/w", "m/big"} and rows["m/w"]["tiers"] == ["ram"]
        assert rows["m/w"]["tags"] == ["weight"] and not rows["m/w"]["durable"]
        hits = _counter(cb, "hits_ram")
        assert torch.equal(cb.get("m/w"), w) and _counter(cb, "hits_ram") == hits + 1
        assert _counter(cb, "remote_hits") == 3
        # get_many with one key missing in both: NotFound, and nothing leased
        with pytest.raises(NotFound):
            cb.get_many(["m/w", "m/none"])
        # ls --remote lists the cluster's records, not the daemon's
        remote = cb.ls("", remote=True)
        assert [e["key"] for e in remote] == ["img/feat", "m/big", "m/w"]
        assert all(e["here"] for e in remote) and remote[1]["nbytes"] == big.numel() * 2
        assert [e["key"] for e in cb.ls("m/", remote=True, page=1)] == ["m/big", "m/w"]
        assert _counter(cb, "remote_misses") == 2  # m/none
        assert _counter(cb, "shares_written") == 0  # B does not share again what it fetched

        # durable="remote": the put answers once the cluster holds it, so B finds it at once
        written = _counter(ca, "shares_written")
        ca.put("m/now", feat, durable="remote")
        assert _counter(ca, "shares_written") == written + 1  # before the put returned, and once
        assert torch.equal(cb.get("m/now"), feat)
        row = ca.ls("m/now")[0]
        assert not row["durable"] and row["tiers"] == ["ram"]  # not written to a local disk
        with pytest.raises(InvalidRequest, match="durable must be"):
            ca.put("m/bad", feat, durable="disk")


def test_tierctl_ls_remote(redis_cluster: LocalCluster, machines: Start) -> None:
    prefix = _prefix()
    a = machines("a", *_remote(redis_cluster, prefix))
    with Client(a.socket) as ca:
        ca.put("ns/t", torch.arange(10), share=True)
        _until_shared(ca, 1)
    r = tierctl(a.socket, "ls", "--remote", "--json")
    assert r.returncode == 0, r.stderr
    assert [e["key"] for e in json.loads(r.stdout)] == ["ns/t"]
    r = tierctl(a.socket, "ls", "--remote", "ns/")
    assert r.returncode == 0 and "ns/t" in r.stdout and "1 entries in the remote tier" in r.stdout


def test_share_needs_a_remote_tier_and_shared_scope(redis_cluster: LocalCluster, machines: Start) -> None:
    plain = machines("plain")
    with Client(plain.socket) as c:
        with pytest.raises(Unsupported, match="--remote"):
            c.put("s/k", torch.ones(4), share=True)
        with pytest.raises(Unsupported, match="remote tier"):
            c.ls(remote=True)
        c.put("s/k", torch.ones(4))  # the daemon goes on
    a = machines("a", *_remote(redis_cluster, _prefix()))
    with Client(a.socket) as c, pytest.raises(InvalidRequest, match="scope"):
        c.put("s/k", torch.ones(4), share=True, scope="client")


def test_a_corrupt_remote_chunk_is_refused_and_b_goes_on(
    redis_cluster: LocalCluster, machines: Start
) -> None:
    from redis.cluster import ClusterNode, RedisCluster

    prefix = _prefix()
    a = machines("a", *_remote(redis_cluster, prefix))
    b = machines("b", *_remote(redis_cluster, prefix))
    t = torch.arange(1 << 20, dtype=torch.int32)
    with Client(a.socket) as ca, Client(b.socket) as cb:
        ca.put("c/t", t, share=True)
        _until_shared(ca, 1)
        rc = RedisCluster(startup_nodes=[ClusterNode("127.0.0.1", redis_cluster.ports[0])])
        try:
            (key,) = rc.scan_iter(match=f"{prefix}:c:*", target_nodes=RedisCluster.PRIMARIES)
            data = bytearray(rc.get(key))
            data[1000] ^= 0xFF
            rc.set(key, bytes(data))
        finally:
            rc.close()
        with pytest.raises(CorruptEntry, match="corrupt on remote"):
            cb.get("c/t")
        assert cb.stats()["remote"]["corrupt"] == 1
        with pytest.raises(NotFound):  # nothing was published on B
            cb.stat("c/t")
        cb.put("b/own", torch.ones(3))  # B goes on
        assert torch.equal(cb.get("b/own"), torch.ones(3))


def test_faults_full_redis_and_a_killed_node(tmp_path: Path, machines: Start, seed: int) -> None:
    cluster = LocalCluster(tmp_path, maxmemory="4mb")  # 12 MB in all
    try:
        prefix = _prefix()
        a = machines("a", *_remote(cluster, prefix))
        b = machines("b", *_remote(cluster, prefix))
        g = torch.Generator().manual_seed(seed)
        small = torch.randn(1000, generator=g)
        big = torch.randn(8 << 20, generator=g)  # 32 MiB: more than Redis may hold
        with Client(a.socket) as ca, Client(b.socket) as cb:
            ca.put("f/small", small, share=True)
            ca.put("f/big", big, share=True)
            _until_shared(ca, 1, "shares_dropped")
            assert _counter(ca, "shares_written") == 1
            assert torch.equal(ca.get("f/big"), big)  # the local entry is unaffected
            # durable="remote" into a full cluster: the put fails and nothing was put here
            ca.delete("f/big")  # room in A's RAM: what refuses the next put is the cluster
            with pytest.raises(TierFull, match="remote"):
                ca.put("f/big-now", big, durable="remote")
            assert ca.ls("f/big-now") == [] and _counter(ca, "shares_dropped") == 2
            assert [e["key"] for e in ca.ls("f/", remote=True)] == ["f/small"]
            with pytest.raises(NotFound):
                cb.get("f/big")

            dead = cluster.node_of(f"{prefix}:r:f/small")
            cluster.kill(dead)
            t0 = time.monotonic()
            with pytest.raises(StorageError, match=r"remote tier \(redis://"):
                cb.get("f/small")
            assert time.monotonic() - t0 < 15  # bounded by the timeouts, never a hang
            cb.put("b/own", torch.ones(3))  # B goes on
            assert torch.equal(cb.get("b/own"), torch.ones(3))
            # a share whose record belongs on the dead node cannot be written: counted, A goes on
            key = next(
                k for k in (f"f/after{i}" for i in range(1000)) if cluster.node_of(f"{prefix}:r:{k}") == dead
            )
            ca.put(key, small, share=True)
            _until_shared(ca, 1, "shares_failed")
            assert torch.equal(ca.get(key), small)
    finally:
        cluster.close()


@pytest.mark.parametrize(
    ("flags", "words"),
    [
        (["--remote", "http://h:1"], ["remote", "redis://HOST:PORT"]),
        (["--remote", "redis://h"], ["remote", "'h' is not HOST:PORT"]),
        (["--remote", "redis://h:1", "--remote-timeout", "0"], ["remote_timeout"]),
        (["--remote", "redis://h:1", "--remote-tls-ca", "/x"], ["remote_tls_ca", "rediss://"]),
        (["--remote", "redis://127.0.0.1:1"], ["remote (--remote)", "cannot use the Redis Cluster"]),
    ],
)
def test_bad_remote_settings_exit_2_with_one_line(
    short_tmp: Path, flags: list[str], words: list[str]
) -> None:
    sock = short_tmp / "tierd.sock"
    r = run_tierd(
        "--socket", str(sock), "--state-dir", str(short_tmp / "state"), "--ram-bytes", "8MiB", *flags
    )
    assert r.returncode == 2, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("tierd: ")]
    assert len(lines) == 1, r.stderr
    for word in words:
        assert word in lines[0], lines[0]
    assert not sock.exists()


def test_redis_is_not_imported_without_remote(daemon: launch.Daemon) -> None:
    """DESIGN invariant 8: only the remote tier's module imports redis, and only with --remote."""
    maps = Path(f"/proc/{daemon.pid}/maps").read_text()
    assert "hiredis" not in maps
    import subprocess
    import sys

    code = "import sys, tierd.server, tierd.share, tierd_client; print('redis' in sys.modules)"
    r = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert r.returncode == 0 and r.stdout.strip() == "False", r.stderr
