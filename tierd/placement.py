"""Placement: which tiers hold an entry's bytes, and when they move.

The tiers are one ordered list, fastest first, built from the configuration (``tiers``); the first
is the home tier (RAM): puts are written there and gets are served from there. Bytes move between
tiers only by the one two-step move of :mod:`tierd.moves` (protect, copy, publish)::

    tiers:     [gpu]  <-->  ram  <-->  (more memory tiers)  <-->  disk (a chunk store)
    promote:   a get or prefetch of a version not home copies it home from the fastest tier that
               holds it; the lower copy stays (inclusive caching). A get (or pin) naming a tier
               above home (the GPU) brings it home first, then copies it up from there
    demote:    room needed in a memory tier (a put, a promotion, the watermark, memory pressure,
               tierctl evict): its coldest unheld version gets a copy in the next tier down unless
               it has a lower copy already, then its copy here is dropped

Victims are taken in the order of the tier's eviction policy (:mod:`tierd.policy`, ``--eviction``;
``auto`` by default, S3-FIFO until evidence); among the first few one that already has a lower copy
is preferred, since dropping it costs no copy. A version is held in
a memory tier (not a victim there) while it is leased there, pinned there or moving.
Concurrent gets of one version share one promotion; concurrent moves into a tier share one copy.

Every allocation in a memory tier goes through :meth:`Placement.alloc` or straight to the tier's
``allocate``; both keep the tier under its pressure ceiling (the tier enforces it). A demand
request may pass the ceiling only when nothing can be demoted.

Durable puts are written through: SEAL of a durable put stores the bytes (fsynced) in the durable
chunk store before the version is published and before the client is answered.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from typing import Any

from tierd.entry import SEALED, WRITING, Entry
from tierd.errors import InvalidRequest, NotFound, StorageError, TierFull, Unsupported
from tierd.manager import Manager
from tierd.moves import Mover
from tierd.protocol import Located
from tierd.tiers.base import Tier

log = logging.getLogger("tierd.placement")
#: how many of the coldest entries to look through for one that already has a lower copy
CLEAN_LOOKAHEAD = 16


class Placement:
    def __init__(
        self,
        manager: Manager,
        *,
        high: float = 0.90,
        low: float = 0.75,
        tag_codecs: dict[str, str] | None = None,
        cores: int | None = None,
    ) -> None:
        self.m = manager
        self.ram = manager.ram
        self.home = manager.ram.name
        self.stores = manager.stores
        names = list(manager.tiers)
        #: the next tier down from each tier (None for the last)
        self.below: dict[str, Tier | None] = {
            n: manager.tiers[names[i + 1]] if i + 1 < len(names) else None for i, n in enumerate(names)
        }
        self.high, self.low = high, low
        self.moves = Mover(manager, tag_codecs=dict(tag_codecs or {}), cores=cores or os.cpu_count() or 1)
        self.io = self.moves.io
        self._loads = self.moves.inflight[self.home]
        self._tasks: set[asyncio.Task[Any]] = set()
        self._store_ops: set[asyncio.Task[Any]] = set()  # unpublish / delete in flight
        self._wake = asyncio.Event()
        manager.on_hide = self._on_hide
        manager.on_free = self._on_free

    @property
    def tag_codecs(self) -> dict[str, str]:
        return self.moves.tag_codecs

    @tag_codecs.setter
    def tag_codecs(self, rules: dict[str, str]) -> None:
        """New tag rules (a reload) for copies written from now on; stored copies keep their codec.
        The dict is replaced, not changed, so a codec choice running in a thread sees one or the other."""
        self.moves.tag_codecs = dict(rules)

    def set_watermarks(self, high: float, low: float) -> None:
        """New watermarks (a reload; 0 < low <= high <= 1, checked by the config): the balancer
        looks at once, so a lower high watermark demotes right away."""
        self.high, self.low = high, low
        self.poke()

    @property
    def calibration(self) -> Any:
        return self.moves.calibration

    @calibration.setter
    def calibration(self, calib: Any) -> None:
        self.moves.calibration = calib

    # ---- start / stop --------------------------------------------------------------------------
    def restore(self) -> int:
        """Index the durable entries found in the durable store (at start, before serving)."""
        store = self.m.durable_store
        if store is None:
            return 0
        records = store.load_index(keep=lambda r: r.durable and r.scope == "shared")
        now = self.m.clock()
        mono = self.m.mono()
        daemon_uid = os.getuid()
        entries = [
            Entry(key=r.key, version=r.version, dtype=r.dtype, shape=list(r.shape), nbytes=r.nbytes,
                  where={store.name: r}, tags=list(r.tags), durable=True, ttl=r.ttl, scope=r.scope,
                  owner=0, uid=r.uid if r.uid >= 0 else daemon_uid, created=r.created,
                  last_access=now, last_access_mono=mono, state=SEALED,
                  codec=r.codec)
            for r in records
        ]  # fmt: skip
        self.m.restore(entries)
        return len(entries)

    async def close(self, timeout: float = 30.0) -> None:
        """Finish the store changes already promised (unpublish, delete), then stop the threads."""
        if self._store_ops:
            _done, pending = await asyncio.wait(list(self._store_ops), timeout=timeout)
            if pending:
                log.warning("%d store operations did not finish at shutdown", len(pending))
        for t in list(self._tasks):
            t.cancel()
        await self.moves.drain()
        self.moves.close()

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        t = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)
        return t

    def _store_op(self, coro: Any) -> asyncio.Task[Any]:
        t = self._spawn(coro)
        self._store_ops.add(t)
        t.add_done_callback(self._store_ops.discard)
        return t

    # ---- get -----------------------------------------------------------------------------------
    def resident(self, entries: list[Entry], tier: str = "") -> bool:
        tier = tier or self.home
        loads = self.moves.inflight[tier]
        return all(tier in e.where and e.version not in loads for e in entries)

    def loading(self, e: Entry) -> bool:
        """Whether a copy of ``e`` into the home tier is in flight (a get's or a prefetch's)."""
        return e.version in self._loads

    async def get(self, cid: int, found: list[Entry], tier: str = "") -> list[Located]:
        """Promote what is not in ``tier`` (home by default; each version once), then lease all of
        ``found`` there."""
        tier = tier or self.home
        missing = list({e.version: e for e in found if tier not in e.where}.values())
        with self.m.protected(*found):
            for e in missing:
                await self.raise_to(e, tier)
            return self.m.lease(cid, found, loaded=len(missing), tier=tier)

    async def raise_to(self, e: Entry, tier: str) -> None:
        """Give ``e`` a copy in memory tier ``tier``: home (:meth:`load`), or a tier above home
        (the GPU), copied up from home after bringing it home."""
        if tier == self.home or tier in e.where:
            await self.load(e)
            return
        if self.m.rank[tier] > self.m.rank[self.home]:
            raise Unsupported(f"reads are served from {self.home} or a tier above it, not from {tier}")
        with self.m.protected(e):
            await self.load(e)
            if await self.moves.copy(e, self.home, tier, self._room):
                self.m.metrics.gpu_promotions += 1
                self._wake.set()

    async def load(self, e: Entry, for_prefetch: bool = False, predicted: bool = False) -> None:
        """Promote one version home from the fastest tier holding it (``for_prefetch``: ahead of a
        read, for a client's hint, or ``predicted`` too: on a predictor's guess, which never takes
        the room of a hinted or prefetched entry not read yet)."""
        home = self.home
        if home in e.where:
            return
        src = next(iter(e.where), None)  # the fastest tier holding it (protected while it moves)
        if src is None:
            raise NotFound(f"{e.key!r} v{e.version} has no bytes in any tier", key=e.key)
        room = self._room_predicted if predicted else self._room
        if await self.moves.copy(e, src, home, room, for_prefetch or predicted):
            self.m.metrics.promotions += 1
            self.m.metrics.promoted_bytes += e.nbytes
            if for_prefetch or predicted:
                self.m.mark_prefetched(e, hinted=not predicted)
            elif src in self.stores:
                self.m.metrics.reads_disk += 1
            self._wake.set()

    # ---- room ----------------------------------------------------------------------------------
    def _has_lower_copy(self, e: Entry, tier: str) -> bool:
        rank = self.m.rank
        return rank[next(reversed(e.where))] > rank[tier]

    def _evictable(self, e: Entry, tier: str) -> bool:
        """Whether ``e``'s copy in memory tier ``tier`` may go now (a tier below can take it)."""
        return (
            tier in e.where and e.state == SEALED and e.protect == 0 and tier not in e.pins
            and not e.held.get(tier) and self.below[tier] is not None
        )  # fmt: skip

    def kept_because(self, e: Entry, tier: str) -> str | None:
        """Why ``e``'s copy in memory tier ``tier`` is not demoted now, or None when it is the kind
        the balancer takes (``tierctl why``; the same rules as :meth:`_evictable` and :meth:`victim`)."""
        if tier not in e.where:
            return f"not in {tier}"
        if e.state != SEALED:
            return f"not sealed ({e.state})"
        if e.protect:
            return "a move of it is in flight"
        if tier in e.pins:
            return f"pinned in {tier}"
        if e.held.get(tier):
            return f"leased ({e.held[tier]})"
        if self.below[tier] is None:
            return f"no tier below {tier}"
        if tier == self.home and e.prefetched:
            return (
                "prefetched and not read yet (taken for a demand read, or under memory pressure: "
                "a hinted one only when critical)"
            )
        return None

    def victim(
        self,
        take_prefetched: bool = True,
        tier: str | None = None,
        uid: int | None = None,
        *,
        spare_hinted: bool = False,
        take_predicted: bool = False,
    ) -> Entry | None:
        """The entry to demote next from ``tier`` (home by default): coldest first, one with a
        lower copy among the coldest few preferred.

        Home entries prefetched and not read yet are kept (they were hinted or predicted sooner
        than anything a prefetch or the watermark balancer now wants); a demand read or memory
        pressure may still take them (``take_prefetched``), but only when nothing else is left, and
        the predicted ones before the hinted ones. ``take_predicted`` (a hint's load): of those,
        only the predicted ones. ``spare_hinted`` (a prediction's load): entries a client hinted
        and has not read stay too, even when they were in RAM already. ``uid``: only that uid's
        entries (its quota is full).
        """
        tier = tier or self.home
        found = self._coldest(tier, uid, spare_hinted)
        if found is None and (take_prefetched or take_predicted) and tier == self.home:
            # Of the unread prefetches, the one loaded last: predictions and hints are issued in
            # the order they will be read, so it is needed last (the coldest would be needed next).
            # By the load's sequence number, not the policy's order: that is load order only for LRU.
            unread = sorted(
                (
                    e
                    for e in self.m.policies[tier].candidates()
                    if e.prefetched and self._evictable(e, tier) and uid in (None, e.uid)
                ),
                key=lambda e: e.loaded_seq,
                reverse=True,
            )
            found = next((e for e in unread if not e.hinted), None)
            if found is None and take_prefetched:
                found = next(iter(unread), None)
        return found

    def _coldest(self, tier: str, uid: int | None = None, spare_hinted: bool = False) -> Entry | None:
        """The coldest evictable entry that is not an unread prefetch (one with a lower copy
        preferred), of ``uid`` only when given; not one hinted and unread when ``spare_hinted``."""
        first = None
        home = tier == self.home
        for i, e in enumerate(self.m.policies[tier].candidates()):
            if not self._evictable(e, tier) or (home and e.prefetched) or uid not in (None, e.uid):
                continue
            if home and spare_hinted and e.hinted:
                continue
            if self._has_lower_copy(e, tier):
                return e
            if first is None:
                first = e
            if i >= CLEAN_LOOKAHEAD:
                break
        return first

    async def alloc(
        self,
        key: str,
        nbytes: int,
        for_prefetch: bool = False,
        *,
        tier: str | None = None,
        owner: int,
        predicted: bool = False,
    ) -> int:
        """A region for ``nbytes`` in memory tier ``tier`` (home by default) that uid ``owner`` may
        write, demoting cold entries to make room; TierFull if impossible.

        When the owner's quota is what refuses it, only the owner's own entries are demoted: one uid
        cannot push another's entries out by filling its own quota.

        A demand request (not ``for_prefetch``) never fails while speculative work holds the room:
        it takes unread prefetches when nothing else can go (see :meth:`victim`), and while
        prefetches are still being copied in it waits for one to land and takes it
        (``prefetch_taken`` and ``demand_waits_for_prefetch`` count both). A prefetch never waits: it
        is dropped. A hint's prefetch may take the room of predicted ones not read yet; a
        ``predicted`` one takes neither theirs nor that of entries hinted and not read yet.
        """
        name = tier or self.home
        t = self.m.memory[name]
        size = t.region_bytes(nbytes)
        if size > t.quota_bytes(owner):
            why = f"more than uid {owner}'s quota" if size <= t.capacity_bytes else ""
            raise self.m.tier_full(name, key, nbytes, why)
        over_ceiling = False  # a demand allocation may pass the ceiling when nothing can go
        while True:
            offset = t.allocate(nbytes, over_ceiling=over_ceiling, owner=owner)
            if offset is not None:
                return offset
            quota = t.over_quota(owner, nbytes)
            e = self.victim(
                take_prefetched=not for_prefetch, tier=name, uid=owner if quota else None,
                spare_hinted=predicted, take_predicted=for_prefetch and not predicted,
            )  # fmt: skip
            if e is None:
                if quota:
                    raise self.m.tier_full(
                        name, key, nbytes, f"uid {owner} holds its quota of {t.quota_bytes(owner)} bytes "
                        "in leased, pinned or moving entries", count=not for_prefetch,
                    )  # fmt: skip
                if not over_ceiling and not for_prefetch and t.used_bytes + size > t.ceiling:
                    over_ceiling = True
                    continue
                copies = self.moves.device_copies
                if copies and not t.host_visible:
                    # entries whose device copy is still landing are protected until it has: once
                    # one has, it may be the victim
                    await asyncio.wait(list(copies), return_when=asyncio.FIRST_COMPLETED)
                    continue
                speculative = self.moves.speculative[name]
                if speculative and not for_prefetch:
                    # the room is held by prefetches still being read: once one lands it is an
                    # unread prefetch, which a demand request may take (the victim above)
                    self.m.metrics.demand_waits_for_prefetch += 1
                    await asyncio.wait(list(speculative.values()), return_when=asyncio.FIRST_COMPLETED)
                    continue
                why = f"every entry in {name} is leased, pinned or moving" if self.below[name] else ""
                # a prefetch that finds no room is dropped (counted as such), not a refused request
                raise self.m.tier_full(name, key, nbytes, why, count=not for_prefetch)
            if e.prefetched and not for_prefetch:
                self.m.metrics.prefetch_taken += 1  # a demand request takes a prefetch's room
            await self.demote(e, name)

    def _room(self, tier: str, key: str, nbytes: int, for_prefetch: bool, owner: int) -> Any:
        return self.alloc(key, nbytes, for_prefetch, tier=tier, owner=owner)

    def _room_predicted(self, tier: str, key: str, nbytes: int, for_prefetch: bool, owner: int) -> Any:
        return self.alloc(key, nbytes, for_prefetch, tier=tier, owner=owner, predicted=True)

    # ---- memory pressure -----------------------------------------------------------------------
    def held_bytes(self, *, hinted: bool = False) -> int:
        """Bytes of the home tier that cannot leave it now: leased, pinned or being written; with
        ``hinted``, also the window clients ask for: the entries hinted and not read yet (in RAM,
        or prefetches on their way in, a hint's or a prediction's: the copy cannot tell them
        apart), or, when more, what the clients' last hints named (loaded or not: a prefetch
        that found no room under the ceiling is dropped, and its window would go unseen)."""
        home, size = self.home, self.ram.region_bytes
        held = unread = 0
        for e in self.m.versions.values():
            if home in e.where:
                if e.state != SEALED or e.held.get(home) or e.pins:
                    held += size(e.nbytes)
                elif hinted and e.hinted:
                    unread += size(e.nbytes)
        if not hinted:
            return held
        versions = self.m.versions
        unread += sum(size(versions[v].nbytes) for v in self.moves.speculative[home] if v in versions)
        return held + max(unread, sum(c.hint_bytes for c in self.m.clients.values()))

    def lower_ceiling(self, target: int, *, floor: int = 0) -> int:
        """Hold the home tier at ``target`` bytes or below while memory is short; returns the ceiling.

        Lowering alone would only demote entries that the next reads promote again, into pages
        faulted back in: the daemon would give memory back and take it again within a second. So
        allocations stay under the ceiling (the tier refuses them), and while it is below capacity
        freed regions return their pages to the kernel at once. Leased and pinned bytes cannot go,
        so the ceiling never drops below them, nor below ``floor`` (pressure that is not yet
        critical keeps the window the clients use, see ``tierd.pressure``).
        """
        held = max(self.held_bytes(), min(int(floor), self.ram.capacity_bytes))
        self.ram.ceiling = max(min(self.ram.ceiling, int(target)), held, 0)
        return self.ram.ceiling

    def raise_ceiling(self, step: int) -> int:
        """Pressure has eased: let the tier grow back by ``step`` bytes (up to its capacity)."""
        self.ram.ceiling = min(self.ram.capacity_bytes, self.ram.ceiling + max(0, int(step)))
        return self.ram.ceiling

    async def demote(self, e: Entry, tier: str | None = None) -> bool:
        """Make sure ``e`` has a copy below ``tier`` (home by default), then drop its copy there if
        nothing holds it; True when it was dropped."""
        name = tier or self.home
        below = self.below[name]
        if name not in e.where or below is None:
            return False
        if not self._has_lower_copy(e, name):
            await self.moves.copy(e, name, below.name, self._room)
        if self._evictable(e, name) and self._has_lower_copy(e, name):
            self.m.drop(e, name)
            self.m.metrics.demotions += 1
            self.m.metrics.demoted_bytes += e.nbytes
            return True
        return False

    async def store(self, e: Entry) -> None:
        """Write a copy of ``e`` into the durable store (from its home bytes); shared by callers."""
        store = self.m.durable_store
        if store is None:
            raise Unsupported("this tierd has no disk tier (disk_bytes=0)")
        await self.moves.copy(e, self.home, store.name, self._room)

    # ---- lossy codecs --------------------------------------------------------------------------
    def may_be_lossy(self, e: Entry) -> bool:
        return self.moves.may_be_lossy(e)

    async def round_trip(self, e: Entry) -> None:
        await self.moves.round_trip(e)

    # ---- durable put, delete, evict ------------------------------------------------------------
    async def seal_durable(self, cid: int, put_id: int) -> tuple[str, int]:
        """Write a durable put through to the durable store, then publish it."""
        e = self.m.writing(cid, put_id)
        await self.store(e)
        if e.state != WRITING or cid not in self.m.clients:
            raise InvalidRequest(f"put {put_id} was aborted while it was being written", put_id=put_id)
        key, version = self.m.seal(cid, put_id)
        await self.settled()
        return key, version

    async def settled(self) -> None:
        """Wait until every pending unpublish / delete is committed (replies that promise it)."""
        pending = list(self._store_ops)
        if pending:
            await asyncio.gather(*(asyncio.shield(p) for p in pending), return_exceptions=True)

    async def evict(self, key: str) -> dict[str, Any]:
        """Push an entry's bytes down out of every memory tier (tierctl evict)."""
        e = self.m.resolve(key)
        if not self.stores:
            raise Unsupported("this tierd has no disk tier (disk_bytes=0): nowhere to evict to")
        if e.leases:
            raise InvalidRequest(
                f"{key!r} is leased by {e.leases} reader(s): it stays in "
                f"{', '.join(t for t in e.held if e.held[t])} until released", leases=e.leases,
            )  # fmt: skip
        if e.pins:
            raise InvalidRequest(f"{key!r} is pinned in {sorted(e.pins)}: unpin it first")
        moved = False
        while True:
            top = next((n for n in e.where if n in self.m.memory), None)
            if top is None or not await self.demote(e, top):
                break
            moved = True
        return {"evicted": key, "moved": moved, "tiers": e.tiers}

    async def verify(self, prefix: str = "") -> list[dict[str, Any]]:
        """Read every stored copy (durable ones first) and check its checksums."""
        loop = asyncio.get_running_loop()
        out = []
        todo = [e for e in list(self.m.entries.values()) if e.key.startswith(prefix) and e.record is not None]
        todo.sort(key=lambda e: (not e.durable, e.key))
        for e in todo:
            name, rec = next(((n, loc) for n, loc in e.where.items() if n in self.stores), (None, None))
            if name is None or rec is None:
                continue
            with self.m.protected(e):
                why = await loop.run_in_executor(self.moves.reader, self.stores[name].verify, rec)
            out.append(
                {
                    "key": e.key,
                    "version": e.version,
                    "durable": e.durable,
                    "ok": why is None,
                    "error": why,
                    "chunks": len(rec.chunks),
                    "stored_bytes": rec.stored_bytes,
                }
            )
        return out

    # ---- manager hooks -------------------------------------------------------------------------
    def _on_hide(self, e: Entry) -> None:
        """A version left the key index: its records must not come back at a restart."""
        for name, rec in e.where.items():
            if name in self.stores:
                self._store_op(self._in_writer(self.stores[name].unpublish, rec))

    def _on_free(self, e: Entry) -> None:
        """A version is gone for good: delete its records."""
        for name in [n for n in e.where if n in self.stores]:
            self._store_op(self._in_writer(self.stores[name].delete, e.where.pop(name)))

    async def _in_writer(self, fn: Any, rec: Any) -> None:
        await asyncio.get_running_loop().run_in_executor(self.moves.writer, fn, rec)

    # ---- background balance --------------------------------------------------------------------
    def poke(self) -> None:
        """Something grew: let the balancer check the watermarks."""
        self._wake.set()

    async def balance_once(
        self,
        target_used: int | None = None,
        take_prefetched: bool = False,
        *,
        tier: str | None = None,
        take_predicted: bool = False,
    ) -> int:
        """Demote coldest first until ``tier`` (home by default) uses ``target_used`` bytes (default:
        the low watermark of its ceiling).

        Prefetched entries not read yet are left alone unless ``take_prefetched`` (critical memory
        pressure): they are about to be read, and demoting them would only read them again.
        ``take_predicted`` (pressure below critical): the predicted ones may go, the hinted stay.
        """
        name = tier or self.home
        t = self.m.memory[name]
        if self.below[name] is None:
            return 0
        target = int(t.ceiling * self.low) if target_used is None else target_used
        freed = 0
        while t.used_bytes > target:
            e = self.victim(take_prefetched, tier=name, take_predicted=take_predicted)
            if e is None:
                break
            before = t.used_bytes
            try:
                await self.demote(e, name)
            except (TierFull, StorageError) as ex:  # the tier below is full or failing: try later
                log.warning("cannot demote from %s: %s", name, ex)
                break
            freed += max(0, before - t.used_bytes)
        return freed

    async def balancer(self) -> None:
        """Keep each memory tier under its high watermark, demoting down to the low one.

        A round that ends still above the high watermark (the tier below full or failing, every
        entry held) is tried again after a back-off of 1 s doubling to 30 s, as well as on the next
        poke: when space comes back, demotion resumes without waiting for a put.
        """
        retry: float | None = None
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), retry)
            self._wake.clear()
            stuck = False
            for name, t in self.m.memory.items():
                if t.used_bytes > t.ceiling * self.high:
                    freed = await self.balance_once(tier=name)
                    log.debug("watermark: demoted %d bytes from %s", freed, name)
                    stuck |= t.used_bytes > t.ceiling * self.high
            retry = min(30.0, 2 * retry if retry else 1.0) if stuck else None
