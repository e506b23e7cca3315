"""The disk tier against real daemons: demotion and promotion, durability across restarts and kill -9,
a full disk, corruption, evict / show / verify."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from tests.conftest import wait_until
from tierd_client import Client, CorruptEntry, InvalidRequest, NotFound, TierFull

MiB = 1 << 20


def tensor(i: int, n: int = 256 * 1024, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 + i)
    return torch.randn(n, generator=g).to(dtype)


def digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


def test_working_set_larger_than_ram_round_trips(start_daemon) -> None:
    d = start_daemon(ram_bytes="16MiB", disk_bytes="256MiB")
    xs = [tensor(i, 512 * 1024) for i in range(12)]  # 12 x 2 MiB = 24 MiB > the 16 MiB RAM tier
    with Client(d.socket) as c:
        for i, x in enumerate(xs):
            c.put(f"ws/{i}", x)
        for _ in range(2):
            for i, x in enumerate(xs):
                t = c.get(f"ws/{i}")
                assert torch.equal(t, x), f"ws/{i} came back different"
                c.release(t)
        st = c.stats()
        ram, disk = st["tiers"]
        assert ram["used_bytes"] <= ram["capacity_bytes"]
        assert st["counters"]["demotions"] > 0 and st["counters"]["promotions"] > 0
        assert st["counters"]["reads_disk"] == st["counters"]["promotions"]
        assert disk["name"] == "disk" and disk["entries"] > 0
        assert {e["key"] for e in c.ls("ws/")} == {f"ws/{i}" for i in range(12)}


def test_durable_entries_survive_restart_bit_exact(start_daemon) -> None:
    d = start_daemon(disk_bytes="256MiB")
    dtypes = [torch.float32, torch.bfloat16, torch.float16, torch.int8, torch.bool, torch.complex64]
    xs = {f"dur/{i}": tensor(i, 3000 + i).to(dt) for i, dt in enumerate(dtypes)}
    with Client(d.socket) as c:
        for k, x in xs.items():
            c.put(k, x, durable=True, tags=["weight"])
        c.put("dur/volatile", tensor(99))  # not durable: gone after a restart
        c.put("dur/replaced", tensor(1), durable=True)
        c.put("dur/replaced", tensor(2), durable=True)  # newest durable version wins
        c.put("dur/deleted", tensor(3), durable=True)
        c.delete("dur/deleted")
    d.stop()
    d2 = start_daemon(disk_bytes="256MiB")
    with Client(d2.socket) as c:
        keys = {e["key"] for e in c.ls("dur/")}
        assert keys == set(xs) | {"dur/replaced"}
        for k, x in xs.items():
            info = c.stat(k)
            assert info["tiers"] == ["disk"] and info["durable"] and info["tags"] == ["weight"]
            t = c.get(k)
            assert t.dtype == x.dtype and torch.equal(t.view(torch.uint8), x.view(torch.uint8))
        assert torch.equal(c.get("dur/replaced"), tensor(2))
        # a new put after the restart does not reuse an old version number
        h = c.put("dur/new", tensor(5))
        assert h.version > max(c.stat(k)["version"] for k in xs)


WRITER = textwrap.dedent("""
    import hashlib, sys, torch
    from tierd_client import Client
    c = Client(sys.argv[1])
    i = 0
    while True:
        g = torch.Generator().manual_seed(i)
        x = torch.randn(int(torch.randint(1, 600_000, (1,), generator=g)), generator=g)
        c.put(f"k9/{i}", x, durable=True)
        print(i, hashlib.sha256(x.numpy().tobytes()).hexdigest(), flush=True)
        i += 1
""")


@pytest.mark.parametrize("kill_after", [1, 4, 11])
def test_kill_9_during_durable_puts_keeps_every_acknowledged_entry(start_daemon, kill_after: int) -> None:
    d = start_daemon(ram_bytes="32MiB", disk_bytes="512MiB")
    w = subprocess.Popen([sys.executable, "-c", WRITER, str(d.socket)], stdout=subprocess.PIPE, text=True)
    acked: dict[int, str] = {}
    assert w.stdout is not None
    for line in w.stdout:
        i, h = line.split()
        acked[int(i)] = h
        if len(acked) == kill_after:
            os.kill(d.pid, signal.SIGKILL)  # the writer is already sending the next put
            break
    d.proc.wait()
    w.wait(30)
    w.stdout.close()
    d2 = start_daemon(ram_bytes="32MiB", disk_bytes="512MiB")
    with Client(d2.socket) as c:
        present = {int(e["key"].split("/")[1]) for e in c.ls("k9/")}
        assert set(acked) <= present, f"acknowledged but lost: {set(acked) - present}"
        assert present <= set(acked) | {max(acked) + 1}  # at most the put in flight, and only whole
        for i in present:
            t = c.get(f"k9/{i}")
            g = torch.Generator().manual_seed(i)
            x = torch.randn(int(torch.randint(1, 600_000, (1,), generator=g)), generator=g)
            assert torch.equal(t, x)
            if i in acked:
                assert digest(t) == acked[i]
            c.release(t)
        assert all(r["ok"] for r in c.verify("k9/"))


def test_full_disk_is_tier_full_and_nothing_is_lost(start_daemon) -> None:
    d = start_daemon(ram_bytes="16MiB", disk_bytes="16MiB")
    with Client(d.socket) as c:
        kept = []
        with pytest.raises(TierFull) as ei:
            for i in range(64):
                c.put(f"full/{i}", tensor(i, 512 * 1024), durable=True)
                kept.append(i)
        assert ei.value.details["tier"] == "disk"
        assert "disk tier full" in str(ei.value)
        assert len(kept) >= 2
        for i in kept:
            t = c.get(f"full/{i}")
            assert torch.equal(t, tensor(i, 512 * 1024))
            c.release(t)
        assert c.stats()["counters"]["internal_errors"] == 0


def test_corrupt_blob_is_reported_not_served(start_daemon, short_tmp: Path) -> None:
    d = start_daemon(disk_bytes="64MiB")
    marker = torch.arange(0, 1 << 18, dtype=torch.int32)  # a pattern easy to find in the file
    with Client(d.socket) as c:
        c.put("bad/x", marker, durable=True)
        c.put("bad/fine", tensor(7), durable=True)
    d.stop()
    path = short_tmp / "state" / "tierd.lmdb"
    data = bytearray(path.read_bytes())
    at = data.find(marker[1000:1004].numpy().tobytes())
    assert at > 0
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))
    d2 = start_daemon(disk_bytes="64MiB")
    with Client(d2.socket) as c:
        with pytest.raises(CorruptEntry, match="bad/x"):
            c.get("bad/x")
        assert torch.equal(c.get("bad/fine"), tensor(7))
        report = {r["key"]: r for r in c.verify()}
        assert not report["bad/x"]["ok"] and "checksum" in report["bad/x"]["error"]
        assert report["bad/fine"]["ok"]
    cli = subprocess.run([sys.executable, "-m", "tierd_client.tierctl", "--socket", str(d2.socket), "verify"],
                         capture_output=True, text=True)  # fmt: skip
    assert cli.returncode == 1 and "CORRUPT bad/x" in cli.stdout


def test_evict_show_and_leases(start_daemon) -> None:
    d = start_daemon(disk_bytes="64MiB")
    x = tensor(1)
    with Client(d.socket) as c:
        c.put("ev/x", x, tags=["weight"])
        t = c.get("ev/x")
        with pytest.raises(InvalidRequest, match="leased"):
            c.evict("ev/x")
        c.release(t)
        c.pin("ev/x")
        with pytest.raises(InvalidRequest, match="pinned"):
            c.evict("ev/x")
        c.unpin("ev/x")
        out = c.evict("ev/x")
        assert out["moved"] and out["tiers"] == ["disk"]
        info = c.stat("ev/x")
        assert info["tiers"] == ["disk"] and info["stored_bytes"] > 0 and "xxh3" in info["checksum"]
        t = c.get("ev/x")
        assert torch.equal(t, x)
        assert c.stat("ev/x")["tiers"] == ["ram", "disk"]  # inclusive: the clean copy stays
        c.release(t)
        assert c.evict("ev/x")["moved"]  # free: no second write
        assert c.stats()["tiers"][1]["stored_bytes"] == info["stored_bytes"]
    show = subprocess.run([sys.executable, "-m", "tierd_client.tierctl", "--socket", str(d.socket), "show",
                           "ev/x"], capture_output=True, text=True)  # fmt: skip
    assert "disk" in show.stdout and "checksum" in show.stdout and "stored" in show.stdout
    st = json.loads(subprocess.run([sys.executable, "-m", "tierd_client.tierctl", "--socket", str(d.socket),
                                    "status", "--json"], capture_output=True, text=True).stdout)  # fmt: skip
    assert [t["name"] for t in st["tiers"]] == ["ram", "disk"] and "ratio" in st["tiers"][1]


def test_leased_and_pinned_entries_are_never_demoted(start_daemon) -> None:
    d = start_daemon(ram_bytes="16MiB", disk_bytes="256MiB")
    with Client(d.socket) as c:
        c.put("lp/leased", tensor(1, MiB))  # 4 MiB each
        c.put("lp/pinned", tensor(2, MiB))
        c.pin("lp/pinned")
        held = c.get("lp/leased")
        for i in range(8):  # 32 MiB more through a 16 MiB tier
            c.put(f"lp/{i}", tensor(10 + i, MiB))
        assert c.stat("lp/leased")["tiers"][0] == "ram" and c.stat("lp/pinned")["tiers"][0] == "ram"
        assert torch.equal(held, tensor(1, MiB))
        assert c.stats()["counters"]["demotions"] >= 4


def test_ram_full_of_leases_is_tier_full(start_daemon) -> None:
    d = start_daemon(ram_bytes="16MiB", disk_bytes="256MiB")
    with Client(d.socket) as c:
        held = []
        with pytest.raises(TierFull, match="leased, pinned or moving"):
            for i in range(8):
                c.put(f"lf/{i}", tensor(i, MiB))
                held.append(c.get(f"lf/{i}"))
        assert len(held) >= 2


def test_watermark_demotes_in_the_background(start_daemon) -> None:
    d = start_daemon("--ram-high-watermark", "0.5", "--ram-low-watermark", "0.25", ram_bytes="32MiB",
                     disk_bytes="256MiB")  # fmt: skip
    with Client(d.socket) as c:
        for i in range(6):  # 24 MiB: above the 16 MiB high watermark
            c.put(f"wm/{i}", tensor(i, MiB))
        wait_until(
            lambda: c.stats()["tiers"][0]["used_bytes"] <= 8 * MiB, what="RAM use under the low watermark"
        )
        for i in range(6):
            t = c.get(f"wm/{i}")
            assert torch.equal(t, tensor(i, MiB))
            c.release(t)


def test_get_of_missing_version_after_restart(start_daemon) -> None:
    d = start_daemon(disk_bytes="64MiB")
    with Client(d.socket) as c:
        h = c.put("gv/x", tensor(1), durable=True)
    d.stop()
    d2 = start_daemon(disk_bytes="64MiB")
    with Client(d2.socket) as c:
        assert torch.equal(c.get(h), tensor(1))
        with pytest.raises(NotFound):
            c.get("gv/none")


@pytest.mark.parametrize("how", ["codec", "tag rule"])
def test_a_lossy_codec_gives_a_version_one_value_in_every_tier(start_daemon, how: str) -> None:
    # Rounded at the put: the RAM copy is what the disk copy decodes to, before and after eviction
    # and a restart; so a model reads the same weights whether they were evicted or not.
    flags = ("--tag-codecs", "weight=int8") if how == "tag rule" else ()
    kw: dict = {"tags": ["weight"]} if how == "tag rule" else {"codec": "int8"}
    x = tensor(7, 512 * 512).reshape(512, 512).to(torch.bfloat16)
    d = start_daemon(*flags, disk_bytes="64MiB")
    with Client(d.socket) as c:
        c.put("lossy/w", x, **kw)
        c.put("lossy/d", x, durable=True, **kw)
        c.put("lossy/exact", x)  # no lossy codec asked for: stored as given
        t = c.get("lossy/w")
        first = t.clone()
        c.release(t)
        assert not torch.equal(first, x)
        row_absmax = x.float().abs().amax(dim=1, keepdim=True)
        assert ((first.float() - x.float()).abs() <= 0.00784 * row_absmax + 1e-6).all()  # int8's bound
        assert c.evict("lossy/w")["moved"]
        t = c.get("lossy/w")  # promoted from disk
        assert torch.equal(t.view(torch.int16), first.view(torch.int16))
        c.release(t)
        t = c.get("lossy/d")
        durable = t.clone()
        c.release(t)
        assert torch.equal(durable.view(torch.int16), first.view(torch.int16))
        t = c.get("lossy/exact")
        assert torch.equal(t.view(torch.int16), x.view(torch.int16))
        c.release(t)
    d.stop()
    d2 = start_daemon(*flags, disk_bytes="64MiB")
    with Client(d2.socket) as c:
        t = c.get("lossy/d")
        assert torch.equal(t.view(torch.int16), first.view(torch.int16))
        c.release(t)


def _resident_bytes(path: Path) -> int:
    """Bytes of ``path`` in the page cache: mincore over a fresh read-only mapping of it."""
    import ctypes
    import mmap

    import numpy as np

    size = path.stat().st_size
    pages = -(-size // mmap.PAGESIZE)
    vec = (ctypes.c_ubyte * pages)()
    libc = ctypes.CDLL(None, use_errno=True)
    with open(path, "rb") as f, mmap.mmap(f.fileno(), size, prot=mmap.PROT_READ) as mm:
        arr = np.frombuffer(mm, dtype=np.uint8)
        rc = libc.mincore(ctypes.c_void_p(arr.ctypes.data), ctypes.c_size_t(size), vec)
        del arr
    assert rc == 0, ctypes.get_errno()
    return sum(v & 1 for v in vec) * mmap.PAGESIZE


def test_disk_tier_leaves_no_value_in_the_page_cache(tmp_path: Path) -> None:
    # A promoted entry must not sit in RAM twice (the tier's copy and the page cache's): values
    # are read with pread into the destination and their pages dropped, writes are dropped too.
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np

    from tierd.codecs import get_codec
    from tierd.tiers.disk import DiskTier

    disk = DiskTier(tmp_path / "state", 256 << 20)
    try:
        # one chunk: with two read in parallel, readahead for one can bring back pages of the other
        raw = np.random.default_rng(0).integers(0, 255, (12 << 20) + 123, dtype=np.uint8)
        plan = get_codec("raw").prepare(memoryview(raw), "uint8", [raw.size], 16 << 20)
        meta = {"key": "pc/x", "version": 1, "dtype": "uint8", "shape": [raw.size], "nbytes": raw.size,
                "tags": [], "durable": True, "ttl": None, "scope": "shared", "created": 0.0}  # fmt: skip
        with ThreadPoolExecutor(2) as pool:
            rec = disk.write(meta, plan, memoryview(raw), pool)
            assert _resident_bytes(disk.path) < (2 << 20)  # written, then dropped
            out = bytearray(raw.size)
            disk.read_into(rec, memoryview(out), pool)
        assert bytes(out) == raw.tobytes()
        assert _resident_bytes(disk.path) < (2 << 20)  # read, then dropped
    finally:
        disk.close()


def test_raw_read_checks_every_chunk_read_into_place(tmp_path: Path) -> None:
    # A raw entry is read with pread straight into the destination, chunk by chunk: a flipped byte
    # in its second chunk is CorruptEntry (the caller then does not publish the destination).
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np

    from tierd.codecs import get_codec
    from tierd.tiers.disk import DiskTier

    raw = np.random.default_rng(1).integers(0, 255, (20 << 20) + 5, dtype=np.uint8)
    plan = get_codec("raw").prepare(memoryview(raw), "uint8", [raw.size], 16 << 20)
    assert plan.n_chunks == 2
    meta = {"key": "pr/x", "version": 1, "dtype": "uint8", "shape": [raw.size], "nbytes": raw.size,
            "tags": [], "durable": True, "ttl": None, "scope": "shared", "created": 0.0}  # fmt: skip
    disk = DiskTier(tmp_path / "state", 256 << 20)
    with ThreadPoolExecutor(2) as pool:
        try:
            rec = disk.write(meta, plan, memoryview(raw), pool)
        finally:
            disk.close()
        path = tmp_path / "state" / "tierd.lmdb"
        data = bytearray(path.read_bytes())
        at = data.find(raw[(17 << 20) : (17 << 20) + 64].tobytes())
        assert at > 0
        data[at] ^= 0xFF
        path.write_bytes(bytes(data))
        disk = DiskTier(tmp_path / "state", 256 << 20)
        try:
            out = bytearray(raw.size)
            with pytest.raises(CorruptEntry, match="chunk 1 of 2: checksum"):
                disk.read_into(rec, memoryview(out), pool)
            assert bytes(out[: 16 << 20]) == raw[: 16 << 20].tobytes()
            assert disk.stats()["corrupt"] == 1
        finally:
            disk.close()


def _direct_io_here(directory: Path) -> bool:
    probe = directory / "probe"
    probe.write_bytes(b"\0" * 4096)
    try:
        os.close(os.open(probe, os.O_RDONLY | os.O_DIRECT))
        return True
    except OSError:
        return False
    finally:
        probe.unlink()


def _aligned(n: int, shift: int = 0):
    """A writable view of n bytes at ``shift`` bytes past a page boundary."""
    import mmap

    m = mmap.mmap(-1, n + 4096)
    return memoryview(m)[shift : shift + n]


def _meta(key: str, version: int, n: int) -> dict:
    return {"key": key, "version": version, "dtype": "uint8", "shape": [n], "nbytes": n, "tags": [],
            "durable": True, "ttl": None, "scope": "shared", "created": 0.0}  # fmt: skip


def _write(disk, pool, key: str, version: int, raw):
    from tierd.codecs import get_codec

    plan = get_codec("raw").prepare(memoryview(raw), "uint8", [raw.size], 16 << 20)
    return disk.write(_meta(key, version, raw.size), plan, memoryview(raw), pool)


def test_big_chunks_are_read_straight_into_ram_with_o_direct(tmp_path: Path) -> None:
    # A chunk of LEAD_MIN bytes or more is stored after a lead that puts its first byte on a block
    # boundary of the file; where it lies is known from its write (or first read), and it is read
    # with O_DIRECT into the destination: no page cache, no copy. Sizes: two chunks with a 5-byte
    # tail, one chunk with a tail under a block, whole blocks, and two below LEAD_MIN (read with
    # pread). A destination off the alignment O_DIRECT needs is read the other way, bytes the same.
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np

    from tierd.tiers import disk as disk_mod

    rng = np.random.default_rng(7)
    sizes = [(20 << 20) + 5, 100_000, 20 * 4096, 3000, disk_mod.LEAD_MIN - 1]
    raws = [rng.integers(0, 255, n, dtype=np.uint8) for n in sizes]
    big = sum(n for n in sizes if n >= disk_mod.LEAD_MIN)
    direct = _direct_io_here(tmp_path)
    with ThreadPoolExecutor(2) as pool:
        disk = disk_mod.DiskTier(tmp_path / "state", 1 << 30)
        try:
            assert (disk._lead + 16) % disk_mod.DIRECT_BLOCK == 0 and disk._lead_min == disk_mod.LEAD_MIN
            recs = [_write(disk, pool, f"d/{i}", i + 1, raw) for i, raw in enumerate(raws)]
            for rec, raw in zip(recs, raws, strict=True):
                out = _aligned(raw.size)
                disk.read_into(rec, out, pool)
                assert bytes(out) == raw.tobytes(), rec.key
            assert disk.stats()["direct_read_bytes"] == (big if direct else 0)
            assert _resident_bytes(disk.path) < (1 << 20), _resident_bytes(disk.path)
            for rec, raw in zip(recs, raws, strict=True):
                out = _aligned(raw.size, shift=64)
                disk.read_into(rec, out, pool)
                assert bytes(out) == raw.tobytes(), rec.key
            assert disk.stats()["direct_read_bytes"] == (big if direct else 0)
        finally:
            disk.close()
        disk = disk_mod.DiskTier(tmp_path / "state", 1 << 30)  # a restart: the records keep the places
        try:
            recs = sorted(disk.load_index(lambda r: True), key=lambda r: r.version)
            assert [len(r.places) for r in recs] == [2, 1, 1, 0, 0]
            for rec, raw in zip(recs, raws, strict=True):
                out = _aligned(raw.size)
                disk.read_into(rec, out, pool)
                assert bytes(out) == raw.tobytes(), rec.key
            assert disk.stats()["direct_read_bytes"] == (big if direct else 0)
            assert disk.stats()["corrupt"] == 0
        finally:
            disk.close()


def test_a_file_written_before_leads_is_read_as_it_is(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A file from before the lead layout has chunks without one and no layout record: it keeps
    # that layout (lead 0), so a value is never cut short by a lead it does not have.
    from concurrent.futures import ThreadPoolExecutor

    import lmdb
    import numpy as np

    from tierd.tiers import disk as disk_mod

    raw = np.random.default_rng(8).integers(0, 255, (17 << 20) + 3, dtype=np.uint8)
    with ThreadPoolExecutor(2) as pool:
        monkeypatch.setattr(disk_mod, "LEAD_MIN", (1 << 32) - 1)  # no chunk gets a lead
        disk = disk_mod.DiskTier(tmp_path / "state", 1 << 30)
        try:
            old = _write(disk, pool, "old/x", 1, raw)
        finally:
            disk.close()
        env = lmdb.open(str(tmp_path / "state" / "tierd.lmdb"), subdir=False, max_dbs=3)
        with env.begin(db=env.open_db(b"info"), write=True) as txn:
            assert txn.delete(disk_mod._LAYOUT_KEY)  # as a file from before leads
        env.close()
        monkeypatch.undo()
        disk = disk_mod.DiskTier(tmp_path / "state", 1 << 30)
        try:
            assert disk._lead == 0
            new = _write(disk, pool, "new/x", 2, raw)
            for rec in (old, new, old):
                out = _aligned(raw.size)
                disk.read_into(rec, out, pool)
                assert bytes(out) == raw.tobytes()
            assert disk.verify(old) is None and disk.verify(new) is None
            assert disk.stats()["direct_read_bytes"] == 0
        finally:
            disk.close()


def test_a_wrong_place_is_read_again_through_lmdb_and_corruption_still_caught(tmp_path: Path) -> None:
    # A remembered place that no longer holds the chunk (it cannot happen while the key exists; the
    # checksum is the guard) gives the right bytes through LMDB. A flipped byte on the disk is still
    # CorruptEntry, whichever way the chunk is read.
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np

    from tierd.tiers import disk as disk_mod

    raw = np.random.default_rng(9).integers(0, 255, 32 << 20, dtype=np.uint8)  # two whole chunks
    with ThreadPoolExecutor(2) as pool:
        disk = disk_mod.DiskTier(tmp_path / "state", 1 << 30)
        try:
            rec = _write(disk, pool, "w/x", 1, raw)
            places = disk._where[rec.version]
            assert len(places) == 2 and None not in places
            disk._where[rec.version] = [places[1], places[0]]  # each chunk points at the other
            out = _aligned(raw.size)
            disk.read_into(rec, out, pool)
            assert bytes(out) == raw.tobytes() and disk.stats()["corrupt"] == 0
            disk.read_into(rec, out, pool)  # learned again: the places are right once more
            assert disk._where[rec.version] == places
            disk._where[rec.version] = [places[0], (1 << 40)]  # past the file's end: a short read
            disk.read_into(rec, out, pool)
            assert bytes(out) == raw.tobytes() and disk.stats()["corrupt"] == 0
            fd = os.open(disk.path, os.O_RDWR)
            try:
                byte = os.pread(fd, 1, places[1] + 12345)
                os.pwrite(fd, bytes([byte[0] ^ 0xFF]), places[1] + 12345)
            finally:
                os.close(fd)
            with pytest.raises(CorruptEntry, match="chunk 1 of 2: checksum"):
                disk.read_into(rec, _aligned(raw.size), pool)
            assert disk.stats()["corrupt"] == 1
        finally:
            disk.close()


def test_the_write_staging_buffer_is_let_go_under_pressure(tmp_path: Path) -> None:
    # A chunk is staged behind its lead in a buffer kept for the next write (as large as the
    # chunk and its lead); memory pressure takes it back at once, or, while a chunk is being
    # written in it, right after.
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np

    from tierd.tiers import disk as disk_mod

    raw = np.random.default_rng(10).integers(0, 255, 1 << 20, dtype=np.uint8)
    with ThreadPoolExecutor(2) as pool:
        disk = disk_mod.DiskTier(tmp_path / "state", 1 << 30)
        try:
            assert disk.shed() == 0  # nothing staged yet
            _write(disk, pool, "s/a", 1, raw)
            assert disk.shed() == disk._lead + raw.size and disk._stage is None
            _write(disk, pool, "s/b", 2, raw)
            with disk._stage_lock:  # as if a chunk were being written in it
                assert disk.shed() == 0 and disk._stage is not None
            _write(disk, pool, "s/c", 3, raw)
            assert disk._stage is None  # let go after that chunk
            for v, key in enumerate(["s/a", "s/b", "s/c"], 1):
                rec = next(r for r in disk.load_index(lambda r: True) if r.version == v)
                out = _aligned(raw.size)
                disk.read_into(rec, out, pool)
                assert bytes(out) == raw.tobytes(), key
        finally:
            disk.close()


def test_a_write_holds_few_encoded_chunks_at_once(tmp_path: Path) -> None:
    # Encoded chunks wait in memory until stored: a write encodes at most ENCODE_AHEAD chunks
    # beyond the one it stores, not all of them (a whole compressed copy of a large entry).
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np

    from tierd.codecs import get_codec
    from tierd.tiers import disk as disk_mod
    from tierd.tiers.store import ENCODE_AHEAD

    class Counting(ThreadPoolExecutor):
        submitted = 0

        def submit(self, *a, **k):  # type: ignore[no-untyped-def, override]
            self.submitted += 1
            return super().submit(*a, **k)

    raw = np.random.default_rng(11).normal(size=(12 << 20) // 4).astype(np.float32)  # 12 chunks
    ahead: list[int] = []
    with Counting(2) as pool:
        disk = disk_mod.DiskTier(tmp_path / "state", 1 << 30)
        put_chunk = disk._put_chunk

        def counted(version: int, index: int, data: object) -> None:
            ahead.append(pool.submitted - index - 1)  # encoded or encoding beyond this one
            put_chunk(version, index, data)

        disk._put_chunk = counted  # type: ignore[method-assign]
        try:
            plan = get_codec("zstd").prepare(memoryview(raw), "float32", [raw.size], 1 << 20)
            meta = {**_meta("z/a", 1, raw.nbytes), "dtype": "float32", "shape": [raw.size]}
            rec = disk.write(meta, plan, memoryview(raw), pool)
            assert len(ahead) == plan.n_chunks == 12
            assert max(ahead) == ENCODE_AHEAD and ahead[-1] == 0, ahead
            out = _aligned(raw.nbytes)
            disk.read_into(rec, out, pool)
            assert bytes(out) == raw.tobytes()
        finally:
            disk.close()
