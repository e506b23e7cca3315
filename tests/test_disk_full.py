"""A full disk is an answer, not a crash: a durable put that does not fit gets TierFull naming the disk
tier and gives its RAM back, earlier entries stay readable, and background demotion that meets a full
disk waits and resumes by itself once space comes back. A real daemon whose state directory is a
small tmpfs filled up by another file (mounting needs root)."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from tests.conftest import wait_until
from tierd import launch
from tierd_client import Client, TierFull

MiB = 1 << 20
pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small filesystem needs root")


@pytest.fixture
def small_fs(short_tmp: Path) -> Iterator[Path]:
    fs = short_tmp / "fs"
    fs.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(fs)], check=True)
    try:
        yield fs
    finally:
        subprocess.run(["umount", "-l", str(fs)], check=True)


def fill(fs: Path, leave: int, name: str = "filler") -> Path:
    """Write a filler file until about ``leave`` bytes of the filesystem are free."""
    st = os.statvfs(fs)
    filler = fs / name
    filler.write_bytes(b"\0" * max(0, st.f_bavail * st.f_frsize - leave))
    return filler


def ram(c: Client) -> dict:
    return next(t for t in c.stats()["tiers"] if t["name"] == "ram")


def test_a_full_disk_gives_typed_errors_and_demotion_resumes_when_space_returns(
    short_tmp: Path, small_fs: Path
) -> None:
    d = launch.start(short_tmp / "d.sock", "--state-dir", str(small_fs / "state"), "--disk-bytes", "48MiB",
                     "--ram-high-watermark", "0.5", "--ram-low-watermark", "0.25",
                     ram_bytes="32MiB", log_path=short_tmp / "d.log")  # fmt: skip
    try:
        with Client(d.socket) as c:
            kept = torch.arange(MiB // 4, dtype=torch.float32)
            c.put("t/kept", kept, durable=True)
            filler = fill(small_fs, 6 * MiB)

            used_before = ram(c)["used_bytes"]
            with pytest.raises(TierFull) as err:
                for i in range(4):
                    c.put(f"t/big{i}", torch.full((2 * MiB,), float(i)), durable=True)  # 8 MiB each
            assert err.value.details["tier"] == "disk"
            assert ram(c)["used_bytes"] <= used_before + 8 * MiB * i  # the refused put's region is back
            assert torch.equal(c.get("t/kept"), kept)
            assert all(r["ok"] for r in c.verify("t/"))

            # RAM past its high watermark with entries that only the full disk could take
            more = fill(small_fs, 256 << 10, "filler2")
            for i in range(6):
                c.put(f"t/warm{i}", torch.full((MiB,), float(i)))  # 4 MiB each, not durable
            # the balancer tries, meets the full disk (beyond the few MiB the refused put freed
            # inside the LMDB file) and stays alive, with RAM still over its high watermark
            wait_until(lambda: "cannot demote from ram" in d.log(), timeout=30, what="a refused demotion")
            assert ram(c)["used_bytes"] > 0.5 * ram(c)["capacity_bytes"]
            assert d.proc.poll() is None

            filler.unlink()  # space comes back: demotion resumes with no further request
            more.unlink()
            cap = ram(c)["capacity_bytes"]
            wait_until(lambda: ram(c)["used_bytes"] <= 0.5 * cap, timeout=60, what="demotion to resume")
            for i in range(6):
                assert torch.equal(c.get(f"t/warm{i}"), torch.full((MiB,), float(i)))
    finally:
        assert d.stop() == 0, d.log()
