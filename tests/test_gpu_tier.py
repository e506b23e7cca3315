"""The GPU tier (issue 11), one suite over its device backends.

``simulated`` always runs (CI has no GPU): memfd slabs, copies that complete late, real events.
``cuda`` runs the same tests where a CUDA device and cuda-bindings are present (marker ``gpu``);
elsewhere it is reported as skipped, never as passed. Every test runs a real daemon subprocess;
the device-level tests at the end drive the simulated device and the tier in-process.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import mmap
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import wait_until
from tierd import launch
from tierd.errors import TierFull, Unsupported
from tierd.gpu.device import DeviceOOM
from tierd.gpu.simulated import GRANULARITY, SimulatedDevice
from tierd.tiers.gpu import GpuTier
from tierd_client import Client

MiB = 1 << 20
ROOT = Path(__file__).resolve().parent.parent


def _cuda_present() -> bool:
    return importlib.util.find_spec("cuda") is not None and torch.cuda.is_available()


BACKENDS = [
    "simulated",
    pytest.param(
        "cuda",
        marks=[pytest.mark.gpu, pytest.mark.skipif(not _cuda_present(), reason="no CUDA device here")],
    ),
]


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def gpu_daemon(short_tmp: Path, backend: str):
    """start(gpu_bytes, *flags, ram_bytes=..., disk_bytes=...) -> a daemon with a GPU tier."""
    started: list[launch.Daemon] = []

    def start(gpu_bytes: str = "16MiB", *flags: str, ram_bytes: str = "64MiB", disk_bytes: str = "0"):
        d = launch.start(
            short_tmp / "tierd.sock", "--state-dir", str(short_tmp / "state"), "--disk-bytes", disk_bytes,
            "--gpu-backend", backend, "--gpu-bytes", gpu_bytes, *flags,
            ram_bytes=ram_bytes, log_path=short_tmp / "tierd.log",
        )  # fmt: skip
        started.append(d)
        return d

    yield start
    for d in started:
        running = d.proc.poll() is None
        rc = d.stop()
        if running:
            assert rc == 0, f"tierd exited with {rc}; log:\n{d.log()}"


def on_device(t: torch.Tensor, backend: str) -> torch.Tensor:
    """The tensor as CPU bytes to compare (a CUDA tensor is copied back)."""
    if backend == "cuda":
        assert t.device.type == "cuda"
        return t.cpu()
    assert t.device.type == "cpu"
    return t


def counters(c: Client) -> dict[str, int]:
    return dict(c.stats()["counters"])


def test_get_from_gpu_promotes_once_then_hits(gpu_daemon, backend: str) -> None:
    d = gpu_daemon()
    with Client(d.socket) as c:
        x = torch.randn(256, 1024)
        c.put("m/w", x)
        assert c.stat("m/w")["tiers"] == ["ram"]
        t = c.get("m/w", tier="gpu")
        assert torch.equal(on_device(t, backend), x)
        assert c.arena is not None and not c.arena.contains(t)  # not the RAM copy: a slab's
        assert c.stat("m/w")["tiers"] == ["gpu", "ram"]  # the RAM copy stays (inclusive)
        before = counters(c)
        assert before["gpu_promotions"] == 1 and before["hits_gpu"] == 0
        c.release(t)
        t2 = c.get("m/w", tier="gpu")
        assert torch.equal(on_device(t2, backend), x)
        after = counters(c)
        assert after["hits_gpu"] == 1 and after["gpu_promotions"] == 1
        # get_many in one round trip, mixed resident / not
        y = torch.arange(4096, dtype=torch.int32)
        c.put("m/y", y)
        a, b = c.get_many(["m/w", "m/y"], tier="gpu")
        assert torch.equal(on_device(a, backend), x) and torch.equal(on_device(b, backend), y)
        tiers = {t["name"]: t for t in c.stats()["tiers"]}
        assert list(tiers) == ["gpu", "ram"]
        assert tiers["gpu"]["entries"] == 2 and tiers["gpu"]["device"]["backend"] == backend


def test_a_reader_that_does_not_wait_reads_old_bytes(gpu_daemon, backend: str) -> None:
    """The copy lands late (simulated: a second after it was queued): the event is what makes it
    safe. A second leaves room for a loaded CI machine between the reply and the early read."""
    if backend != "simulated":
        pytest.skip("only the simulated device holds a copy back on purpose")
    d = gpu_daemon("16MiB", "--gpu-sim-delay-ms", "1000")
    with Client(d.socket) as c:
        x = torch.full((1024,), 7.0)
        c.put("m/late", x)
        t0 = time.monotonic()
        t = c.get("m/late", tier="gpu", wait=False)
        replied = time.monotonic() - t0
        early = t.clone()
        assert replied < 1.0, "the reply must not wait for the copy"
        assert not torch.equal(early, x), "read before the copy landed: must not see the new bytes"
        assert torch.count_nonzero(early) == 0  # a fresh slab's bytes
        c.wait_gpu(t)
        assert torch.equal(t, x)
        # with wait (the default) the bytes are there when get returns
        c.put("m/late2", x * 2)
        assert torch.equal(c.get("m/late2", tier="gpu"), x * 2)


def test_gpu_leases_hold_copies_and_full_is_tier_full(gpu_daemon, backend: str) -> None:
    d = gpu_daemon("4MiB")  # two 2 MiB slabs at most
    with Client(d.socket) as c:
        xs = {k: torch.full((384 * 1024,), float(i)) for i, k in enumerate("abcd")}  # 1.5 MiB each
        for k, x in xs.items():
            c.put(f"m/{k}", x)
        ta = c.get("m/a", tier="gpu")
        tb = c.get("m/b", tier="gpu")
        c.release(tb)
        tc = c.get("m/c", tier="gpu")  # no room: b (unleased) leaves the GPU, a (leased) stays
        assert c.stat("m/b")["tiers"] == ["ram"]
        assert c.stat("m/a")["tiers"] == ["gpu", "ram"]
        assert torch.equal(on_device(ta, backend), xs["a"]) and torch.equal(on_device(tc, backend), xs["c"])
        with pytest.raises(TierFull) as err:
            c.get("m/d", tier="gpu")  # a and c leased: nothing can go
        assert err.value.details["tier"] == "gpu" and "gpu tier full" in str(err.value)
        assert c.stat("m/d")["tiers"] == ["ram"]  # nothing changed
        c.release(ta)
        td = c.get("m/d", tier="gpu")
        assert torch.equal(on_device(td, backend), xs["d"])
        assert c.stat("m/a")["tiers"] == ["ram"]
        # a plain get still serves RAM, beside the GPU lease
        assert torch.equal(c.get("m/d"), xs["d"])


def test_pin_and_put_to_gpu(gpu_daemon, backend: str) -> None:
    d = gpu_daemon("4MiB")
    with Client(d.socket) as c:
        x = torch.randn(384 * 1024)
        c.put("m/p", x)
        c.pin("m/p", "gpu")  # promoted, then pinned
        info = c.stat("m/p")
        assert info["tiers"] == ["gpu", "ram"] and info["pinned"] == ["gpu"]
        y = torch.randn(384 * 1024)
        c.put("m/q", y, tier="gpu")  # a put that also asks for the GPU (what a CUDA tensor does)
        assert c.stat("m/q")["tiers"] == ["gpu", "ram"]
        r = torch.randn(384 * 1024)
        c.put("m/r", r)
        tr = c.get("m/r", tier="gpu")  # no room: q (unpinned, unleased) leaves; p is pinned
        assert c.stat("m/q")["tiers"] == ["ram"] and c.stat("m/p")["tiers"] == ["gpu", "ram"]
        with pytest.raises(TierFull):
            c.get("m/q", tier="gpu")  # p pinned, r leased
        assert c.unpin("m/p")
        tq = c.get("m/q", tier="gpu")  # now p may go
        assert c.stat("m/p")["tiers"] == ["ram"]
        assert torch.equal(on_device(tq, backend), y) and torch.equal(on_device(tr, backend), r)


def test_without_a_gpu_tier_gpu_requests_are_unsupported(daemon) -> None:
    with Client(daemon.socket) as c:
        x = torch.ones(16)
        c.put("m/x", x)
        with pytest.raises(Unsupported, match="no gpu tier"):
            c.get("m/x", tier="gpu")
        with pytest.raises(Unsupported, match="gpu"):
            c.pin("m/x", "gpu")
        with pytest.raises(Unsupported, match="no gpu tier"):
            c.put("m/y", x, tier="gpu")
        assert c.gpu is None
        assert "m/y" not in [e["key"] for e in c.ls("m/")]  # the refused put left nothing
        assert "hits_gpu" not in counters(c)
        assert torch.equal(c.get("m/x"), x)  # the daemon goes on


def test_slab_mappings_are_read_only(gpu_daemon, backend: str) -> None:
    if backend != "simulated":
        pytest.skip("CUDA's access flags are asked for by the client (see docs/tiers.md)")
    d = gpu_daemon()
    with Client(d.socket) as c:
        c.put("m/x", torch.ones(1024))
        t = c.get("m/x", tier="gpu")
        assert c.gpu is not None
        slab = next(iter(c.gpu.slabs.values()))  # the client's mapping of the one slab
        with pytest.raises(PermissionError):
            mmap.mmap(slab.fd, slab.size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        with pytest.raises(OSError):
            os.write(slab.fd, b"x")
        assert torch.equal(t, torch.ones(1024))


CHILD = textwrap.dedent(
    """
    import sys, torch
    from tierd_client import Client
    c = Client(sys.argv[1])
    held = c.get_many(["m/a", "m/b"], tier="gpu")
    print("held", flush=True)
    sys.stdin.read()
    """
)


def test_a_killed_reader_loses_its_gpu_leases(gpu_daemon, backend: str) -> None:
    d = gpu_daemon("4MiB")
    with Client(d.socket) as c:
        for k in "abc":
            c.put(f"m/{k}", torch.randn(384 * 1024))
        with subprocess.Popen([sys.executable, "-c", CHILD, str(d.socket)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True) as p:  # fmt: skip
            try:
                assert p.stdout is not None and p.stdout.readline().strip() == "held"
                assert c.stats()["leases"] == 2
                with pytest.raises(TierFull):
                    c.get("m/c", tier="gpu")
                os.kill(p.pid, signal.SIGKILL)
                p.wait(10)
            finally:
                if p.poll() is None:
                    p.kill()
        wait_until(lambda: c.stats()["leases"] == 0, what="the killed client's leases to end")
        assert c.get("m/c", tier="gpu") is not None


def test_ram_copy_demoted_then_read_back_from_the_gpu(gpu_daemon, backend: str) -> None:
    """An entry pinned in the GPU whose RAM copy went to disk: a plain get copies it GPU -> RAM."""
    d = gpu_daemon("8MiB", ram_bytes="8MiB", disk_bytes="64MiB")
    with Client(d.socket) as c:
        x = torch.randn(512 * 1024)  # 2 MiB
        c.put("m/hot", x)
        c.pin("m/hot", "gpu")
        for i in range(6):  # push m/hot's RAM copy out
            c.put(f"m/fill{i}", torch.randn(512 * 1024))
        deadline = time.monotonic() + 10
        while "ram" in c.stat("m/hot")["tiers"] and time.monotonic() < deadline:
            c.put("m/more", torch.randn(512 * 1024))
        assert c.stat("m/hot")["tiers"] == ["gpu", "disk"]
        t = c.get("m/hot")  # served from RAM, brought there from the GPU (the fastest copy)
        assert torch.equal(t, x)
        assert c.stat("m/hot")["tiers"] == ["gpu", "ram", "disk"]


def test_status_and_tierctl_show_the_gpu(gpu_daemon, backend: str) -> None:
    d = gpu_daemon("25%")  # a share of the device's memory
    with Client(d.socket) as c:
        c.put("m/s", torch.ones(8))
        c.get("m/s", tier="gpu")
        gpu = next(t for t in c.stats()["tiers"] if t["name"] == "gpu")
        total = gpu["device"]["total_bytes"]
        assert gpu["capacity_bytes"] == (total // 4) - (total // 4) % GRANULARITY
    r = subprocess.run([sys.executable, "-m", "tierd_client.tierctl", "--socket", str(d.socket), "status",
                        "--json"], capture_output=True, text=True, timeout=30)  # fmt: skip
    assert r.returncode == 0, r.stderr
    st = json.loads(r.stdout)
    assert st["counters"]["gpu_promotions"] == 1 and "hits_gpu" in st["counters"]
    with Client(d.socket) as c:  # the copy speeds are measured once, in the background, at start
        wait_until(lambda: next(t for t in c.stats()["tiers"] if t["name"] == "gpu").get("copy_gbps"),
                   timeout=10, what="the GPU tier's copy speeds")  # fmt: skip
    tierctl = [sys.executable, "-m", "tierd_client.tierctl", "--socket", str(d.socket), "status"]
    r = subprocess.run(tierctl, capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    assert "gpu: simulated device" in r.stdout and "backend simulated" in r.stdout
    assert "copies H2D" in r.stdout
    r = subprocess.run([sys.executable, "-m", "tierd_client.tierctl", "--socket", str(d.socket), "show",
                        "m/s"], capture_output=True, text=True, timeout=30)  # fmt: skip
    assert r.returncode == 0 and "gpu" in r.stdout


# ---- the device and the tier in-process (simulated) -------------------------------------------
def test_simulated_device_enforces_capacity_and_completes_late() -> None:
    dev = SimulatedDevice(total_bytes=8 * MiB, delay_s=0.2)
    try:
        a = dev.create_slab(4 * MiB)
        dev.create_slab(4 * MiB)
        with pytest.raises(DeviceOOM):
            dev.create_slab(2 * MiB)
        with pytest.raises(ValueError):
            dev.create_slab(3 * MiB)  # not a multiple of the granularity
        src = memoryview(bytearray(b"\x05" * 4096))
        copy = dev.upload(a, 0, src)
        assert not copy.done.done()  # late on purpose
        copy.done.result(timeout=5)
        out = bytearray(4096)
        dev.download(a, 0, memoryview(out)).done.result(timeout=5)
        assert out == bytes(src)
        dev.free_slab(a)
        dev.create_slab(2 * MiB)  # its memory is back
    finally:
        dev.close()


def test_gpu_tier_slabs_come_and_go() -> None:
    tier = GpuTier(SimulatedDevice(total_bytes=64 * MiB, delay_s=0), 16 * MiB)
    try:
        assert tier.slab_bytes == 2 * MiB
        a = tier.allocate(MiB, owner=1)
        b = tier.allocate(MiB, owner=2)  # another uid: another slab
        assert a is not None and b is not None and tier.split(a)[0] != tier.split(b)[0]
        big = tier.allocate(5 * MiB, owner=1)  # larger than a slab: a slab of its own
        assert big is not None and tier.stats()["slabs"] == 3
        assert tier.allocate(12 * MiB, owner=1) is None  # beyond the capacity
        tier.check()
        first = tier.split(a)[0]
        tier.free(a)  # its slab was empty: given back
        assert tier.stats()["slabs"] == 2
        c = tier.allocate(MiB, owner=1)
        assert c is not None and tier.split(c)[0] > first  # generations are never reused
        for loc in (b, big, c):
            tier.free(loc)
        tier.check()
        assert tier.used_bytes == 0 and tier.stats()["slabs"] == 0
    finally:
        tier.close()


def test_only_the_gpu_modules_import_cuda() -> None:
    """DESIGN invariant 8: the daemon's and the client's other modules never import cuda."""
    allowed = {ROOT / "tierd/gpu/cuda.py", ROOT / "client/gpu_cuda.py"}
    # NVML (not CUDA) also names the machine's GPUs in the hardware report, lazily and optionally
    nvml_allowed = allowed | {ROOT / "tierd/hardware.py"}
    offenders = []
    for folder in ("tierd", "client", "model_integration"):
        for path in (ROOT / folder).rglob("*.py"):
            text = path.read_text()
            cuda = "import cuda" in text or "from cuda" in text
            if (cuda and path not in allowed) or ("pynvml" in text and path not in nvml_allowed):
                offenders.append(str(path.relative_to(ROOT)))
    assert offenders == []
    # and a daemon with a simulated GPU tier never loads it
    code = (
        "import sys; from tierd.tiers import registry; from tierd.config import load; "
        "cfg = load(['--gpu-backend', 'simulated', '--gpu-bytes', '8MiB'], {}); "
        "t = registry.gpu_tier(cfg); t.close(); "
        "print([m for m in sys.modules if m == 'cuda' or m.startswith('cuda.')])"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


@pytest.mark.skipif(importlib.util.find_spec("cuda") is None, reason="cuda-bindings is not installed")
def test_the_cuda_modules_name_only_what_the_bindings_have() -> None:
    """No GPU needed: every driver call and enum the CUDA backends use exists in the installed
    cuda-bindings (a typo would otherwise wait for the first GPU machine)."""
    import re

    from cuda.bindings import driver

    missing = []
    for rel in ("tierd/gpu/cuda.py", "client/gpu_cuda.py"):
        src = (ROOT / rel).read_text()
        for fn in set(re.findall(r'(?:\bcu|self\._cu|self\._call)\("(\w+)"', src)):
            if not hasattr(driver, fn):
                missing.append(f"{rel}: {fn}")
        for dotted in set(re.findall(r"\b(?:drv|driver|self\.drv)\.([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)?)", src)):
            obj: object = driver
            for part in dotted.split("."):
                if not hasattr(obj, part):
                    missing.append(f"{rel}: {dotted}")
                    break
                obj = getattr(obj, part)
        for name in set(re.findall(r"\battr\.(\w+)", src)):  # attr = driver.CUdevice_attribute
            if not hasattr(driver.CUdevice_attribute, name):
                missing.append(f"{rel}: CUdevice_attribute.{name}")
    assert missing == []


NOBODY_GPU = textwrap.dedent(
    """
    import ctypes, errno, json, mmap, os, sys
    import torch
    from tierd_client import Client, Forbidden
    libc = ctypes.CDLL(None, use_errno=True)
    os.setgroups([]); os.setgid(65534); os.setuid(65534)
    out = {}

    def attempt(name, fn):
        try:
            fn()
            out[name] = "done"
        except Forbidden:
            out[name] = "forbidden"
        except OSError as e:
            out[name] = errno.errorcode.get(e.errno, str(e.errno))

    with Client(sys.argv[1]) as c:
        t = c.get("root/w", tier="gpu")
        out["read"] = t.float().sum().item()
        slabs = c.gpu.slabs
        theirs = next(iter(slabs.values()))
        fd, size = theirs.fd, theirs.size
        rw = mmap.PROT_READ | mmap.PROT_WRITE
        attempt("mmap_rw", lambda: mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=rw))
        attempt("reopen_rw", lambda: os.open(f"/proc/self/fd/{fd}", os.O_RDWR))
        attempt("write", lambda: os.pwrite(fd, b"x", 0))
        ptr = ctypes.c_void_p(theirs.ro.ctypes.data)
        def mprotect():
            if libc.mprotect(ptr, mmap.PAGESIZE, mmap.PROT_READ | mmap.PROT_WRITE) != 0:
                raise OSError(ctypes.get_errno(), "mprotect")
        attempt("mprotect", mprotect)
        attempt("pin", lambda: c.pin("root/w", "gpu"))
        c.put("nobody/x", torch.full((1024,), 3.0), tier="gpu")
        mine = c.get("nobody/x", tier="gpu")
        out["own_ok"] = bool((mine == 3).all())
        out["slabs"] = len(c.gpu.slabs)
    print(json.dumps(out), flush=True)
    """
)


@pytest.mark.skipif(os.geteuid() != 0, reason="a process of another uid needs root")
def test_another_uid_maps_gpu_slabs_read_only_and_gets_its_own(short_tmp: Path) -> None:
    short_tmp.chmod(0o755)  # nobody must reach the socket
    d = launch.start(
        short_tmp / "tierd.sock", "--state-dir", str(short_tmp / "state"), "--socket-group", "nogroup",
        "--disk-bytes", "0", "--gpu-backend", "simulated", "--gpu-bytes", "16MiB",
        ram_bytes="64MiB", log_path=short_tmp / "tierd.log",
    )  # fmt: skip
    try:
        with Client(d.socket) as root:
            w = torch.arange(4096, dtype=torch.float32)
            root.put("root/w", w)
            r = subprocess.run([sys.executable, "-c", NOBODY_GPU, str(d.socket)], capture_output=True,
                               text=True, timeout=120)  # fmt: skip
            assert r.returncode == 0, r.stderr[-3000:]
            out = json.loads(r.stdout.strip().splitlines()[-1])
            assert out["read"] == float(w.sum())
            # the kernel refuses every way of writing root's slab through the fd nobody was sent
            assert out["mmap_rw"] == "EACCES" and out["reopen_rw"] == "EACCES"
            assert out["write"] == "EBADF" and out["mprotect"] == "EACCES"
            assert out["pin"] == "forbidden"
            # nobody's own entry went to a slab of its own
            assert out["own_ok"] and out["slabs"] == 2
            got = root.get("root/w", tier="gpu")
            assert torch.equal(got, w)
            assert sorted(root.stat("nobody/x")["tiers"]) == ["gpu", "ram"]
    finally:
        assert d.stop() == 0


def test_which_puts_ask_for_the_gpu() -> None:
    """A CUDA tensor asks for the GPU tier where the daemon has one, and is copied to RAM like any
    tensor where it has none; tier= overrides; anything else is refused before a byte moves."""
    from tierd.errors import InvalidRequest
    from tierd_client._core import put_tier

    class CudaLike:  # what put_tier looks at: a tensor's device type (no CUDA tensor here)
        class device:
            type = "cuda"

    cpu = torch.ones(2)
    assert put_tier(CudaLike(), None, daemon_has_gpu=True) == "gpu"
    assert put_tier(CudaLike(), None, daemon_has_gpu=False) == ""
    assert put_tier(cpu, None, daemon_has_gpu=True) == ""
    assert put_tier(cpu, "gpu", daemon_has_gpu=True) == "gpu"
    assert put_tier(CudaLike(), "ram", daemon_has_gpu=True) == ""
    with pytest.raises(InvalidRequest):
        put_tier(cpu, "disk", daemon_has_gpu=True)


# ---- scripted: the use cases over gpu, ram, disk, with Manager.check() after every step --------------
@pytest.mark.asyncio
async def test_scripted_gpu_promotion_leases_demotion_and_delete(tmp_path: Path) -> None:
    """put 4 entries of 1.5 MiB with a 4 MiB GPU tier (two slabs): gets on the GPU take slabs, a
    GPU lease holds its copy, room is made from unleased copies, a deleted entry leaves the GPU when
    its last lease goes, and every step keeps the manager's and the tiers' books straight."""
    from tierd.config import Config
    from tierd.entry import PutArgs
    from tierd.manager import Manager
    from tierd.placement import Placement
    from tierd.prefetch import Prefetcher
    from tierd.service import Service, settle
    from tierd.tiers import registry

    cfg = Config(ram_bytes="16MiB", disk_bytes="64MiB", state_dir=str(tmp_path / "state"), gpu_bytes="4MiB",
                 gpu_backend="simulated", gpu_sim_delay_ms=5)  # fmt: skip
    tiers = registry.build(cfg)
    gpu, ram, disk = tiers
    assert [t.name for t in tiers] == ["gpu", "ram", "disk"]
    m = Manager(ram, disk, upper=(gpu,))  # type: ignore[arg-type]
    pl = Placement(m)
    pf = Prefetcher(pl, predictor="none")
    s = Service(m, pl, pf)
    n = 3 * MiB // 2
    try:
        cid = s.join(pid=1, uid=0, name="scripted")
        for i, k in enumerate("abcd"):
            put_id, offset = await settle(s.put(cid, PutArgs(f"t/{k}", "uint8", [n], n)))
            ram.view(offset, n)[:] = bytes([i + 1]) * n
            await settle(s.seal(cid, put_id))
            m.check()
        [a] = await settle(s.get(cid, [("t/a", 0)], "gpu"))
        m.check()
        assert a.event  # the copy was still in flight when the lease was answered
        [b] = await settle(s.get(cid, [("t/b", 0)], "gpu"))
        s.release(cid, [b.lease])
        m.check()
        [c] = await settle(s.get(cid, [("t/c", 0)], "gpu"))  # waits for b's copy to land, then takes its room
        m.check()
        assert m.resolve("t/b").tiers == ["ram"] and m.resolve("t/a").tiers == ["gpu", "ram"]
        assert m.resolve("t/a").held == {"gpu": 1}
        with pytest.raises(TierFull):
            await settle(s.get(cid, [("t/d", 0)], "gpu"))
        m.check()
        # RAM copies of GPU-leased entries may go to disk: the GPU lease holds the GPU copy only
        assert await pl.demote(m.resolve("t/a"), "ram")
        assert m.resolve("t/a").tiers == ["gpu", "disk"]
        m.check()
        s.delete(cid, "t/a")  # hidden; its bytes stay while leased
        m.check()
        assert gpu.used_bytes == 2 * gpu.region_bytes(n)
        s.release(cid, [a.lease, c.lease])
        await asyncio.gather(*pl.moves.device_copies)
        m.check()
        assert gpu.used_bytes == gpu.region_bytes(n)  # a's copy went with its last lease; c's stays
        assert m.metrics.gpu_promotions == 3 and m.metrics.hits_gpu == 0
        [c2] = await settle(s.get(cid, [("t/c", 0)], "gpu"))
        assert m.metrics.hits_gpu == 1 and not c2.event  # there, copy landed: nothing to wait for
        with pytest.raises(Unsupported) as err:  # a tier no daemon has, from a raw frame
            s.get(cid, [("t/c", 0)], "tape" * 100_000)
        assert len(str(err.value)) < 200 and len(err.value.details["tier"]) == 64  # echoed cut short
        s.leave(cid)
        m.check()
        assert sum(e.leases for e in m.versions.values()) == 0
    finally:
        pf.close()
        await pl.close()
        for t in tiers:
            t.close()


@pytest.mark.asyncio
async def test_async_client_waits_for_late_copies_without_blocking_its_loop(short_tmp: Path) -> None:
    from tierd_client import AsyncClient, InvalidRequest

    d = launch.start(
        short_tmp / "tierd.sock", "--state-dir", str(short_tmp / "state"), "--disk-bytes", "0",
        "--gpu-backend", "simulated", "--gpu-bytes", "16MiB", "--gpu-sim-delay-ms", "300",
        ram_bytes="64MiB", log_path=short_tmp / "tierd.log",
    )  # fmt: skip
    try:
        async with await AsyncClient.connect(d.socket) as c:
            x = torch.full((4096,), 5.0)
            await c.put("m/a", x)
            ticks = 0

            async def tick() -> None:
                nonlocal ticks
                while True:
                    await asyncio.sleep(0.01)
                    ticks += 1

            ticker = asyncio.ensure_future(tick())
            t = await c.get("m/a", tier="gpu")  # the copy lands 300 ms after the reply
            ticker.cancel()
            assert torch.equal(t, x)
            assert ticks >= 10, "the loop must keep running while the client waits for the copy"
            with pytest.raises(InvalidRequest, match="'ram' or 'gpu'"):
                await c.get("m/a", tier="tape")  # refused by the client before anything is sent
    finally:
        assert d.stop() == 0
