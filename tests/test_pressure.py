"""Memory pressure end to end: in a memory cgroup, a process that needs memory gets it from tierd
(demotion to disk, free arena pages returned to the kernel) instead of meeting the OOM killer.

Needs a writable cgroup v1 memory hierarchy (root on this kind of machine); skipped elsewhere.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import wait_until
from tierd import launch
from tierd_client import Client

CG_ROOT = Path("/sys/fs/cgroup/memory")
MiB = 1 << 20


@pytest.fixture
def cgroup() -> Path:
    if not (CG_ROOT / "cgroup.procs").exists() or not os.access(CG_ROOT, os.W_OK):
        pytest.skip("no writable cgroup v1 memory hierarchy here (needs root)")
    cg = CG_ROOT / f"tierd-test-{os.getpid()}"
    cg.mkdir()
    (cg / "memory.limit_in_bytes").write_text(str(768 * MiB))
    yield cg
    for pid in (cg / "cgroup.procs").read_text().split():
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(pid), 9)
    deadline = time.monotonic() + 10
    while (cg / "cgroup.procs").read_text().strip() and time.monotonic() < deadline:
        pass
    cg.rmdir()


HOG = textwrap.dedent("""
    import sys
    step = int(sys.argv[1])
    held = []
    for line in sys.stdin:          # one step per line from the test
        b = bytearray(step)
        b[::4096] = b"x" * len(range(0, step, 4096))   # touch every page: really resident
        held.append(b)
        print(len(held), flush=True)
""")


def usage(cg: Path) -> int:
    return int((cg / "memory.usage_in_bytes").read_text())


def test_pressure_demotes_and_returns_pages_instead_of_oom(cgroup: Path, short_tmp: Path) -> None:
    enter = ["sh", "-c", f'echo $$ > {cgroup}/cgroup.procs && exec "$@"', "sh"]
    d = launch.start(short_tmp / "s.sock", "--state-dir", str(short_tmp / "state"), "--disk-bytes", "2GiB",
                     ram_bytes="384MiB", log_path=short_tmp / "tierd.log", prefix=enter)  # fmt: skip
    hog: subprocess.Popen[str] | None = None
    try:
        xs = [torch.full((16 * MiB // 4,), float(i)) for i in range(16)]  # 256 MiB of entries
        with Client(d.socket) as c:
            wait_until(
                lambda: c.stats()["placement"]["calibration"], timeout=30, what="the start-up calibration"
            )
            for i, x in enumerate(xs):
                c.put(f"pr/{i}", x)
            wait_until(lambda: c.stats()["pressure"] is not None, timeout=30, what="the first pressure poll")
            hog = subprocess.Popen([*enter, sys.executable, "-c", HOG, str(32 * MiB)], stdin=subprocess.PIPE,
                                   stdout=subprocess.PIPE, text=True)  # fmt: skip
            assert hog.stdin is not None and hog.stdout is not None
            # 14 x 32 MiB = 448 MiB: more than the cgroup can hold beside a full, pre-faulted arena
            # even once the kernel has dropped every page of file cache it could
            for step in range(14):
                deadline = time.monotonic() + 20
                # wait (polling the daemon, no sleep) until the cgroup has room for the next step
                while usage(cgroup) + 48 * MiB > 768 * MiB and time.monotonic() < deadline:
                    c.stats()
                hog.stdin.write("more\n")
                hog.stdin.flush()
                assert hog.stdout.readline().strip() == str(step + 1), (
                    f"the hog died at step {step}: {d.log()}"
                )
            hog.stdin.close()
            assert hog.wait(30) == 0
            hog.stdout.close()
            st = c.stats()
            assert d.proc.poll() is None, "tierd was killed"
            assert st["counters"]["pressure_released_bytes"] > 0
            # the tier was held below its capacity while the hog had its memory; now that the hog is
            # gone the ceiling grows back, a step per calm poll
            held = st["placement"]["ram_ceiling_bytes"]
            assert held < st["tiers"][0]["capacity_bytes"]
            wait_until(lambda: c.stats()["placement"]["ram_ceiling_bytes"] > held, timeout=30,
                       what="the RAM tier's ceiling to grow back")  # fmt: skip
            assert st["pressure"]["level"] in ("none", "low", "high", "critical")
            for i, x in enumerate(xs):  # every entry is still there, from RAM or back from disk
                t = c.get(f"pr/{i}")
                assert torch.equal(t, x)
                c.release(t)
    finally:
        if hog is not None:  # a failed run leaves no process or pipe behind for the next test
            hog.kill()
            hog.wait()
            for pipe in (hog.stdin, hog.stdout):
                if pipe is not None and not pipe.closed:
                    with contextlib.suppress(OSError):  # a pipe to a killed hog
                        pipe.close()
        d.stop()
