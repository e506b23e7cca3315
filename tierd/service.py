"""The daemon's use cases: what each verb does, on domain types, with no wire in sight.

A :class:`Service` is the one object a connection (or a test, or a tool) calls to act on the tiers.
Each use case takes domain values (a client id, a key, a version, a :class:`~tierd.entry.PutSpec`,
lease ids) and returns domain results (offsets, :class:`~tierd.protocol.Located` items, plain
dicts); errors are the typed ones of :mod:`tierd.errors`, raised. Turning a frame into a call and
a result or an error into a reply is :mod:`tierd.connection`'s job, and nothing here knows it.

Answered at once, or later: a use case that may wait (on a store, on room being made) returns its
result directly when it does not have to wait, and otherwise a coroutine that the caller awaits
(type :data:`Later`). The common case of a get (every version home) and of a put (room free) is
thus a plain call: no coroutine, no task, nothing allocated beyond the answer. Use cases that
always wait (evict, verify) are ``async def``. :func:`settle` awaits either kind.

Every use case runs on the daemon's event loop; a caller must not call one from another thread.
The pieces it drives are the entry table (:class:`~tierd.manager.Manager`), the moves between
tiers (:class:`~tierd.placement.Placement`) and the access log with its prefetcher
(:class:`~tierd.prefetch.Prefetcher`).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any, TypeAlias, TypeVar

from tierd.entry import ClientInfo, PutSpec
from tierd.errors import InvalidRequest, NotFound, ProtocolError, TierFull, Unsupported
from tierd.metrics import Latency, Metrics
from tierd.protocol import Located
from tierd.tiers.ram import ArenaError

if TYPE_CHECKING:
    from tierd.entry import Entry
    from tierd.manager import Manager
    from tierd.placement import Placement
    from tierd.prefetch import Prefetcher
    from tierd.share import Sharing
    from tierd.tiers.memory import MapHandle

log = logging.getLogger("tierd")
T = TypeVar("T")
#: a use case's answer: the result itself, or a coroutine that gives it once the wait is over
Later: TypeAlias = T | Coroutine[Any, Any, T]


async def settle(answer: Later[T]) -> T:
    """The result of a use case, awaited if it had to wait (for callers that do not mind waiting)."""
    if inspect.iscoroutine(answer):
        return await answer
    return answer  # type: ignore[return-value]


class Service:
    """put / seal / get / release / delete / evict / pin ... as calls on domain types."""

    def __init__(
        self,
        manager: Manager,
        placement: Placement,
        prefetcher: Prefetcher,
        *,
        describe: Callable[[], dict[str, Any]] = dict,
        sharing: Sharing | None = None,
    ) -> None:
        self.m = manager
        #: the remote tier's side (put share=True, gets of keys missing here); None without --remote
        self.sharing = sharing
        self.placement = placement
        self.prefetcher = prefetcher
        #: the daemon's counters (their owner: tierd.metrics)
        self.metrics: Metrics = manager.metrics
        #: the daemon's own part of status (its pid, version, socket, the last pressure reading)
        self._describe = describe
        self._record = prefetcher.record
        #: request latency by verb (connections observe it; status and the metrics read it)
        self.latency = Latency()
        #: the machine (tierd.hardware.report), filled in once at start; empty until then
        self.hardware: dict[str, Any] = {}

    # ---- clients -------------------------------------------------------------------------------
    def join(self, pid: int, uid: int, name: str) -> int:
        """A new client (after its HELLO was accepted); returns its client id."""
        return self.m.add_client(pid, uid, name)

    def client(self, cid: int) -> ClientInfo:
        """What the daemon keeps about a connected client (its connection counts requests in it)."""
        return self.m.clients[cid]

    def leave(self, cid: int) -> None:
        """A client is gone: its leases, unsealed puts and scope="client" entries end."""
        self.m.client_gone(cid)

    def gpu(self, uid: int) -> tuple[str, int, list[MapHandle], int] | None:
        """What a client of ``uid`` maps of the GPU tier: (backend, device index, every slab
        read-only, the event table's fd or -1); None without a GPU tier."""
        t = self.m.memory.get("gpu")
        if t is None:
            return None
        dev = t.device  # type: ignore[attr-defined]
        return dev.backend, dev.index, t.map_handles(uid), t.event_fd()  # type: ignore[attr-defined]

    def arenas(self, uid: int) -> list[MapHandle]:
        """What a client of ``uid`` maps: every space of the home tier, its own uid's writable."""
        try:
            return self.m.ram.map_handles(uid)
        except ArenaError as e:
            raise Unsupported(f"cannot serve uid {uid}: {e}") from None

    # ---- put -----------------------------------------------------------------------------------
    def put(self, cid: int, spec: PutSpec) -> Later[tuple[int, int]]:
        """Reserve a home-tier region for a new version; returns (put id, location): the region
        lies in the client's own uid's arena (:meth:`split` says which, for the client).

        At once when the tier has room under its ceiling; otherwise a coroutine that demotes cold
        entries to make it (TierFull when it cannot). Invalid specs raise before anything is taken.
        """
        m = self.m
        m.validate_put(spec)
        check_codec(spec)
        if spec.share and self.sharing is None:
            raise Unsupported(
                f"share=True needs a remote tier and this tierd runs without one (--remote); put "
                f"{spec.key!r} with share=False", key=spec.key,
            )  # fmt: skip
        old = m.entries.get(spec.key)
        if old is not None:
            m.guard(cid, old, "put a new version of")
        m.check_reservation(cid, spec.nbytes)
        offset = m.ram.allocate(spec.nbytes, owner=m.uid_of(cid))
        if offset is None:
            return self._put_after_room(cid, spec)
        put_id, offset = m.begin_put(cid, spec, offset)
        self.placement.poke()
        return put_id, offset

    async def _put_after_room(self, cid: int, spec: PutSpec) -> tuple[int, int]:
        offset = await self.placement.alloc(spec.key, spec.nbytes, owner=self.m.uid_of(cid))
        if cid not in self.m.clients:  # went while we made room
            self.m.ram.free(offset)
            raise ProtocolError("client gone")
        put_id, offset = self.m.begin_put(cid, spec, offset)
        self.placement.poke()
        return put_id, offset

    def split(self, location: int) -> tuple[int, int]:
        """(arena, offset in it) of a home-tier location: what a client is told."""
        return self.m.ram.split(location)

    def seal(self, cid: int, put_id: int, tier: str = "") -> Later[tuple[str, int]]:
        """Publish a written put as its key's current version; returns (key, version).

        Waits when the put's store codec is lossy (its home bytes become the decoded ones first),
        when it is durable (written through to the durable store first), and when it replaces a
        durable version (answered once that one's record cannot come back at a restart).
        ``tier`` ("gpu": a put of a CUDA tensor) also gives it a copy in that tier above home,
        when there is room there; when there is none it stays in RAM (the put does not fail).
        """
        e = self.m.writing(cid, put_id)
        if tier:
            self.upper_tier(tier)
            return self._seal_then_raise(cid, put_id, e, tier)
        if self.placement.may_be_lossy(e):
            return self._seal_lossy(cid, put_id, e)
        return self._seal(cid, put_id)

    async def _seal_then_raise(self, cid: int, put_id: int, e: Entry, tier: str) -> tuple[str, int]:
        if self.placement.may_be_lossy(e):
            sealed = await self._seal_lossy(cid, put_id, e)
        else:
            sealed = await settle(self._seal(cid, put_id))
        try:
            await self.placement.raise_to(e, tier)
        except TierFull as ex:  # no room up there now: the entry is in RAM, as a put of a CPU tensor
            log.debug("put %r stays in %s: %s", e.key, self.m.ram.name, ex)
        return sealed

    def upper_tier(self, tier: str) -> str:
        """``tier`` when reads may be served from it (the home tier or one above it, the GPU);
        Unsupported naming the tiers there are otherwise."""
        m = self.m
        if tier not in m.memory:
            have = ", ".join(m.memory)
            name = tier[:64]  # a client's string, echoed in the reply: bounded
            raise Unsupported(f"this tierd has no {name} tier (its memory tiers: {have})", tier=name)
        if m.rank[tier] > m.rank[m.ram.name]:
            raise Unsupported(f"reads are served from {m.ram.name} or a tier above it, not {tier}", tier=tier)
        return tier

    def _seal(self, cid: int, put_id: int) -> Later[tuple[str, int]]:
        m = self.m
        e = m.writing(cid, put_id)
        if e.share_first and not e.shared and self.sharing is not None:
            return self._seal_shared_first(cid, put_id, e)
        if e.durable:
            return self._seal_durable(cid, put_id, e)
        old = m.entries.get(e.key)
        old_on_disk = old is not None and old.durable and old.record is not None
        sealed = m.seal(cid, put_id)
        self._record(cid, e, "put", "-")
        self._maybe_share(e)
        if old_on_disk:
            return self._after_unpublish(sealed)  # the old durable copy must be gone first
        return sealed

    async def _seal_lossy(self, cid: int, put_id: int, e: Entry) -> tuple[str, int]:
        """A put whose store codec is lossy: its home bytes become the decoded ones first."""
        await self.placement.round_trip(e)
        return await settle(self._seal(cid, put_id))  # aborted meanwhile: InvalidRequest

    async def _seal_durable(self, cid: int, put_id: int, e: Entry) -> tuple[str, int]:
        sealed = await self.placement.seal_durable(cid, put_id)
        self._record(cid, e, "put", "-")
        self._maybe_share(e)
        return sealed

    async def _seal_shared_first(self, cid: int, put_id: int, e: Entry) -> tuple[str, int]:
        """durable="remote": the version goes to the remote tier first, then is sealed here; a
        remote failure (full: TierFull, down: StorageError) fails the SEAL and the client aborts."""
        assert self.sharing is not None
        await self.sharing.write_now(e)
        e.shared = True
        return await settle(self._seal(cid, put_id))  # aborted meanwhile: InvalidRequest

    def _maybe_share(self, e: Entry) -> None:
        """A version just sealed goes to the remote tier too when it is to be shared (background)."""
        sharing = self.sharing
        if sharing is not None and not e.shared and sharing.wants(e):
            sharing.share(e)

    async def _after_unpublish(self, result: T) -> T:
        await self.placement.settled()
        return result

    def abort(self, cid: int, put_id: int) -> None:
        """Drop a put that was not sealed: its region is freed, nobody ever saw it."""
        self.m.abort(cid, put_id)

    # ---- get / release -------------------------------------------------------------------------
    def get(self, cid: int, refs: list[tuple[str, int]], tier: str = "") -> Later[list[Located]]:
        """Lease every version asked for ((key, version); version 0 = the current one), or none
        when one is missing (NotFound). At once when all are in ``tier`` (home by default; "gpu":
        the GPU tier, Unsupported where there is none); otherwise a coroutine that promotes the
        others first (the wait is counted in ``stall_us``). With a remote tier, a key missing here
        is looked for there first (:meth:`tierd.share.Sharing.fetch`)."""
        m = self.m
        if tier:
            self.upper_tier(tier)
        try:
            found = [m.resolve(k, v) for k, v in refs]
        except NotFound:
            if self.sharing is None:
                raise
            return self._get_shared(cid, refs, tier)
        if self.placement.resident(found, tier):
            got = m.lease(cid, found, tier=tier)
            record = self._record
            served = tier or "ram"
            for e in found:
                record(cid, e, "get", served)
            return got
        return self._get_slow(cid, found, tier)

    async def _get_shared(self, cid: int, refs: list[tuple[str, int]], tier: str = "") -> list[Located]:
        """A get naming a key missing here: fetch what the remote tier has, then get as usual."""
        sharing = self.sharing
        assert sharing is not None
        missing = {k for k, v in refs if v == 0 and k not in self.m.entries}
        # in parallel (each fetch reads its chunks in parallel too); None: absent there as well,
        # and resolve below says NotFound
        await asyncio.gather(*(sharing.fetch(k) for k in sorted(missing)))
        found = [self.m.resolve(k, v) for k, v in refs]
        return await self._get_slow(cid, found, tier)

    async def _get_slow(self, cid: int, found: list[Entry], tier: str = "") -> list[Located]:
        tiers = [e.tiers[0] for e in found]
        t0 = time.perf_counter()
        got = await self.placement.get(cid, found, tier)
        self.metrics.stall_us += int((time.perf_counter() - t0) * 1e6)
        record = self._record
        for e, tier in zip(found, tiers, strict=True):
            record(cid, e, "get", tier)
        return got

    def release(self, cid: int, lease_ids: list[int]) -> int:
        """End leases of this client; returns how many ids were not its leases (they are ignored)."""
        bad = self.m.release(cid, lease_ids)
        if bad:
            log.debug("client %d released %d lease ids it did not hold", cid, bad)
        return bad

    # ---- delete / evict / pin ------------------------------------------------------------------
    def delete(self, cid: int, key: str) -> Later[None]:
        """Hide the key's current version (readers keep it until they release). Waits, for a
        durable one, until its record is unpublished: a restart cannot bring it back."""
        e = self.m.resolve(key)
        self.m.guard(cid, e, "delete")
        on_disk = e.durable and e.record is not None
        self.m.delete(key)
        if on_disk:
            return self._after_unpublish(None)
        return None

    async def evict(self, cid: int, key: str) -> dict[str, Any]:
        """Push an entry's bytes down out of every memory tier (``tierctl evict``)."""
        self.m.guard(cid, self.m.resolve(key), "evict")
        return await self.placement.evict(key)

    async def verify(self, prefix: str = "") -> list[dict[str, Any]]:
        """Check the checksums of every stored copy of the entries under ``prefix``."""
        return await self.placement.verify(prefix)

    def pin(self, cid: int, key: str, tier: str = "ram") -> Later[None]:
        """Hold the key's current version in memory tier ``tier``. Home (ram) or a tier above it
        (gpu): brought there first when it is not; a lower memory tier: it must be there already."""
        e = self.m.resolve(key)
        self.m.guard(cid, e, "pin")
        m = self.m
        if tier in m.memory and tier not in e.where and m.rank[tier] <= m.rank[m.ram.name]:
            return self._pin_after_raise(e, key, tier)
        self.m.pin(key, tier)
        return None

    async def _pin_after_raise(self, e: Entry, key: str, tier: str) -> None:
        with self.m.protected(e):
            await self.placement.raise_to(e, tier)
            self.m.pin(key, tier)

    def unpin(self, cid: int, key: str) -> bool:
        """Let the version go again; returns whether it was pinned."""
        self.m.guard(cid, self.m.resolve(key), "unpin")
        return self.m.unpin(key)

    # ---- inspection and hints ------------------------------------------------------------------
    def ls(self, prefix: str = "", after: str = "", limit: int = 0) -> list[dict[str, Any]]:
        """One page of entries in key order (see Manager.ls)."""
        return self.m.ls(prefix, after, limit)

    async def ls_remote(self, prefix: str = "", after: str = "", limit: int = 0) -> list[dict[str, Any]]:
        """One page of the entries the remote tier holds (``ls --remote``)."""
        if self.sharing is None:
            raise Unsupported("this tierd runs without a remote tier (--remote): there is nothing to list")
        return await self.sharing.ls(prefix, after, limit)

    def stat(self, key: str) -> dict[str, Any]:
        return self.m.stat(key)

    def why(self, key: str) -> dict[str, Any]:
        """Where ``key``'s current version is and why (see :mod:`tierd.why`); NotFound if absent."""
        from tierd.why import explain

        return explain(self.m, self.placement, self.prefetcher, key)

    def status(self) -> dict[str, Any]:
        """Tiers, clients, leases, counters, then the daemon's own part, prefetch and placement."""
        s = self.m.status()
        s["client_list"] = self.m.client_list()
        s.update(self._describe())
        pl = self.placement
        calib = pl.calibration
        s["prefetch"] = self.prefetcher.status()
        s["remote"] = self.sharing.status() if self.sharing is not None else None
        s["eviction"] = self.m.policy.stats()
        s["placement"] = {
            "policy": self.m.policy.name,
            "ram_high_watermark": pl.high,
            "ram_low_watermark": pl.low,
            "ram_ceiling_bytes": pl.ram.ceiling,
            "tag_codecs": pl.tag_codecs,
            "calibration": calib.to_dict() if calib is not None else None,
        }
        s["latency"] = self.latency.snapshot()
        s["hardware"] = self.hardware
        return s

    def prefetch(self, cid: int, keys: list[str]) -> int:
        """Hints: load these keys home soon, in this order; returns how many are known entries."""
        self.m.prefetch_hint(keys)
        return self.prefetcher.hint(cid, keys)

    def trace(self, since: float = -1.0, limit: int = 100_000) -> dict[str, Any]:
        """The access log after ``since`` (at most ``limit`` rows) and the log's clock now."""
        from tierd.predict.log import to_row

        pf = self.prefetcher
        accesses = pf.log.since(since)[: max(0, limit)]
        return {"now": pf.log_time(), "accesses": [to_row(a) for a in accesses]}


def check_codec(spec: PutSpec) -> None:
    """An explicit codec must suit the tensor (int8 needs floats, ...): refused at put time."""
    if spec.codec in (None, "auto"):
        return
    from tierd.codecs import get_codec

    why = get_codec(spec.codec).why_not(spec.dtype, list(spec.shape))
    if why is not None:
        raise InvalidRequest(f"codec {spec.codec!r} cannot store {spec.dtype}{list(spec.shape)}: {why}",
                             codec=spec.codec)  # fmt: skip
