"""Memory pressure monitor: how much of its RAM tier the daemon should give back, now.

The daemon calls :meth:`Monitor.poll` every 0.5-1 s with the bytes its RAM tier holds and gets a
:class:`Pressure`: a level (``none`` < ``low`` < ``high`` < ``critical``), the numbers behind it, and
``shrink_bytes``, how many bytes to free from the RAM tier now. This is how invariant 6 ("memory
pressure demotes before the OOM killer") is met: the arena is pre-faulted, so the machine only gets
its memory back when the daemon demotes entries and hands the pages of free regions back to the
kernel with :func:`release_pages`.

Inputs, at most five small file reads per poll (``/proc/meminfo`` through psutil, one PSI file, the
cgroup's limit, usage and ``memory.stat``), found once at start (:meth:`Monitor.rediscover`):

- ``psutil.virtual_memory()``: ``available`` (MemAvailable) and ``total``.
- PSI: ``some avg10`` / ``full avg10`` (share of the last 10 s in which some / all tasks stalled on
  memory) from the memory cgroup's own ``memory.pressure`` on cgroup v2, else ``/proc/pressure/memory``.
  Absent (kernel < 4.20, ``psi=0``, no permission) means "no PSI": the levels then come from bytes only.
- The memory cgroup the daemon runs in (v1 ``memory.limit_in_bytes`` / ``memory.usage_in_bytes``,
  v2 ``memory.max`` / ``memory.current``), at the level of the hierarchy with the tightest limit.
  ``max`` and values >= :attr:`MonitorConfig.unlimited_bytes` mean no limit. Page cache counts in a
  cgroup's usage, but the kernel reclaims page cache that no process maps before it OOM-kills
  anyone, so the working set is ``usage - (inactive_file + active_file - mapped file pages)``.
  (kubelet leaves out only ``inactive_file``; that counted the pages of the disk tier and of a
  checkpoint just read, recently touched and so "active", as memory the daemon had to give back,
  and in a tight cgroup it demoted its tier over and over for page cache the kernel would have
  dropped anyway. Thrashing on hot file pages shows up in PSI, which is read too.) Our memfd arena
  is shmem: it sits on the anon LRU, is in neither file list, and so always counts.

Effective numbers: ``total = min(system total, cgroup limit)`` and ``available = min(MemAvailable,
limit - working set)``.

Levels (defaults; every number is a :class:`MonitorConfig` field). A byte threshold is
``max(fraction * total, min(floor, floor_cap_multiple * fraction * total))``: a fraction of total with
a floor in bytes, the floor capped so that a small machine is not "under pressure" while half empty.
When the total is a memory cgroup's limit (below the machine's memory), the floors are left out:
whoever set the limit sized it for this workload, and a share of it is the right unit. (With the
floors, a 1.1 GiB cgroup holding tierd and a model counted as "low" with 30% of it free and
"high" with 20%, and the daemon shrank its tier for memory nobody needed.)

============  ==========================================  =================================
level         entered when                                left when (hysteresis)
============  ==========================================  =================================
critical      available < 5% / 256 MiB, or PSI full > 5   available >= 1.25x and full <= 2.5
high          available < 10% / 512 MiB, or PSI some > 10  available >= 1.25x and some <= 5
low           available < 15% / 1 GiB, or PSI some > 5     available >= 1.25x and some <= 2.5
none          otherwise
============  ==========================================  =================================

Hysteresis: a level is entered as soon as its condition holds, and left only when its *recovery*
condition holds (available back above 1.25x its byte threshold and PSI at or below half its
trigger). Formally ``level = max(entered, min(previous, held))``, where ``entered`` is the highest
level whose entry condition holds and ``held`` the highest level whose recovery condition does not
yet hold; so levels climb at once and step down only through the bands. No timing is involved.

``shrink_bytes`` (0 below ``high``): ``target - available``, where ``target`` is 1.30x the high
threshold: its recovery point (1.25x) plus 5% of overshoot, so that once the daemon has freed it the
next poll ends the high level even if other processes took a few more MiB meanwhile. While a PSI
trigger is exceeded and PSI rose since the previous poll, at least a step of 2% of the tier (PSI can
show stalls while MemAvailable looks fine, e.g. thrashing inside a cgroup). Unchanged PSI values give
no step (the kernel refreshes avg10 every 2 s, faster polls see the same numbers) and neither do
falling ones (earlier give-backs are working). The result is capped at ``tier_used_bytes``.
``shrink_bytes`` is measured from the state of this poll: the caller subtracts what it already has
in flight (demotions not finished) before acting on it.

Use, in the daemon's loop (``Server._relieve_pressure``; the placement owns the policy)::

    p = monitor.poll(ram.capacity_bytes)          # the arena is pre-faulted: all of it is resident
    if p.shrink_bytes:
        # lower the RAM tier's ceiling to used - shrink_bytes, return free regions' pages to the
        # kernel (release_pages), then demote cold entries (unread prefetches included) down to it
    elif p.level == "none":
        # regrow the ceiling by a small step per poll; "low" holds it where it is
"""

from __future__ import annotations

import contextlib
import math
import posixpath
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, Literal, Protocol

import psutil

__all__ = [
    "LEVELS",
    "Level",
    "Monitor",
    "MonitorConfig",
    "Pressure",
    "VmStats",
]

Level = Literal["none", "low", "high", "critical"]
LEVELS: tuple[Level, ...] = ("none", "low", "high", "critical")
_NONE, _LOW, _HIGH, _CRITICAL = range(4)

_MiB = 1 << 20
_GiB = 1 << 30


class VmStats(Protocol):
    """What ``vm()`` returns: ``psutil.virtual_memory()`` fits."""

    @property
    def available(self) -> int: ...
    @property
    def total(self) -> int: ...


@dataclass(frozen=True)
class MonitorConfig:
    """Thresholds of the pressure levels and where the monitor reads. Defaults suit 4-32 GiB machines."""

    low_fraction: float = 0.15
    """Level "low" when available < this share of total (no shrink: stop growing, skip prefetch)."""
    low_min_bytes: int = 1 * _GiB
    """Byte floor of the "low" threshold (capped, see floor_cap_multiple)."""
    high_fraction: float = 0.10
    """Level "high" when available < this share of total: shrink the RAM tier."""
    high_min_bytes: int = 512 * _MiB
    """Byte floor of the "high" threshold (capped, see floor_cap_multiple)."""
    critical_fraction: float = 0.05
    """Level "critical" when available < this share of total: the OOM killer is near."""
    critical_min_bytes: int = 256 * _MiB
    """Byte floor of the "critical" threshold (capped, see floor_cap_multiple)."""
    floor_cap_multiple: float = 2.0
    """A byte floor never exceeds this multiple of its fractional threshold (keeps small cgroups sane)."""
    recovery_margin: float = 0.25
    """A level is left when available >= (1 + this) x its threshold (the hysteresis band)."""
    shrink_overshoot: float = 0.05
    """shrink_bytes aims (recovery_margin + this) x the high threshold above it, past the recovery point."""
    psi_low_some: float = 5.0
    """Level "low" when PSI some avg10 (percent of time stalled) exceeds this."""
    psi_high_some: float = 10.0
    """Level "high" when PSI some avg10 exceeds this."""
    psi_critical_full: float = 5.0
    """Level "critical" when PSI full avg10 (all tasks stalled) exceeds this."""
    psi_recovery_ratio: float = 0.5
    """A PSI-entered level is left when PSI is at or below this share of its trigger."""
    psi_shrink_fraction: float = 0.02
    """Share of the tier to free per poll while a PSI trigger is exceeded and PSI is rising."""
    psi_path: str = "/proc/pressure/memory"
    """System-wide PSI file; used when the cgroup has no memory.pressure of its own (cgroup v1)."""
    prefer_cgroup_psi: bool = True
    """On cgroup v2, read the memory cgroup's own memory.pressure rather than the system-wide file."""
    proc_self_cgroup: str = "/proc/self/cgroup"
    """Where the daemon's cgroup paths are listed."""
    cgroup_root: str = "/sys/fs/cgroup"
    """cgroup v2 mount point; the v1 memory hierarchy is <cgroup_root>/memory."""
    subtract_inactive_file: bool = True
    """Working set = cgroup usage - unmapped page cache (reclaimable); False: usage itself."""
    unlimited_bytes: int = 1 << 60
    """A cgroup limit at or above this (v1 writes 9223372036854771712 for none) is no limit."""

    def __post_init__(self) -> None:
        for name in ("low_fraction", "high_fraction", "critical_fraction"):
            if not 0.0 < getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in (0, 1), not {getattr(self, name)}")
        if not self.critical_fraction <= self.high_fraction <= self.low_fraction:
            raise ValueError("fractions must satisfy critical_fraction <= high_fraction <= low_fraction")
        if not self.critical_min_bytes <= self.high_min_bytes <= self.low_min_bytes:
            raise ValueError("floors must satisfy critical_min_bytes <= high_min_bytes <= low_min_bytes")
        if self.recovery_margin < 0 or self.shrink_overshoot < 0 or self.floor_cap_multiple < 1:
            raise ValueError("recovery_margin, shrink_overshoot must be >= 0 and floor_cap_multiple >= 1")
        if not 0.0 <= self.psi_recovery_ratio <= 1.0 or not 0.0 <= self.psi_shrink_fraction <= 1.0:
            raise ValueError("psi_recovery_ratio and psi_shrink_fraction must be in [0, 1]")


@dataclass(frozen=True)
class Pressure:
    """One poll's verdict and the numbers behind it. Bytes are effective (cgroup-aware) unless named."""

    level: Level
    shrink_bytes: int
    """Bytes to free from the RAM tier now (0 below "high"), capped at tier_used_bytes."""
    available_bytes: int
    """min(MemAvailable, cgroup limit - cgroup working set)."""
    total_bytes: int
    """min(MemTotal, cgroup limit)."""
    system_available_bytes: int
    system_total_bytes: int
    psi_some_avg10: float | None
    psi_full_avg10: float | None
    cgroup_limit_bytes: int | None
    """None when there is no limit or no readable memory cgroup."""
    cgroup_usage_bytes: int | None
    cgroup_reclaimable_bytes: int | None
    """Page cache of the cgroup that no process maps, left out of its working set."""
    low_bytes: int
    high_bytes: int
    critical_bytes: int
    target_bytes: int
    """Available bytes shrink_bytes aims at: a little past the point that ends the high level."""
    tier_used_bytes: int
    reasons: tuple[str, ...] = ()
    """Which conditions set or held the level, for logs and status."""

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["reasons"] = list(self.reasons)
        return d


@dataclass(frozen=True)
class _Cgroup:
    version: int
    dir: str
    limit_file: str
    usage_file: str
    stat_file: str
    stat_prefix: str  # "total_" on v1 (the group and its children), "" on v2


def _read_text(path: str) -> str:
    with open(path, encoding="ascii", errors="replace") as f:
        return f.read()


def _unmapped_cache(stat: dict[str, int], prefix: str, version: int) -> int | None:
    """Page cache of a cgroup that no process maps: ``active_file + inactive_file`` less the mapped
    file pages. The mapped count includes mapped shmem (our arena), which is on neither file list,
    so the shmem is taken off it first. None when the file lists are missing."""
    inactive, active = stat.get(prefix + "inactive_file"), stat.get(prefix + "active_file")
    if inactive is None:
        return None
    mapped = stat.get(prefix + ("mapped_file" if version == 1 else "file_mapped"), 0)
    mapped_files = max(0, mapped - stat.get(prefix + "shmem", 0))
    return max(0, inactive + (active or 0) - mapped_files)


def _threshold(total: int, fraction: float, floor: int, cap_multiple: float) -> int:
    frac = fraction * total
    return round(max(frac, min(floor, cap_multiple * frac)))


def parse_psi(text: str) -> tuple[float | None, float | None]:
    """(some avg10, full avg10) from a PSI file's text; None for a line that is missing."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        parts = line.split()
        if not parts or parts[0] not in ("some", "full"):
            continue
        for kv in parts[1:]:
            k, _, v = kv.partition("=")
            if k == "avg10":
                with contextlib.suppress(ValueError):
                    out[parts[0]] = float(v)
    return out.get("some"), out.get("full")


class Monitor:
    """Polls memory pressure. Not thread-safe: the daemon's loop owns it (each poll is a few reads)."""

    def __init__(
        self,
        config: MonitorConfig | None = None,
        *,
        read_file: Callable[[str], str] = _read_text,
        vm: Callable[[], VmStats] = psutil.virtual_memory,
    ) -> None:
        """``read_file(path) -> text`` raises OSError when the file cannot be read; ``vm()`` returns
        an object with ``available`` and ``total`` bytes. Both are injectable for scripted tests."""
        self.config = config or MonitorConfig()
        self._read = read_file
        self._vm = vm
        self._level = _NONE
        self._prev_psi: tuple[float | None, float | None] | None = None
        self._last: Pressure | None = None
        self._polls = 0
        self._cgroup: _Cgroup | None = None
        self._psi_path: str | None = None
        self.rediscover()

    # -- discovery (once at start, or when the caller asks) -------------------------------------

    def rediscover(self) -> None:
        """Find the memory cgroup (the level with the tightest limit) and the PSI file again."""
        self._cgroup = self._find_cgroup()
        self._psi_path = None
        candidates = []
        if self._cgroup is not None and self._cgroup.version == 2 and self.config.prefer_cgroup_psi:
            candidates.append(posixpath.join(self._cgroup.dir, "memory.pressure"))
        candidates.append(self.config.psi_path)
        for path in candidates:
            try:
                some, full = parse_psi(self._read(path))
            except OSError:
                continue
            if some is not None or full is not None:
                self._psi_path = path
                break

    def _find_cgroup(self) -> _Cgroup | None:
        try:
            text = self._read(self.config.proc_self_cgroup)
        except OSError:
            return None
        v1_path = v2_path = None
        for line in text.splitlines():
            hier, sep, rest = line.partition(":")
            controllers, sep2, path = rest.partition(":")
            if not (sep and sep2):
                continue
            if "memory" in controllers.split(","):
                v1_path = path
            elif hier == "0" and controllers == "":
                v2_path = path
        root = self.config.cgroup_root
        if v1_path is not None:  # the memory controller is bound to a v1 hierarchy (hybrid setups too)
            version, path, base = 1, v1_path, posixpath.join(root, "memory")
            files = ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_")
        elif v2_path is not None:
            version, path, base = 2, v2_path, root
            files = ("memory.max", "memory.current", "")
        else:
            return None
        # Walk from our own group up to the root: a parent's limit binds us too. Inside a container
        # the listed path may not exist under the mount (it is the host's); the walk then ends at
        # the mount's root, which is the container's own group.
        levels: list[tuple[str, int | None]] = []
        parts = [p for p in path.strip().split("/") if p and p != "."]
        if ".." in parts:  # our group lies outside this cgroup namespace's root: only the root is ours
            parts = []
        for depth in range(len(parts), -1, -1):
            d = posixpath.join(base, *parts[:depth])
            with contextlib.suppress(OSError, ValueError):
                levels.append((d, self._parse_limit(self._read(posixpath.join(d, files[0])))))
        if not levels:
            return None
        limited = [(limit, d) for d, limit in levels if limit is not None]
        chosen = min(limited)[1] if limited else levels[0][0]
        return _Cgroup(
            version=version,
            dir=chosen,
            limit_file=posixpath.join(chosen, files[0]),
            usage_file=posixpath.join(chosen, files[1]),
            stat_file=posixpath.join(chosen, "memory.stat"),
            stat_prefix=files[2],
        )

    def _parse_limit(self, text: str) -> int | None:
        text = text.strip()
        if text == "max":
            return None
        value = int(text)
        return None if value >= self.config.unlimited_bytes else value

    # -- reads (each poll) ----------------------------------------------------------------------

    def _read_psi(self) -> tuple[float | None, float | None]:
        if self._psi_path is None:
            return None, None
        try:
            return parse_psi(self._read(self._psi_path))
        except OSError:
            return None, None

    def _read_cgroup(self) -> tuple[int | None, int | None, int | None]:
        """(limit, usage, reclaimable) of the chosen cgroup; None where unreadable or unlimited."""
        cg = self._cgroup
        if cg is None:
            return None, None, None
        try:
            limit = self._parse_limit(self._read(cg.limit_file))
        except (OSError, ValueError):
            return None, None, None
        try:
            usage: int | None = int(self._read(cg.usage_file).strip())
        except (OSError, ValueError):
            usage = None
        reclaimable = None
        if limit is not None and usage is not None and self.config.subtract_inactive_file:
            try:
                stat = {}
                for line in self._read(cg.stat_file).splitlines():
                    key, _, value = line.partition(" ")
                    stat[key] = int(value)
                reclaimable = _unmapped_cache(stat, cg.stat_prefix, cg.version)
            except (OSError, ValueError):
                reclaimable = None
        return limit, usage, reclaimable

    # -- the verdict ----------------------------------------------------------------------------

    def poll(self, tier_used_bytes: int) -> Pressure:
        """Read the sources once and decide. ``tier_used_bytes``: physical memory the RAM tier holds
        that it could give back (its used regions plus free regions whose pages are still resident:
        the arena is pre-faulted, so free space holds memory until :func:`release_pages`)."""
        if tier_used_bytes < 0:
            raise ValueError(f"tier_used_bytes cannot be negative: {tier_used_bytes}")
        c = self.config
        vm = self._vm()
        sys_available, sys_total = int(vm.available), int(vm.total)
        some, full = self._read_psi()
        limit, usage, reclaimable = self._read_cgroup()

        total, available = sys_total, sys_available
        if limit is not None:
            total = min(total, limit)
            if usage is not None:
                working_set = max(0, usage - (reclaimable or 0))
                available = min(available, max(0, limit - working_set))
        available = max(0, available)

        cap = 1.0 if limit is not None and limit < sys_total else c.floor_cap_multiple  # see the module doc
        crit_b = _threshold(total, c.critical_fraction, c.critical_min_bytes, cap)
        high_b = _threshold(total, c.high_fraction, c.high_min_bytes, cap)
        low_b = _threshold(total, c.low_fraction, c.low_min_bytes, cap)
        recover = 1.0 + c.recovery_margin
        target = round(high_b * (recover + c.shrink_overshoot))

        def over(v: float | None, trigger: float) -> bool:
            return v is not None and v > trigger

        # (level, bytes threshold, psi value, psi trigger, psi name) from the top down
        rules = (
            (_CRITICAL, crit_b, full, c.psi_critical_full, "full"),
            (_HIGH, high_b, some, c.psi_high_some, "some"),
            (_LOW, low_b, some, c.psi_low_some, "some"),
        )
        entered, held = _NONE, _NONE
        enter_reasons: dict[int, list[str]] = {}
        hold_reasons: dict[int, list[str]] = {}
        avail_mib = f"available {available / _MiB:.0f} MiB"
        for lvl, thr, psi, trig, psi_name in rules:
            name, thr_hold, trig_hold = LEVELS[lvl], thr * recover, trig * c.psi_recovery_ratio
            why = []
            if available < thr:
                why.append(f"{avail_mib} < {name} {thr / _MiB:.0f} MiB")
            if over(psi, trig):
                why.append(f"psi {psi_name} avg10 {psi} > {name} {trig}")
            if why:
                enter_reasons[lvl] = why
                entered = max(entered, lvl)
            hold = []
            if available < thr_hold:
                hold.append(f"{avail_mib} < {name} recovery {thr_hold / _MiB:.0f} MiB")
            if over(psi, trig_hold):
                hold.append(f"psi {psi_name} avg10 {psi} > {name} recovery {trig_hold:g}")
            if hold:
                hold_reasons[lvl] = hold
                held = max(held, lvl)
        level = max(entered, min(self._level, held))
        reasons = enter_reasons.get(level) or hold_reasons.get(level) or []

        shrink = 0
        if level >= _HIGH:
            shrink = max(0, target - available)
            psi_hot = over(some, c.psi_high_some) or over(full, c.psi_critical_full)
            prev = self._prev_psi
            rising = prev is None or over(some, prev[0] or 0.0) or over(full, prev[1] or 0.0)
            if psi_hot and rising:
                step = math.ceil(c.psi_shrink_fraction * tier_used_bytes)
                if step > shrink:
                    reasons = [*reasons, f"psi rising: step {c.psi_shrink_fraction:.0%} of the tier"]
                shrink = max(shrink, step)
            shrink = min(shrink, tier_used_bytes)

        self._level = level
        self._prev_psi = (some, full)
        self._polls += 1
        self._last = Pressure(
            level=LEVELS[level],
            shrink_bytes=shrink,
            available_bytes=available,
            total_bytes=total,
            system_available_bytes=sys_available,
            system_total_bytes=sys_total,
            psi_some_avg10=some,
            psi_full_avg10=full,
            cgroup_limit_bytes=limit,
            cgroup_usage_bytes=usage,
            cgroup_reclaimable_bytes=reclaimable,
            low_bytes=low_b,
            high_bytes=high_b,
            critical_bytes=crit_b,
            target_bytes=target,
            tier_used_bytes=tier_used_bytes,
            reasons=tuple(reasons),
        )
        return self._last

    @property
    def level(self) -> Level:
        return LEVELS[self._level]

    def readings(self) -> dict[str, Any]:
        """For ``status``: the last poll (None before the first), the sources in use, the config."""
        cg = self._cgroup
        return {
            "level": LEVELS[self._level],
            "polls": self._polls,
            "pressure": self._last.as_dict() if self._last else None,
            "sources": {
                "psi": self._psi_path,
                "cgroup": None if cg is None else {"version": cg.version, "dir": cg.dir},
            },
            "config": asdict(self.config),
        }
