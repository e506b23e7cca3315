"""The daemon's state as Prometheus metrics, built by the official ``prometheus_client`` library.

One function, :func:`families`, turns a ``status`` dict (what :meth:`tierd.service.Service.status`
returns and ``tierctl status --json`` prints) into metric families; everything else wraps it:

- :class:`StatusCollector` reads a status source at each scrape; :func:`daemon_registry` puts one in
  a :class:`~prometheus_client.CollectorRegistry` of its own (one per daemon, never the library's
  global one: two daemons in one process, as in tests, do not mix);
- :func:`render` gives the exposition text of a status (``tierctl metrics`` renders the status it
  fetched, so it prints what the HTTP endpoint and the textfile show).

Every value comes from status at the moment of the scrape: nothing here keeps counts of its own,
so the metrics and ``status --json`` agree by construction and tests check the mapping. Names:

- ``tierd_tier_{capacity,used,largest_free}_bytes{tier}``, ``tierd_tier_entries{tier}``,
  ``tierd_tier_fragmentation_ratio{tier}``, ``tierd_tier_ceiling_bytes{tier="ram"}`` (the pressure
  ceiling): gauges;
- ``tierd_<counter>_total``: every counter of :mod:`tierd.metrics`, with its help, except
  ``hits_<tier>`` (as ``tierd_hits_total{tier}``) and ``stall_us`` (as
  ``tierd_prefetch_stall_seconds_total``);
- ``tierd_store_{reads,writes}_total{tier}``, with ``_bytes_total`` (encoded bytes) and
  ``_seconds_total`` (wall time): a chunk store's own counts;
- ``tierd_clients``, ``tierd_leases``, ``tierd_memory_pressure_level`` (0 none, 1 low, 2 high,
  3 critical): gauges;
- ``tierd_request_duration_seconds{verb}``: a histogram, from the frame read to the reply written;
- ``tierd_build_info``, ``tierd_machine_info``, ``tierd_machine_{cpu_cores,ram_bytes}``,
  ``tierd_state_device_info``, ``tierd_gpu_info{gpu}``, ``tierd_gpu_memory_bytes{gpu}``,
  ``tierd_calibration_{memcpy,disk_write,disk_read}_gbps``.

Per-client and per-entry data never become series (their number grows without bound).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from tierd.metrics import HELP

#: the pressure levels, in the order tierd_memory_pressure_level counts them (tierd.monitor.LEVELS)
PRESSURE_LEVELS = ("none", "low", "high", "critical")
#: counters shown under another name (or with labels) than tierd_<name>_total
_RELABELLED = {"stall_us"}
_TIER_GAUGES = (
    ("capacity_bytes", "tierd_tier_capacity_bytes", "bytes the tier can hold"),
    ("used_bytes", "tierd_tier_used_bytes", "bytes in use in the tier (allocator regions or stored records)"),
    ("entries", "tierd_tier_entries", "entries with a copy in the tier"),
    ("fragmentation", "tierd_tier_fragmentation_ratio", "share of the free bytes outside the largest hole"),
    ("largest_free_bytes", "tierd_tier_largest_free_bytes", "the largest free hole of a memory tier"),
)
_STORE_COUNTERS = (
    ("reads", "tierd_store_reads", "records read from a chunk store"),
    ("read_bytes", "tierd_store_read_bytes", "encoded bytes read from a chunk store"),
    ("read_seconds", "tierd_store_read_seconds", "seconds spent reading (decode and checksums included)"),
    ("writes", "tierd_store_writes", "records written to a chunk store"),
    ("write_bytes", "tierd_store_write_bytes", "encoded bytes written to a chunk store"),
    ("write_seconds", "tierd_store_write_seconds", "seconds spent writing (encode and commit included)"),
)


def families(s: dict[str, Any]) -> Iterator[Metric]:
    """Every metric family of one status snapshot."""
    yield from _tiers(s)
    yield from _counters(s["counters"])
    for name, help in (("clients", "connected clients"), ("leases", "leases held by clients")):
        g = GaugeMetricFamily(f"tierd_{name}", help)
        g.add_metric([], s[name])
        yield g
    p = s.get("pressure")
    g = GaugeMetricFamily(
        "tierd_memory_pressure_level", "the memory monitor's verdict: 0 none, 1 low, 2 high, 3 critical"
    )
    g.add_metric([], PRESSURE_LEVELS.index(p["level"]) if p else 0)
    yield g
    yield from _latency(s.get("latency"))
    yield from _machine(s)


def _tiers(s: dict[str, Any]) -> Iterator[Metric]:
    tiers = s["tiers"]
    for key, name, help in _TIER_GAUGES:
        g = GaugeMetricFamily(name, help, labels=["tier"])
        for t in tiers:
            if key in t:
                g.add_metric([t["name"]], t[key])
        yield g
    ceiling = (s.get("placement") or {}).get("ram_ceiling_bytes")
    g = GaugeMetricFamily(
        "tierd_tier_ceiling_bytes", "bytes the tier may fill now (below capacity under memory pressure)",
        labels=["tier"],
    )  # fmt: skip
    if ceiling is not None:
        g.add_metric(["ram"], ceiling)
    yield g
    for key, name, help in _STORE_COUNTERS:
        c = CounterMetricFamily(name, help, labels=["tier"])
        for t in tiers:
            if key in t:
                c.add_metric([t["name"]], t[key])
        yield c


def _counters(counters: dict[str, int]) -> Iterator[Metric]:
    hits = CounterMetricFamily(
        "tierd_hits", "versions leased by gets that were in the tier already (no promotion waited for)",
        labels=["tier"],
    )  # fmt: skip
    for name, value in counters.items():
        if name.startswith("hits_"):
            hits.add_metric([name.removeprefix("hits_")], value)
        elif name not in _RELABELLED:
            c = CounterMetricFamily(f"tierd_{name}", HELP.get(name, name))
            c.add_metric([], value)
            yield c
    yield hits
    c = CounterMetricFamily("tierd_prefetch_stall_seconds", "seconds get requests waited for promotions")
    c.add_metric([], counters.get("stall_us", 0) / 1e6)
    yield c


def _latency(lat: dict[str, Any] | None) -> Iterator[Metric]:
    h = HistogramMetricFamily(
        "tierd_request_duration_seconds",
        "seconds from a request's frame being read to its reply being written, by verb",
        labels=["verb"],
    )
    if lat:
        bounds = [*(str(float(b)) for b in lat["buckets"]), "+Inf"]
        for verb, v in lat["verbs"].items():
            total, buckets = 0, []
            for bound, n in zip(bounds, v["counts"], strict=True):
                total += n
                buckets.append((bound, total))
            h.add_metric([verb], buckets, v["sum"])
    yield h


def _machine(s: dict[str, Any]) -> Iterator[Metric]:
    d = s.get("daemon") or {}
    info = InfoMetricFamily("tierd_build", "this daemon's version and protocol")
    info.add_metric([], {"version": str(d.get("version", "")), "protocol": str(d.get("protocol", "")),
                         "loop": str(d.get("loop", ""))})  # fmt: skip
    yield info
    hw = s.get("hardware") or {}
    if not hw:  # read once at start, in the background: not there yet
        return
    info = InfoMetricFamily("tierd_machine", "the machine: CPU model")
    info.add_metric([], {"cpu_model": hw.get("cpu_model") or "unknown"})
    yield info
    g = GaugeMetricFamily("tierd_machine_cpu_cores", "logical CPU cores")
    g.add_metric([], hw.get("cpu_cores") or 0)
    yield g
    g = GaugeMetricFamily("tierd_machine_ram_bytes", "physical memory")
    g.add_metric([], hw.get("ram_bytes") or 0)
    yield g
    dev = hw.get("state_device") or {}
    info = InfoMetricFamily("tierd_state_device", "the state directory's block device (from sysfs)")
    labels = {"device": dev.get("device") or "none", "fstype": dev.get("fstype") or "unknown"}
    labels.update(nvme=_flag(dev.get("nvme")), rotational=_flag(dev.get("rotational")))
    info.add_metric([], labels)
    yield info
    info = InfoMetricFamily("tierd_gpu", "NVIDIA GPUs seen through NVML", labels=["gpu"])
    mem = GaugeMetricFamily("tierd_gpu_memory_bytes", "an NVIDIA GPU's memory", labels=["gpu"])
    for gpu in hw.get("gpus") or []:
        info.add_metric([str(gpu["index"])], {"name": gpu["name"], "driver": gpu["driver"]})
        mem.add_metric([str(gpu["index"])], gpu["memory_bytes"])
    yield info
    yield mem
    cal = (s.get("placement") or {}).get("calibration")
    if cal:
        for key, help in (("memcpy_gbps", "memcpy speed measured at start, GB/s"),
                          ("disk_write_gbps", "disk write speed measured at start, GB/s"),
                          ("disk_read_gbps", "disk read speed measured at start, GB/s")):  # fmt: skip
            g = GaugeMetricFamily(f"tierd_calibration_{key}", help)
            g.add_metric([], cal[key])
            yield g


def _flag(v: bool | None) -> str:
    return "unknown" if v is None else "yes" if v else "no"


class StatusCollector(Collector):
    """A collector that reads ``source()`` (a status dict) at every scrape."""

    def __init__(self, source: Callable[[], dict[str, Any]]) -> None:
        self.source = source

    def collect(self) -> Iterator[Metric]:
        return families(self.source())


def daemon_registry(source: Callable[[], dict[str, Any]]) -> CollectorRegistry:
    """A registry of one daemon's own (the library's global one is left alone)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StatusCollector(source))
    return registry


def render(status: dict[str, Any]) -> bytes:
    """The exposition text (format 0.0.4) of one status snapshot."""
    return generate_latest(daemon_registry(lambda: status))
