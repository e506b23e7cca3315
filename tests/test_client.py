"""The client against a real daemon: zero-copy views, every dtype, leases, lifetimes, processes."""

from __future__ import annotations

import gc
import hashlib
import multiprocessing as mp
import signal
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest
import torch

from tests.conftest import wait_until
from tierd.launch import Daemon
from tierd.protocol import DTYPE_SIZES
from tierd_client import (
    Client,
    DaemonTimeout,
    DaemonUnavailable,
    Handle,
    InvalidRequest,
    NotFound,
    NotLeased,
    TierFull,
    Unsupported,
)


def test_put_get_is_a_zero_copy_view_of_the_arena(daemon: Daemon) -> None:
    x = torch.randn(256, 1024)
    with Client(daemon.socket) as c:
        h = c.put("demo/w", x)
        assert isinstance(h, Handle) and h.key == "demo/w" and h.version > 0
        a, b = c.get("demo/w"), c.get(h)
        assert torch.equal(a, x) and a.dtype == x.dtype and a.shape == x.shape
        assert c.arena is not None and c.arena.contains(a) and c.arena.contains(b)
        assert a.data_ptr() == b.data_ptr()  # two gets: the same memory, not two copies
        assert c.stats()["leases"] == 2


def test_two_processes_see_the_same_bytes(daemon: Daemon) -> None:
    x = torch.arange(4096, dtype=torch.int64)
    with Client(daemon.socket) as c:
        c.put("demo/shared", x)
        code = textwrap.dedent(f"""
            import torch
            from tierd_client import Client
            with Client({str(daemon.socket)!r}) as c:
                t = c.get("demo/shared")
                print(int(t.sum()), c.arena.contains(t))
        """)
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        assert out.stdout.split() == [str(int(x.sum())), "True"]


def test_got_tensors_are_read_only(daemon: Daemon) -> None:
    code = textwrap.dedent(f"""
        import torch
        from tierd_client import Client
        c = Client({str(daemon.socket)!r})
        c.put("demo/ro", torch.zeros(16))
        t = c.get("demo/ro")
        print("writing", flush=True)
        t.add_(1)
    """)
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert "writing" in p.stdout and p.returncode == -signal.SIGSEGV
    with Client(daemon.socket) as c:
        t = c.get("demo/ro")
        assert torch.equal(t, torch.zeros(16))  # the entry did not change
        assert c.stats()["leases"] == 1  # ours; the dead writer's lease is gone


TORCH_DTYPES = [getattr(torch, n) for n in DTYPE_SIZES if isinstance(getattr(torch, n, None), torch.dtype)]


@pytest.mark.parametrize("dtype", TORCH_DTYPES, ids=str)
def test_every_dtype_round_trips_bit_exact(daemon: Daemon, dtype: torch.dtype, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    raw = torch.randint(0, 256, (3, 5, 8 * 16), dtype=torch.uint8, generator=g)
    x = raw.view(dtype) if dtype != torch.bool else raw.bool()
    with Client(daemon.socket) as c:
        c.put("dt/x", x)
        t = c.get("dt/x")
        assert t.dtype == dtype and t.shape == x.shape
        assert torch.equal(t.view(torch.uint8), x.view(torch.uint8))


@pytest.mark.parametrize(
    "x",
    [
        torch.tensor(3.5),  # 0-d
        torch.empty(0, 7),  # zero elements
        torch.randn(64, 32).t(),  # non-contiguous
        torch.randn(8, 8, requires_grad=True),
        torch.randn(10, 10)[::3, 1::2],
    ],
    ids=["scalar", "empty", "transposed", "requires_grad", "strided"],
)
def test_odd_tensors(daemon: Daemon, x: torch.Tensor) -> None:
    with Client(daemon.socket) as c:
        c.put("odd/x", x)
        t = c.get("odd/x")
        assert t.shape == x.shape and torch.equal(t, x.detach()) and t.is_contiguous()


@pytest.mark.parametrize("dtype", ["float32", "float16", "int8", "uint64", "bool", "complex64"])
def test_numpy_arrays(daemon: Daemon, dtype: str) -> None:
    a = (np.arange(60).reshape(3, 4, 5) % 7).astype(dtype)
    with Client(daemon.socket) as c:
        c.put("np/a", a[:, ::2])
        t = c.get("np/a")
        assert np.array_equal(t.numpy(), a[:, ::2])


def test_bad_values_are_refused_locally(daemon: Daemon) -> None:
    with Client(daemon.socket) as c:
        with pytest.raises(InvalidRequest):
            c.put("bad/list", [1, 2, 3])
        with pytest.raises(InvalidRequest):
            c.put("bad/obj", np.array(["a", "b"]))
        with pytest.raises(InvalidRequest):
            c.put("bad key", torch.zeros(1))
        with pytest.raises(Unsupported, match="disk tier"):
            c.put("bad/durable", torch.zeros(1), durable=True)
        assert c.ls() == []


def test_lease_ends_when_tensor_is_collected(daemon: Daemon) -> None:
    with Client(daemon.socket) as c:
        c.put("gc/x", torch.ones(1000))
        t = c.get("gc/x")
        view = t[10:20]  # a view keeps the lease alive
        del t
        gc.collect()
        assert c.stats()["leases"] == 1
        assert torch.equal(view, torch.ones(10))
        del view
        gc.collect()
        assert c.stats()["leases"] == 0  # queued by the finalizer, sent with this request


def test_release_by_tensor_key_and_handle(daemon: Daemon) -> None:
    with Client(daemon.socket) as c:
        h = c.put("rel/x", torch.ones(4))
        t1, t2, t3 = c.get("rel/x"), c.get("rel/x"), c.get(h)
        c.release(t1)
        assert c.stats()["leases"] == 2
        with pytest.raises(NotLeased):
            c.release(t1)
        c.release(h)  # every lease of this client on that version
        assert c.stats()["leases"] == 0
        with pytest.raises(NotLeased):
            c.release("rel/x")
        with pytest.raises(NotLeased):
            c.release(torch.ones(4))
        del t2, t3


def test_a_leased_region_is_never_reused(daemon: Daemon) -> None:
    with Client(daemon.socket) as c:
        c.put("reuse/a", torch.full((1 << 20,), 7.0))
        old = c.get("reuse/a")
        c.put("reuse/a", torch.full((1 << 20,), 9.0))  # new version; old one still leased
        c.delete("reuse/a")
        # fill the tier with other entries: none may land on the leased bytes
        n = 0
        with pytest.raises(TierFull):
            while True:
                c.put(f"reuse/fill{n}", torch.full((1 << 18,), float(n)))
                n += 1
        assert n > 10 and torch.equal(old, torch.full((1 << 20,), 7.0))
        with pytest.raises(NotFound):
            c.get("reuse/a")
        c.release(old)
        c.put("reuse/b", torch.ones(1 << 18))  # the freed bytes are usable again


def test_delete_of_leased_entry_hides_it_for_others(daemon: Daemon) -> None:
    with Client(daemon.socket) as a, Client(daemon.socket) as b:
        a.put("del/x", torch.arange(10))
        t = a.get("del/x")
        b.delete("del/x")
        before = b.stats()["counters"]
        with pytest.raises(NotFound):
            b.get("del/x")
        after = b.stats()["counters"]
        # a miss is counted as one, not as a failed request
        assert after["not_found"] == before["not_found"] + 1 and after["errors"] == before["errors"]
        assert torch.equal(t, torch.arange(10))
        used = b.stats()["tiers"][0]["used_bytes"]
        a.release(t)  # one-way: a's next round trip is answered after it was handled
        assert a.stats()["tiers"][0]["used_bytes"] < used


def _hold_leases(sock: str, ready: mp.Event) -> None:
    c = Client(sock)
    c.put("kill/x", torch.ones(100))
    held = [c.get("kill/x") for _ in range(5)]
    ready.set()
    threading.Event().wait()  # parked, holding its leases, until the test kills it
    del held


def test_kill_9_client_loses_leases_within_a_second(daemon: Daemon) -> None:
    ctx = mp.get_context("spawn")
    ready = ctx.Event()
    p = ctx.Process(target=_hold_leases, args=(str(daemon.socket), ready))
    p.start()
    assert ready.wait(30)
    with Client(daemon.socket) as c:
        assert c.stats()["leases"] == 5
        p.kill()
        p.join()
        killed = time.monotonic()
        wait_until(lambda: c.stats()["leases"] == 0, timeout=1.0, what="the dead client's leases to end")
        assert time.monotonic() - killed < 1.0
        assert c.stats()["clients"] == 1
        assert [e["key"] for e in c.ls()] == ["kill/x"]  # shared entries outlive their writer


def test_scope_client_entries_go_on_disconnect(daemon: Daemon) -> None:
    with Client(daemon.socket) as obs:
        with Client(daemon.socket) as c:
            c.put("kv/b0", torch.ones(10), scope="client", tags=["kv"])
            c.put("kv/keep", torch.ones(10))
            assert obs.stat("kv/b0")["scope"] == "client"
        wait_until(lambda: [e["key"] for e in obs.ls("kv/")] == ["kv/keep"], what="kv/b0 to go")


def test_ttl_expires_after_last_access(daemon: Daemon) -> None:
    with Client(daemon.socket) as c:
        c.put("ttl/x", torch.ones(10), ttl=0.3)
        c.put("ttl/y", torch.ones(10))
        wait_until(lambda: [e["key"] for e in c.ls("ttl/")] == ["ttl/y"], timeout=5, what="ttl/x to expire")
        assert c.stats()["counters"]["expired"] == 1


def test_pin_unpin_prefetch_stat(daemon: Daemon) -> None:
    with Client(daemon.socket) as c:
        c.put("p/x", torch.ones(3), tags=["weight", "layer0"])
        c.pin("p/x")
        info = c.stat("p/x")
        assert info["pinned"] == ["ram"] and info["tags"] == ["weight", "layer0"] and info["tiers"] == ["ram"]
        assert c.unpin("p/x") is True
        with pytest.raises(Unsupported):
            c.pin("p/x", tier="gpu")
        assert c.prefetch(["p/x", "p/missing"]) == 1
        assert c.stats()["counters"]["prefetch_hints"] == 2
        with pytest.raises(NotFound):
            c.stat("p/missing")


def test_get_many_all_or_nothing(daemon: Daemon) -> None:
    with Client(daemon.socket) as c:
        hs = [c.put(f"m/{i}", torch.full((4,), float(i))) for i in range(8)]
        ts = c.get_many([*hs[:4], "m/4", "m/5", "m/6", "m/7"])
        assert [int(t[0]) for t in ts] == list(range(8))
        with pytest.raises(NotFound):
            c.get_many(["m/0", "m/nope"])
        assert c.stats()["leases"] == 8


def test_client_after_daemon_death_and_fork(daemon: Daemon) -> None:
    from tierd_client import DaemonUnavailable

    c = Client(daemon.socket)
    c.put("d/x", torch.arange(5))
    t = c.get("d/x")
    daemon.kill()
    assert torch.equal(t, torch.arange(5))  # the mapping outlives the daemon: no crash
    with pytest.raises(DaemonUnavailable):
        c.stats()
    c.close()
    with pytest.raises(DaemonUnavailable, match="no tierd at"):
        Client(daemon.socket)


def _worker(sock: str, wid: int, n: int, seed: int, out: mp.Queue) -> None:
    rng = np.random.default_rng(seed + wid)
    with Client(sock) as c:
        sums = {}
        for i in range(n):
            a = rng.standard_normal(int(rng.integers(1, 50_000))).astype(np.float32)
            key = f"mp/{wid}/{i}"
            c.put(key, a)
            sums[key] = hashlib.sha256(a.tobytes()).hexdigest()
        out.put(sums)
        # read everybody's entries (theirs may still be arriving): verify what is there
        seen = 0
        for other in range(4):
            for i in range(n):
                try:
                    t = c.get(f"mp/{other}/{i}")
                except NotFound:
                    continue
                out.put((f"mp/{other}/{i}", hashlib.sha256(t.numpy().tobytes()).hexdigest()))
                c.release(t)
                seen += 1
        out.put(("seen", wid, seen))


def test_four_processes_put_and_get_with_checksums(daemon: Daemon, seed: int) -> None:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(str(daemon.socket), w, 25, seed, q)) for w in range(4)]
    for p in procs:
        p.start()
    written: dict[str, str] = {}
    reads: list[tuple[str, str]] = []
    done = 0
    while done < 4:
        item = q.get(timeout=60)
        if isinstance(item, dict):
            written.update(item)
        elif item[0] == "seen":
            done += 1
            assert item[2] >= 25  # at least its own entries
        else:
            reads.append(item)
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    assert len(written) == 100
    for key, digest in reads:
        assert written[key] == digest, f"{key} read back different bytes"
    with Client(daemon.socket) as c:
        assert len(c.ls("mp/")) == 100
        for key, digest in written.items():
            t = c.get(key)
            assert hashlib.sha256(t.numpy().tobytes()).hexdigest() == digest
            c.release(t)
        assert c.stats()["leases"] == 0


def test_release_many_in_one_frame_all_or_nothing(daemon: Daemon) -> None:
    with Client(daemon.socket) as c:
        for i in range(4):
            c.put(f"rm/{i}", torch.full((8,), float(i)))
        ts = c.get_many([f"rm/{i}" for i in range(4)])
        with pytest.raises(NotLeased):
            c.release([ts[0], ts[1], torch.zeros(8)])  # one bad item: nothing is released
        assert c.stats()["leases"] == 4
        c.release([ts[0], ts[1], "rm/2"])
        assert c.stats()["leases"] == 1
        c.release((ts[3],))
        assert c.stats()["leases"] == 0


@pytest.mark.parametrize(
    "make",
    [
        lambda: torch.randn(300, 7),
        lambda: torch.randn(8, 9, dtype=torch.bfloat16),
        lambda: torch.randn(5, 5, dtype=torch.complex64).conj(),
        lambda: torch.randn(4, 4)[:, 1],
    ],
    ids=["contiguous", "bf16", "lazy-conj", "column"],
)
def test_put_copy_paths(daemon: Daemon, make) -> None:
    x = make()
    with Client(daemon.socket) as c:
        c.put("cp/x", x)
        t = c.get("cp/x")
        assert torch.equal(t, x.resolve_conj()) and not t.is_conj()


def test_a_hung_daemon_gives_a_typed_timeout_and_a_closed_client(hung_peer) -> None:
    peer = hung_peer(then=b"\x10\x00\x00\x00\x91")  # half of a reply frame, never finished
    c = Client(peer.socket, timeout=0.3)
    t0 = time.monotonic()
    with pytest.raises(DaemonTimeout, match="did not answer Status"):
        c.stats()
    assert 0.28 <= time.monotonic() - t0 < 2.3
    assert c.closed  # a late reply could not be matched: the connection is gone
    with pytest.raises(DaemonUnavailable, match="closed"):
        c.ls()
    with pytest.raises(DaemonTimeout, match="HELLO"):
        Client(hung_peer(welcome=False).socket, timeout=0.3)
