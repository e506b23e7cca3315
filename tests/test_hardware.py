"""The hardware report reads this machine, and what it cannot read is unknown, never an error."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tierd import hardware


def test_report_names_this_machine(tmp_path: Path) -> None:
    r = hardware.report(tmp_path / "state")  # not created yet: its nearest existing parent is read
    assert r["cpu_cores"] == os.cpu_count()
    assert r["ram_bytes"] == os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    cpuinfo = Path("/proc/cpuinfo").read_text()
    if "model name" in cpuinfo:
        assert r["cpu_model"] and r["cpu_model"] in " ".join(cpuinfo.split())
    dev = r["state_device"]
    assert dev["path"] == str(tmp_path / "state")
    st_dev = os.stat(tmp_path).st_dev
    sysfs = Path(f"/sys/dev/block/{os.major(st_dev)}:{os.minor(st_dev)}")
    if sysfs.exists():
        assert dev["device"] and dev["rotational"] in (True, False)
        assert dev["nvme"] == dev["device"].startswith("nvme")
    else:
        assert dev["device"] is None and dev["nvme"] is None
    assert isinstance(r["gpus"], list)
    assert r["gpu_note"].startswith("none") == (r["gpus"] == [])


def test_a_file_system_without_a_block_device(tmp_path: Path) -> None:
    shm = Path("/dev/shm")
    if not shm.is_dir():
        pytest.skip("no /dev/shm here")
    dev = hardware.block_device(shm)
    assert dev["device"] is None and dev["nvme"] is None and dev["fstype"] == "tmpfs"


def test_cpu_model_from_cpuinfo(tmp_path: Path) -> None:
    f = tmp_path / "cpuinfo"
    f.write_text("processor\t: 0\nvendor_id\t: X\nmodel name\t:  Some   CPU @ 2.0GHz\n\nprocessor\t: 1\n")
    assert hardware.cpu_model(str(f)) == "Some CPU @ 2.0GHz"
    f.write_text("processor\t: 0\n")
    assert hardware.cpu_model(str(f)) is None
    assert hardware.cpu_model(str(tmp_path / "missing")) is None


def test_no_nvml_package_is_no_gpu() -> None:
    """Without nvidia-ml-py installed (its import blocked), the report says so and goes on."""
    code = (
        "import sys; sys.modules['pynvml'] = None\n"
        "from pathlib import Path\n"
        "from tierd import hardware\n"
        "r = hardware.report(Path('.'))\n"
        "print(r['gpus'], r['gpu_note'])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[] none (nvidia-ml-py is not installed)"


def test_the_daemon_does_not_import_nvml_until_it_reads_the_machine() -> None:
    code = "import sys, tierd.server, tierd.hardware; print('pynvml' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "False", out.stderr


@pytest.mark.gpu
def test_nvml_names_the_gpus() -> None:
    gpus, note = hardware.gpus()
    if not gpus:
        pytest.skip(f"no NVIDIA GPU here: {note}")
    assert all(g["name"] and g["memory_bytes"] > 0 and g["driver"] for g in gpus)
