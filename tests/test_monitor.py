"""Memory pressure monitor: scripted scenarios on fake files, one poll of the real machine, and
page release on a real memfd."""

from __future__ import annotations

import errno
import json
import mmap
import os
from collections.abc import Iterator
from dataclasses import dataclass

import psutil
import pytest

from tierd.monitor import LEVELS, Monitor, MonitorConfig, parse_psi
from tierd.pages import release_pages

MiB = 1 << 20
GiB = 1 << 30
PAGE = mmap.PAGESIZE
TOTAL = 10_000 * MiB  # thresholds: critical 500, high 1000, low 1500 MiB; recovery x1.25; target 1300

PSI_PATH = "/proc/pressure/memory"
SELF_CGROUP = "/proc/self/cgroup"


def psi(some: float, full: float = 0.0) -> str:
    return (
        f"some avg10={some:.2f} avg60=0.00 avg300=0.00 total=1\n"
        f"full avg10={full:.2f} avg60=0.00 avg300=0.00 total=1\n"
    )


@dataclass
class Vm:
    available: int
    total: int = TOTAL


class Machine:
    """A scripted machine: files by path (a value may be an exception to raise) and virtual_memory."""

    def __init__(self, available: int = 8000 * MiB, total: int = TOTAL) -> None:
        self.files: dict[str, str | OSError] = {}
        self.vm = Vm(available, total)
        self.reads: list[str] = []

    def read_file(self, path: str) -> str:
        self.reads.append(path)
        v = self.files.get(path)
        if v is None:
            raise FileNotFoundError(errno.ENOENT, "No such file or directory", path)
        if isinstance(v, OSError):
            raise v
        return v

    def monitor(self, config: MonitorConfig | None = None) -> Monitor:
        return Monitor(config, read_file=self.read_file, vm=lambda: self.vm)

    def set_available(self, mib: float) -> None:
        self.vm.available = int(mib * MiB)


# -- bytes only --------------------------------------------------------------------------------


def test_no_pressure_is_none_and_zero() -> None:
    m = Machine(available=8000 * MiB)
    mon = m.monitor()
    p = mon.poll(tier_used_bytes=2 * GiB)
    assert p.level == "none" and p.shrink_bytes == 0
    assert p.available_bytes == 8000 * MiB and p.total_bytes == TOTAL
    assert (p.critical_bytes, p.high_bytes, p.low_bytes) == (500 * MiB, 1000 * MiB, 1500 * MiB)
    assert p.target_bytes == 1300 * MiB  # high recovery point (1250) + 5% overshoot
    assert p.psi_some_avg10 is None and p.psi_full_avg10 is None
    assert p.cgroup_limit_bytes is None and p.cgroup_usage_bytes is None
    assert p.reasons == ()


def test_low_available_is_high_and_shrinks_to_the_recovery_point() -> None:
    m = Machine(available=900 * MiB)
    p = m.monitor().poll(tier_used_bytes=2 * GiB)
    assert p.level == "high"
    # enough to bring available past the high recovery point (1250 MiB), to 1.30 x 1000 MiB
    assert p.shrink_bytes == 400 * MiB
    assert any("available" in r for r in p.reasons)


def test_shrink_is_capped_at_what_the_tier_holds() -> None:
    m = Machine(available=900 * MiB)
    mon = m.monitor()
    assert mon.poll(tier_used_bytes=100 * MiB).shrink_bytes == 100 * MiB
    assert mon.poll(tier_used_bytes=0).shrink_bytes == 0
    with pytest.raises(ValueError):
        mon.poll(tier_used_bytes=-1)


def test_critical_and_low_levels() -> None:
    m = Machine(available=400 * MiB)
    p = m.monitor().poll(tier_used_bytes=4 * GiB)
    assert p.level == "critical" and p.shrink_bytes == 900 * MiB

    m = Machine(available=1400 * MiB)
    p = m.monitor().poll(tier_used_bytes=4 * GiB)
    assert p.level == "low" and p.shrink_bytes == 0  # low: stop growing, give nothing back yet


def test_floors_apply_on_small_machines_but_are_capped_on_tiny_ones() -> None:
    # 4 GiB: 10% = 410 MiB < the 512 MiB floor, which applies
    p = Machine(available=3 * GiB, total=4 * GiB).monitor().poll(0)
    assert (p.critical_bytes, p.high_bytes, p.low_bytes) == (256 * MiB, 512 * MiB, 1 * GiB)
    # 1 GiB: the floors are capped at 2x the fractional threshold (512 MiB would be half the budget)
    p = Machine(available=900 * MiB, total=1 * GiB).monitor().poll(0)
    assert p.high_bytes == round(0.2 * GiB) and p.critical_bytes == round(0.1 * GiB)
    assert p.level == "none"


def test_hysteresis_levels_step_down_only_past_recovery_points() -> None:
    m = Machine()
    mon = m.monitor()
    tier = 8 * GiB

    def step(mib: float) -> tuple[str, int]:
        m.set_available(mib)
        p = mon.poll(tier)
        return p.level, p.shrink_bytes // MiB

    assert step(900) == ("high", 400)
    assert step(1100) == ("high", 200)  # above high (1000) but below its recovery point (1250)
    assert step(1240) == ("high", 60)
    assert step(1260) == ("low", 0)  # past 1250: high ends; still below low's 1500
    assert step(900) == ("high", 400)  # climbing is immediate
    assert step(1300) == ("low", 0)
    assert step(1700) == ("low", 0)  # above low (1500) but below its recovery point (1875)
    assert step(1900) == ("none", 0)
    assert step(1700) == ("none", 0)  # entering needs the entry threshold, not the recovery one

    assert step(400) == ("critical", 900)
    assert step(550) == ("critical", 750)  # above 500, below 625
    assert step(700) == ("high", 600)  # left critical, and still inside high's entry threshold
    assert step(1100) == ("high", 200)
    assert step(1300) == ("low", 0)  # freeing shrink_bytes lands past the recovery point


def test_does_not_flap_around_a_threshold() -> None:
    m = Machine()
    mon = m.monitor()
    levels = []
    for mib in [990, 1010, 995, 1005, 990, 1010]:  # jitter around the high threshold (1000 MiB)
        m.set_available(mib)
        levels.append(mon.poll(GiB).level)
    assert levels == ["high"] * 6


# -- PSI ---------------------------------------------------------------------------------------


def test_psi_some_spike_raises_high_with_steps_only_while_rising() -> None:
    m = Machine(available=8000 * MiB)
    m.files[PSI_PATH] = psi(0.0)
    mon = m.monitor()
    tier = 1000 * MiB
    step = -(-tier * 2 // 100)  # 2% of the tier, rounded up

    def poll(some: float, full: float = 0.0) -> tuple[str, int]:
        m.files[PSI_PATH] = psi(some, full)
        p = mon.poll(tier)
        return p.level, p.shrink_bytes

    assert poll(0.0) == ("none", 0)
    assert poll(3.0) == ("none", 0)
    assert poll(6.0) == ("low", 0)
    assert poll(12.0) == ("high", step)  # bytes look fine: the stall alone asks for a step
    assert poll(12.0) == ("high", 0)  # unchanged (the kernel refreshes avg10 every 2 s): no new step
    assert poll(15.0) == ("high", step)  # still rising
    assert poll(11.0) == ("high", 0)  # falling: earlier give-backs are working
    assert poll(6.0) == ("high", 0)  # below the trigger but above its recovery point (5)
    assert poll(4.0) == ("low", 0)  # high recovered; low holds until some <= 2.5
    assert poll(2.0) == ("none", 0)


def test_psi_full_spike_is_critical_until_it_recovers() -> None:
    m = Machine(available=8000 * MiB)
    m.files[PSI_PATH] = psi(0.0)
    mon = m.monitor()
    m.files[PSI_PATH] = psi(20.0, 6.0)
    p = mon.poll(GiB)
    assert p.level == "critical" and p.psi_full_avg10 == 6.0 and p.shrink_bytes > 0
    assert any("full" in r for r in p.reasons)
    m.files[PSI_PATH] = psi(4.0, 3.0)
    assert mon.poll(GiB).level == "critical"  # full 3 > 2.5 (half the trigger)
    m.files[PSI_PATH] = psi(4.0, 2.0)
    assert mon.poll(GiB).level == "low"  # some 4 holds low only (high recovered at <= 5)


def test_psi_and_bytes_combine_to_the_worse_level() -> None:
    m = Machine(available=900 * MiB)  # high by bytes
    m.files[PSI_PATH] = psi(1.0, 8.0)  # critical by PSI
    p = m.monitor().poll(4 * GiB)
    assert p.level == "critical"
    assert p.shrink_bytes == 400 * MiB  # the byte deficit is larger than a 2% step (82 MiB)


@pytest.mark.parametrize(
    "psi_file",
    [
        None,  # no /proc/pressure (kernel < 4.20, or hidden)
        PermissionError(errno.EACCES, "Permission denied"),
        OSError(errno.EOPNOTSUPP, "Operation not supported"),  # booted with psi=0
        "garbage\n",
    ],
)
def test_missing_or_unreadable_psi_falls_back_to_bytes(psi_file: str | OSError | None) -> None:
    m = Machine(available=900 * MiB)
    if psi_file is not None:
        m.files[PSI_PATH] = psi_file
    mon = m.monitor()
    p = mon.poll(GiB)
    assert p.level == "high" and p.shrink_bytes == 400 * MiB
    assert p.psi_some_avg10 is None and p.psi_full_avg10 is None
    assert mon.readings()["sources"]["psi"] is None
    before = len(m.reads)
    mon.poll(GiB)
    assert PSI_PATH not in m.reads[before:]  # found absent once: not retried every poll


def test_psi_file_vanishing_mid_run_reads_as_none() -> None:
    m = Machine()
    m.files[PSI_PATH] = psi(12.0)
    mon = m.monitor()
    assert mon.poll(GiB).psi_some_avg10 == 12.0
    m.files[PSI_PATH] = PermissionError(errno.EACCES, "Permission denied")
    p = mon.poll(GiB)
    assert p.psi_some_avg10 is None
    assert p.level == "none"  # bytes are fine and PSI no longer says otherwise: no crash, no stale level
    m.files[PSI_PATH] = psi(12.5)
    assert mon.poll(GiB).level == "high"  # back again once readable


def test_parse_psi() -> None:
    assert parse_psi(psi(1.5, 0.25)) == (1.5, 0.25)
    assert parse_psi("some avg10=3.00 avg60=1.00 avg300=0.00 total=5\n") == (3.0, None)
    assert parse_psi("") == (None, None)


# -- cgroups -----------------------------------------------------------------------------------

V1_SELF = "12:pids:/\n4:memory:/jobs/tierd\n1:name=systemd:/\n0::/\n"


def v1_group(m: Machine, path: str, limit: int | str, usage: int = 0, inactive_file: int = 0) -> None:
    d = "/sys/fs/cgroup/memory" + path
    m.files[d.rstrip("/") + "/memory.limit_in_bytes"] = f"{limit}\n"
    m.files[d.rstrip("/") + "/memory.usage_in_bytes"] = f"{usage}\n"
    m.files[d.rstrip("/") + "/memory.stat"] = (
        f"cache 1\nrss 2\ninactive_file 999\ntotal_cache 3\ntotal_inactive_file {inactive_file}\n"
    )


def test_cgroup_v1_limit_sets_total_and_available() -> None:
    m = Machine(available=20 * GiB, total=24 * GiB)
    m.files[SELF_CGROUP] = V1_SELF
    v1_group(m, "/", 9223372036854771712)
    v1_group(m, "/jobs", 9223372036854771712)
    # 2 GiB limit, 1950 MiB charged of which 100 MiB is inactive page cache: working set 1850 MiB
    v1_group(m, "/jobs/tierd", 2 * GiB, usage=1950 * MiB, inactive_file=100 * MiB)
    mon = m.monitor()
    p = mon.poll(tier_used_bytes=1 * GiB)
    assert p.cgroup_limit_bytes == 2 * GiB
    assert p.cgroup_usage_bytes == 1950 * MiB and p.cgroup_reclaimable_bytes == 100 * MiB
    assert p.total_bytes == 2 * GiB and p.available_bytes == 198 * MiB
    assert p.system_available_bytes == 20 * GiB and p.system_total_bytes == 24 * GiB
    # a cgroup's limit: plain shares of it, no byte floors (on a 2 GiB machine "high" would be
    # its 512 MiB floor capped at 2 x 10%)
    assert p.high_bytes == round(0.1 * 2 * GiB) and p.low_bytes == round(0.15 * 2 * GiB)
    assert p.level == "high"
    assert abs(p.target_bytes - 1.3 * p.high_bytes) <= 1
    assert p.shrink_bytes == p.target_bytes - p.available_bytes
    src = mon.readings()["sources"]
    assert src["cgroup"] == {"version": 1, "dir": "/sys/fs/cgroup/memory/jobs/tierd"}
    assert src["psi"] is None  # v1 has no per-group PSI and /proc/pressure is absent here


def test_cgroup_v1_page_cache_counts_unless_inactive() -> None:
    m = Machine(available=20 * GiB, total=24 * GiB)
    m.files[SELF_CGROUP] = V1_SELF
    v1_group(m, "/jobs/tierd", 2 * GiB, usage=1900 * MiB, inactive_file=100 * MiB)
    p = m.monitor(MonitorConfig(subtract_inactive_file=False)).poll(0)
    assert p.available_bytes == 148 * MiB and p.cgroup_reclaimable_bytes is None


def test_cgroup_unmapped_page_cache_is_reclaimable_mapped_files_are_not() -> None:
    m = Machine(available=20 * GiB, total=24 * GiB)
    m.files[SELF_CGROUP] = V1_SELF
    d = "/sys/fs/cgroup/memory/jobs/tierd"
    m.files[d + "/memory.limit_in_bytes"] = f"{2 * GiB}\n"
    m.files[d + "/memory.usage_in_bytes"] = f"{1900 * MiB}\n"
    # 300 MiB of file pages (100 inactive, 200 active: a file just read twice); 80 MiB mapped of
    # which 50 MiB is our shmem arena (on neither file list), so 30 MiB of mapped libraries stay
    m.files[d + "/memory.stat"] = (
        f"total_inactive_file {100 * MiB}\ntotal_active_file {200 * MiB}\n"
        f"total_mapped_file {80 * MiB}\ntotal_shmem {50 * MiB}\n"
    )
    p = m.monitor().poll(0)
    assert p.cgroup_reclaimable_bytes == 270 * MiB
    assert p.available_bytes == 2 * GiB - (1900 - 270) * MiB
    m.files[d + "/memory.stat"] = f"total_inactive_file {100 * MiB}\ntotal_active_file {200 * MiB}\n"
    assert m.monitor().poll(0).cgroup_reclaimable_bytes == 300 * MiB  # nothing mapped
    v2 = "0::/svc\n"
    m.files[SELF_CGROUP] = v2
    m.files["/sys/fs/cgroup/svc/memory.max"] = f"{2 * GiB}\n"
    m.files["/sys/fs/cgroup/svc/memory.current"] = f"{1900 * MiB}\n"
    m.files["/sys/fs/cgroup/svc/memory.stat"] = (
        f"inactive_file {100 * MiB}\nactive_file {200 * MiB}\nfile_mapped {80 * MiB}\nshmem {50 * MiB}\n"
    )
    assert m.monitor().poll(0).cgroup_reclaimable_bytes == 270 * MiB


def test_cgroup_v1_unlimited_falls_back_to_the_machine() -> None:
    m = Machine(available=900 * MiB)
    m.files[SELF_CGROUP] = V1_SELF
    v1_group(m, "/jobs/tierd", 9223372036854771712, usage=5 * GiB)
    p = m.monitor().poll(GiB)
    assert p.cgroup_limit_bytes is None and p.cgroup_usage_bytes == 5 * GiB
    assert p.total_bytes == TOTAL and p.available_bytes == 900 * MiB
    assert p.level == "high"


def test_cgroup_v1_tightest_ancestor_limit_is_used() -> None:
    m = Machine(available=20 * GiB, total=24 * GiB)
    m.files[SELF_CGROUP] = V1_SELF
    v1_group(m, "/jobs", 1 * GiB, usage=900 * MiB)  # the parent binds us too
    v1_group(m, "/jobs/tierd", 4 * GiB, usage=100 * MiB)
    mon = m.monitor()
    p = mon.poll(0)
    assert p.cgroup_limit_bytes == 1 * GiB and p.available_bytes == 124 * MiB
    assert mon.readings()["sources"]["cgroup"]["dir"] == "/sys/fs/cgroup/memory/jobs"


def test_cgroup_path_missing_under_the_mount_falls_back_to_its_root() -> None:
    # in a container the listed path is the host's; the mount's root is the container's own group
    m = Machine(available=20 * GiB, total=24 * GiB)
    m.files[SELF_CGROUP] = "4:memory:/docker/abc123\n"
    v1_group(m, "/", 3 * GiB, usage=1 * GiB)
    p = m.monitor().poll(0)
    assert p.cgroup_limit_bytes == 3 * GiB and p.total_bytes == 3 * GiB


def test_cgroup_v2_limit_and_own_psi() -> None:
    m = Machine(available=20 * GiB, total=24 * GiB)
    m.files[SELF_CGROUP] = "0::/user.slice/tierd.service\n"
    d = "/sys/fs/cgroup/user.slice/tierd.service"
    m.files[d + "/memory.max"] = "4294967296\n"
    m.files[d + "/memory.current"] = f"{3900 * MiB}\n"
    m.files[d + "/memory.stat"] = "anon 1\nfile 2\nactive_file 0\ninactive_file 0\nshmem 4\n"
    m.files[d + "/memory.pressure"] = psi(7.0, 1.0)
    m.files[PSI_PATH] = psi(0.0)  # the host is calm; our group is not
    mon = m.monitor()
    p = mon.poll(GiB)
    assert p.cgroup_limit_bytes == 4 * GiB and p.available_bytes == 196 * MiB
    assert p.psi_some_avg10 == 7.0
    assert p.level == "critical"  # 196 MiB < 5% of the 4 GiB limit (204.8 MiB; no floors in a cgroup)
    assert mon.readings()["sources"] == {"psi": d + "/memory.pressure", "cgroup": {"version": 2, "dir": d}}
    assert set(m.reads[-5:]) == {
        d + "/memory.pressure",
        d + "/memory.max",
        d + "/memory.current",
        d + "/memory.stat",
    }


def test_cgroup_v2_max_is_no_limit() -> None:
    m = Machine(available=8000 * MiB)
    m.files[SELF_CGROUP] = "0::/a\n"
    m.files["/sys/fs/cgroup/a/memory.max"] = "max\n"
    m.files["/sys/fs/cgroup/a/memory.current"] = f"{20 * GiB}\n"
    m.files[PSI_PATH] = psi(0.0)
    mon = m.monitor()
    p = mon.poll(GiB)
    assert p.cgroup_limit_bytes is None and p.total_bytes == TOTAL and p.level == "none"
    assert mon.readings()["sources"]["psi"] == PSI_PATH  # the group has no memory.pressure: system-wide


def test_hybrid_hierarchy_uses_the_v1_memory_controller() -> None:
    m = Machine(available=20 * GiB, total=24 * GiB)
    m.files[SELF_CGROUP] = V1_SELF  # has both "4:memory:/jobs/tierd" and "0::/"
    m.files["/sys/fs/cgroup/memory.max"] = "1073741824\n"  # must not be read as ours
    v1_group(m, "/jobs/tierd", 2 * GiB, usage=GiB)
    assert m.monitor().poll(0).cgroup_limit_bytes == 2 * GiB


def test_no_cgroup_files_at_all() -> None:
    m = Machine(available=900 * MiB)
    m.files[SELF_CGROUP] = PermissionError(errno.EACCES, "Permission denied")
    p = m.monitor().poll(GiB)
    assert p.cgroup_limit_bytes is None and p.level == "high"


def test_a_poll_is_a_few_reads() -> None:
    m = Machine(available=20 * GiB, total=24 * GiB)
    m.files[SELF_CGROUP] = V1_SELF
    m.files[PSI_PATH] = psi(0.0)
    v1_group(m, "/jobs/tierd", 2 * GiB, usage=GiB)
    mon = m.monitor()
    before = len(m.reads)
    mon.poll(0)
    # PSI, limit, usage, memory.stat (psutil reads /proc/meminfo on top: five in all)
    assert len(m.reads) - before == 4


def test_config_rejects_nonsense() -> None:
    with pytest.raises(ValueError):
        MonitorConfig(high_fraction=0.2, low_fraction=0.15)
    with pytest.raises(ValueError):
        MonitorConfig(critical_fraction=0.0)
    with pytest.raises(ValueError):
        MonitorConfig(high_min_bytes=2 * GiB)


def test_readings_before_and_after_a_poll_are_json() -> None:
    m = Machine(available=900 * MiB)
    mon = m.monitor()
    r = mon.readings()
    assert r["pressure"] is None and r["level"] == "none" and r["polls"] == 0
    mon.poll(GiB)
    r = json.loads(json.dumps(mon.readings()))
    assert r["level"] == "high" and r["polls"] == 1
    assert r["pressure"]["shrink_bytes"] == 400 * MiB
    assert r["config"]["high_fraction"] == 0.10


# -- the real machine --------------------------------------------------------------------------


def test_poll_on_this_machine_is_sane() -> None:
    mon = Monitor()
    p = mon.poll(tier_used_bytes=64 * MiB)
    total = psutil.virtual_memory().total
    assert p.level in LEVELS
    assert 0 < p.total_bytes <= total and p.system_total_bytes == total
    assert 0 <= p.available_bytes <= p.total_bytes
    assert p.critical_bytes < p.high_bytes < p.low_bytes < p.total_bytes
    assert 0 <= p.shrink_bytes <= 64 * MiB
    if p.level in ("none", "low"):
        assert p.shrink_bytes == 0
    if os.path.exists("/proc/pressure/memory") and os.access("/proc/pressure/memory", os.R_OK):
        assert p.psi_some_avg10 is not None and 0.0 <= p.psi_some_avg10 <= 100.0
    if p.cgroup_limit_bytes is not None:
        assert p.cgroup_usage_bytes is not None and p.total_bytes <= p.cgroup_limit_bytes
    json.dumps(mon.readings())


# -- giving pages back -------------------------------------------------------------------------


@pytest.fixture
def memfd_arena() -> Iterator[tuple[int, mmap.mmap]]:
    """A small arena made like the RAM tier's: memfd, fallocate, MAP_SHARED | MAP_POPULATE."""
    size = 64 * PAGE
    fd = os.memfd_create("tierd-test-release", os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    os.posix_fallocate(fd, 0, size)
    mm = mmap.mmap(fd, size, flags=mmap.MAP_SHARED | mmap.MAP_POPULATE)
    try:
        yield fd, mm
    finally:
        mm.close()
        os.close(fd)


def resident(fd: int) -> int:
    return os.fstat(fd).st_blocks * 512


def test_release_pages_on_a_real_memfd(memfd_arena: tuple[int, mmap.mmap]) -> None:
    fd, mm = memfd_arena
    size = len(mm)
    assert resident(fd) == size

    # a free region [100, 100 + 20 pages) between two used ones whose bytes share its end pages
    off, length = 100, 20 * PAGE
    mm[:off] = b"L" * off
    mm[off : off + length] = b"x" * length
    mm[off + length : off + length + 50] = b"R" * 50

    released = release_pages(mm, off, length)
    assert released == 19 * PAGE  # whole pages inside the span only
    assert resident(fd) == size - released
    assert mm[:off] == b"L" * off and mm[off + length : off + length + 50] == b"R" * 50
    assert mm[off:PAGE] == b"x" * (PAGE - off)  # the partial first page was kept
    assert mm[PAGE : 20 * PAGE] == bytes(19 * PAGE)  # the hole reads as zeros
    mm[PAGE : 2 * PAGE] = b"y" * PAGE  # the hole takes writes again (its pages fault back in)
    assert mm[PAGE : 2 * PAGE] == b"y" * PAGE and mm[2 * PAGE : 3 * PAGE] == bytes(PAGE)


def test_release_pages_is_a_noop_below_a_page(memfd_arena: tuple[int, mmap.mmap]) -> None:
    fd, mm = memfd_arena
    size = len(mm)
    assert release_pages(mm, 0, PAGE - 1) == 0
    assert release_pages(mm, 10, PAGE) == 0  # a page's worth, but no whole page inside
    assert release_pages(mm, 5 * PAGE, 0) == 0
    assert resident(fd) == size
    assert release_pages(mm, 2 * PAGE, PAGE) == PAGE  # exactly one aligned page
    assert resident(fd) == size - PAGE
    with pytest.raises(ValueError):
        release_pages(mm, size - PAGE, 2 * PAGE)
    with pytest.raises(ValueError):
        release_pages(mm, -1, PAGE)
