"""The daemon's counters: one registry, one owner, each counter saying what it counts.

One :class:`Metrics` per daemon (the server makes it and hands it to the manager; everything else
reaches it as ``manager.metrics``). Code that counts something increments its attribute::

    metrics.gets += len(found)

An attribute of a slotted dataclass, not a method call or a dict lookup: the get path bumps two or
three counters per request and must not pay more than an attribute store for each. Counters only
grow (from 0 at start; nothing resets them while the daemon runs) and are changed on the event
loop only.

Readers: ``status`` (``tierctl status --json``'s ``counters``, in this order, by :meth:`snapshot`)
and the Prometheus exposition (:mod:`tierd.exposition`), which takes each counter's one-line help
from :data:`HELP`. The names are public (users' scripts and tests read them): add counters freely,
rename none.

Request latency is a :class:`Latency`: a histogram per verb with fixed buckets, observed by the
connection once per reply (a bisect over 14 bounds and two stores; with the connection's two clock
reads 0.5-1.0 us here, 0.5% of a small get + release round trip: bench/bench_metrics.py).
"""

from __future__ import annotations

from bisect import bisect_left
from dataclasses import dataclass, field, fields
from typing import Any


def _counter(help: str) -> Any:
    return field(default=0, metadata={"help": help})


@dataclass(slots=True)
class Metrics:
    """Every counter of the daemon (see the module docstring)."""

    puts: int = _counter("versions published by a put (sealed)")
    gets: int = _counter("versions leased by get requests (a get of n keys counts n)")
    hits_ram: int = _counter("versions leased that were in RAM already (no promotion waited for)")
    hits_gpu: int = _counter("versions leased in the GPU tier that were there already (GPU tier only)")
    gpu_promotions: int = _counter("copies made into the GPU tier (GPU tier only)")
    reads_disk: int = _counter("promotions for a get that read a chunk store")
    releases: int = _counter("leases ended by a release")
    bad_releases: int = _counter("lease ids released that were not the client's (ignored)")
    deletes: int = _counter("keys deleted")
    expired: int = _counter("entries deleted because their ttl passed since their last access")
    prefetch_hints: int = _counter("keys named in clients' prefetch hints")
    prefetch_issued: int = _counter("promotions started for a prediction")
    prefetch_used: int = _counter("prefetched versions read before they left RAM")
    demotions: int = _counter("copies dropped from a memory tier, a copy below made or found first")
    promotions: int = _counter("copies made into RAM (gets and prefetches)")
    tier_full: int = _counter("TierFull errors raised (a prefetch dropped for room is not one)")
    errors: int = _counter("requests answered with a typed error other than not_found")
    internal_errors: int = _counter("requests failed by a daemon bug (logged; the daemon goes on)")
    bad_frames: int = _counter("frames not decodable: unknown type, malformed payload, oversize length")
    pressure_demoted_bytes: int = _counter("bytes demoted from RAM under memory pressure")
    prefetch_wasted_bytes: int = _counter("bytes prefetched into RAM that left it unread")
    prefetch_hinted: int = _counter("promotions started for a client's hint")
    prefetch_dropped: int = _counter("predictions and hints not loaded: stale, over budget or no room")
    stall_us: int = _counter("microseconds get requests waited for promotions")
    pressure_released_bytes: int = _counter("bytes of free arena pages given back to the kernel")
    not_found: int = _counter("requests answered not_found (a miss, not a failure)")
    prefetch_taken: int = _counter("unread prefetches demoted to make room for a demand request")
    demand_waits_for_prefetch: int = _counter("waits of a demand request for prefetches in flight")
    promoted_bytes: int = _counter("bytes copied into RAM by promotions (gets and prefetches)")
    demoted_bytes: int = _counter("bytes of copies dropped from a memory tier by demotions")
    shares_written: int = _counter("versions written to the remote tier (put share=True or remote_tags)")
    shares_dropped: int = _counter("shares not written because the remote tier was full (maxmemory)")
    shares_failed: int = _counter("shares not written because the remote tier failed (down, timeout)")
    remote_hits: int = _counter("keys missing here that a get found in the remote tier and promoted")
    remote_misses: int = _counter("keys missing here that the remote tier did not have either")
    prefetch_covered: int = _counter("predictions not loaded: already hinted, in RAM, loading or queued")

    def snapshot(self) -> dict[str, int]:
        """Every counter by name, in the order declared (status shows this)."""
        return {name: getattr(self, name) for name in NAMES}


#: counters shown only where the daemon has a GPU tier
GPU_COUNTERS = ("hits_gpu", "gpu_promotions")
#: every counter's name, in the order declared
NAMES: tuple[str, ...] = tuple(f.name for f in fields(Metrics))
#: every counter's one-line help, by name
HELP: dict[str, str] = {f.name: f.metadata["help"] for f in fields(Metrics)}


#: upper bounds (seconds) of the request-latency buckets: 25 us (a get from RAM) to 10 s (a big
#: promotion from disk); one more bucket, +Inf, takes the rest
LATENCY_BUCKETS: tuple[float, ...] = (
    25e-6,
    50e-6,
    100e-6,
    250e-6,
    500e-6,
    1e-3,
    2.5e-3,
    5e-3,
    10e-3,
    25e-3,
    0.1,
    0.5,
    2.5,
    10.0,
)


class Latency:
    """Seconds from a request's frame being read to its reply being written, by verb.

    ``counts[verb][i]`` is the number of replies that took at most ``LATENCY_BUCKETS[i]`` and more
    than the bound before it (not cumulative; the last slot is over every bound); ``sums[verb]`` is
    their total in seconds. Changed on the event loop only, like the counters.
    """

    __slots__ = ("counts", "sums")

    def __init__(self) -> None:
        self.counts: dict[str, list[int]] = {}
        self.sums: dict[str, float] = {}

    def observe(self, verb: str, seconds: float) -> None:
        counts = self.counts.get(verb)
        if counts is None:
            counts = self.counts[verb] = [0] * (len(LATENCY_BUCKETS) + 1)
            self.sums[verb] = 0.0
        counts[bisect_left(LATENCY_BUCKETS, seconds)] += 1
        self.sums[verb] += seconds

    def snapshot(self) -> dict[str, Any]:
        """For status: the bounds, then per verb its bucket counts (not cumulative) and sum."""
        return {
            "buckets": list(LATENCY_BUCKETS),
            "verbs": {v: {"counts": list(c), "sum": self.sums[v]} for v, c in sorted(self.counts.items())},
        }
