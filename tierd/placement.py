"""Placement: which tier holds an entry's bytes, and the moves between tiers.

Every move is two steps with the version protected in between (``protect``), so that eviction,
freeing and a second mover cannot race it::

    promote (get of an entry not in RAM)      demote (room needed, watermark, evict, pressure)
    ------------------------------------      ------------------------------------------------
    protect; alloc a region (making room)     protect; if no clean disk copy: encode + write it
    read chunks + checksums -> region         (store); then, if still unleased, unpinned and
      (executor threads, loop keeps serving)    unprotected: free the RAM region
    publish offset; lease; unprotect          unprotect

Concurrent gets of the same entry share one load; concurrent stores of one version share one
write. All LMDB, codec and copy work runs in executors: ``io`` (one thread per core) encodes,
decodes and copies chunks; ``writer`` (one thread) is LMDB's single writer; ``reader`` drives reads.

Caching is inclusive: a promoted entry keeps its disk copy, so demoting it again only frees RAM.
Victims are taken coldest first from the eviction policy (LRU); among the coldest few, one that
already has a clean disk copy is preferred, since dropping it costs no write.

Durable puts are written through: SEAL of a durable put stores the bytes (fsynced) before the
version is published and before the client is answered.
"""

from __future__ import annotations

import asyncio
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from tierd.errors import InvalidRequest, NotFound, TierFull, Unsupported
from tierd.manager import ABORTED, SEALED, WRITING, Entry, Manager
from tierd.protocol import Located
from tierd.tiers.disk import CHUNK_BYTES, DiskTier, RecordMeta

log = logging.getLogger("tierd.placement")
#: how many of the coldest entries to look through for one that is already clean on disk
CLEAN_LOOKAHEAD = 16


class Placement:
    def __init__(
        self,
        manager: Manager,
        disk: DiskTier | None,
        *,
        high: float = 0.90,
        low: float = 0.75,
        tag_codecs: dict[str, str] | None = None,
        cores: int | None = None,
    ) -> None:
        self.m = manager
        self.ram = manager.ram
        self.disk = disk
        self.high, self.low = high, low
        self.tag_codecs = dict(tag_codecs or {})
        self.cores = cores or os.cpu_count() or 1
        self.calibration: Any = None  # set once the start-up calibration has run
        self.io = ThreadPoolExecutor(self.cores, thread_name_prefix="tierd-io")
        self.writer = ThreadPoolExecutor(1, thread_name_prefix="tierd-disk-w")
        self.reader = ThreadPoolExecutor(2, thread_name_prefix="tierd-disk-r")
        self._loads: dict[int, asyncio.Future[None]] = {}
        self._stores: dict[int, asyncio.Future[None]] = {}
        self._unpublish: dict[int, asyncio.Future[None]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._disk_ops: set[asyncio.Task[Any]] = set()  # unpublish / delete in flight
        self._wake = asyncio.Event()
        manager.on_hide = self._on_hide
        manager.on_free = self._on_free

    # ---- start / stop --------------------------------------------------------------------------
    def restore(self) -> int:
        """Index the durable entries found on disk (at start, before serving)."""
        if self.disk is None:
            return 0
        records = self.disk.load_index(keep=lambda r: r.durable and r.scope == "shared")
        now = self.m._clock()
        mono = self.m._mono()
        entries = [
            Entry(key=r.key, version=r.version, dtype=r.dtype, shape=list(r.shape), nbytes=r.nbytes,
                  offset=None, tags=list(r.tags), durable=True, ttl=r.ttl, scope=r.scope, owner=0,
                  created=r.created, last_access=now, last_access_mono=mono, state=SEALED, disk=r,
                  codec=r.codec)
            for r in records
        ]  # fmt: skip
        self.m.restore(entries)
        return len(entries)

    async def close(self, timeout: float = 30.0) -> None:
        """Finish the disk changes already promised (unpublish, delete), then stop the threads."""
        if self._disk_ops:
            _done, pending = await asyncio.wait(list(self._disk_ops), timeout=timeout)
            if pending:
                log.warning("%d disk operations did not finish at shutdown", len(pending))
        for t in list(self._tasks):
            t.cancel()
        for ex in (self.reader, self.writer, self.io):
            ex.shutdown(wait=True, cancel_futures=False)

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        t = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)
        return t

    def _disk_op(self, coro: Any) -> asyncio.Task[Any]:
        t = self._spawn(coro)
        self._disk_ops.add(t)
        t.add_done_callback(self._disk_ops.discard)
        return t

    # ---- get -----------------------------------------------------------------------------------
    def resident(self, entries: list[Entry]) -> bool:
        return all(e.offset is not None and e.version not in self._loads for e in entries)

    async def get(self, cid: int, found: list[Entry]) -> list[Located]:
        """Load what is not in RAM (each version once), then lease all of ``found``."""
        missing = list({e.version: e for e in found if e.offset is None}.values())
        for e in found:
            e.protect += 1
        try:
            for e in missing:
                await self.load(e)
            return self.m.lease(cid, found, loaded=len(missing))
        finally:
            for e in found:
                self.m.unprotect(e)

    async def load(self, e: Entry, for_prefetch: bool = False) -> None:
        """Promote one version into RAM from its disk copy (``for_prefetch``: on a prediction)."""
        pending = self._loads.get(e.version)
        if pending is not None:
            await asyncio.shield(pending)
            return
        if e.offset is not None:
            return
        if e.disk is None or self.disk is None:
            raise NotFound(f"{e.key!r} v{e.version} has no bytes in any tier", key=e.key)
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        self._loads[e.version] = fut
        e.protect += 1
        try:
            offset = await self.alloc(e.key, e.nbytes, for_prefetch)
            try:
                view = self.ram.view(offset, e.nbytes)
                await loop.run_in_executor(self.reader, self.disk.read_into, e.disk, view, self.io)
            except BaseException:
                self.ram.free(offset)
                raise
            e.offset = offset
            self.m.policy.on_put(e.version, e)
            self.m.counters["promotions"] += 1
            if for_prefetch:
                self.m.mark_prefetched(e)
            else:
                self.m.counters["reads_disk"] += 1
            fut.set_result(None)
        except BaseException as ex:
            fut.set_exception(ex)
            fut.exception()  # retrieved: the sharers re-raise it themselves
            raise
        finally:
            del self._loads[e.version]
            self.m.unprotect(e)
        self._wake.set()

    # ---- room ----------------------------------------------------------------------------------
    def _evictable(self, e: Entry) -> bool:
        return (
            e.offset is not None and e.state == SEALED and e.leases == 0 and not e.pins and e.protect == 0
            and (e.disk is not None or self.disk is not None)
        )  # fmt: skip

    def victim(self, take_prefetched: bool = True) -> Entry | None:
        """The entry to demote next: coldest first, a clean one among the coldest few preferred.

        Entries prefetched and not read yet are kept (they were predicted sooner than anything a
        prefetch or the watermark balancer now wants); a demand read or memory pressure may still
        take them (``take_prefetched``), but only when nothing else is left.
        """
        found = self._coldest()
        if found is None and take_prefetched:
            # Of the unread prefetches, the one loaded last: predictions and hints are issued in
            # the order they will be read, so it is needed last (the coldest would be needed next).
            found = next(
                (
                    e
                    for e in reversed(list(self.m.policy.candidates()))
                    if e.prefetched and self._evictable(e)
                ),
                None,
            )
        return found

    def _coldest(self) -> Entry | None:
        """The coldest evictable entry that is not an unread prefetch (a clean one preferred)."""
        first = None
        for i, e in enumerate(self.m.policy.candidates()):
            if not self._evictable(e) or e.prefetched:
                continue
            if e.disk is not None:
                return e
            if first is None:
                first = e
            if i >= CLEAN_LOOKAHEAD:
                break
        return first

    async def alloc(self, key: str, nbytes: int, for_prefetch: bool = False) -> int:
        """A RAM region for ``nbytes``, demoting cold entries to make room; TierFull if impossible."""
        size = self.ram.region_bytes(nbytes)
        if size > self.ram.capacity_bytes:
            raise self.m.ram_full(key, nbytes)
        beyond_ceiling = False  # a demand allocation may pass the ceiling when nothing can go
        while True:
            if beyond_ceiling or self.ram.used_bytes + size <= self.ram.ceiling:
                offset = self.ram.allocate(nbytes)
                if offset is not None:
                    return offset
            e = self.victim(take_prefetched=not for_prefetch)
            if e is None:
                if not beyond_ceiling and not for_prefetch and self.ram.used_bytes + size > self.ram.ceiling:
                    beyond_ceiling = True
                    continue
                why = "every entry in RAM is leased, pinned or moving" if self.disk else ""
                # a prefetch that finds no room is dropped (counted as such), not a refused request
                raise self.m.ram_full(key, nbytes, why, count=not for_prefetch)
            await self.demote(e)

    # ---- memory pressure -----------------------------------------------------------------------
    def lower_ceiling(self, target: int) -> int:
        """Hold the tier at ``target`` bytes or below while memory is short; returns the ceiling.

        Lowering alone would only demote entries that the next reads promote again, into pages
        faulted back in: the daemon would give memory back and take it again within a second. So
        allocations stay under the ceiling (demoting first), and while it is below capacity freed
        regions return their pages to the kernel at once. Leased and pinned bytes cannot go, so
        the ceiling never drops below them.
        """
        held = sum(
            self.ram.region_bytes(e.nbytes)
            for e in self.m.versions.values()
            if e.offset is not None and not (e.state == SEALED and e.leases == 0 and not e.pins)
        )  # leased, pinned, or being written: these cannot leave RAM now
        self.ram.ceiling = max(min(self.ram.ceiling, int(target)), held, 0)
        return self.ram.ceiling

    def raise_ceiling(self, step: int) -> int:
        """Pressure has eased: let the tier grow back by ``step`` bytes (up to its capacity)."""
        self.ram.ceiling = min(self.ram.capacity_bytes, self.ram.ceiling + max(0, int(step)))
        return self.ram.ceiling

    async def demote(self, e: Entry) -> bool:
        """Make sure ``e`` has a disk copy, then drop its RAM copy if nothing holds it."""
        if e.disk is None:
            await self.store(e)
        if self._evictable(e) and e.disk is not None:
            self.m.drop_ram(e)
            self.m.counters["demotions"] += 1
            return True
        return False

    async def store(self, e: Entry) -> None:
        """Write a clean disk copy of ``e`` (from its RAM bytes); shared by concurrent callers."""
        if self.disk is None:
            raise Unsupported("this tierd has no disk tier (disk_bytes=0)")
        pending = self._stores.get(e.version)
        if pending is not None:
            await asyncio.shield(pending)
            return
        if e.disk is not None:
            return
        assert e.offset is not None
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        self._stores[e.version] = fut
        e.protect += 1
        try:
            view = self.ram.view(e.offset, e.nbytes)
            plan = await loop.run_in_executor(self.io, self._plan, e, view)
            meta = {
                "key": e.key, "version": e.version, "dtype": e.dtype, "shape": list(e.shape),
                "nbytes": e.nbytes, "tags": list(e.tags), "durable": e.durable, "ttl": e.ttl,
                "scope": e.scope, "created": e.created,
            }  # fmt: skip
            rec = await loop.run_in_executor(self.writer, self.disk.write, meta, plan, view, self.io)
            e.disk = rec
            if e.state == SEALED and not e.current:  # hidden while we wrote: not for a restart
                await loop.run_in_executor(self.writer, self.disk.unpublish, rec)
            fut.set_result(None)
        except BaseException as ex:
            fut.set_exception(ex)
            fut.exception()
            raise
        finally:
            del self._stores[e.version]
            self.m.unprotect(e)

    # ---- lossy codecs: one value per version ---------------------------------------------------
    def may_be_lossy(self, e: Entry) -> bool:
        """Whether ``e`` asked for a lossy disk codec, itself or through a tag rule (cheap check)."""
        from tierd.codecs import get_codec

        names = [e.codec] if e.codec not in (None, "auto") else [self.tag_codecs[t] for t in e.tags
                                                                  if t in self.tag_codecs]  # fmt: skip
        return any(not get_codec(n).lossless for n in names if n)

    async def round_trip(self, e: Entry) -> None:
        """Replace a put's RAM bytes with what its lossy disk codec gives back, before it is sealed.

        Otherwise a reader would see the exact bytes while the entry stays in RAM and the decoded
        ones after a trip through disk: the same version with two values, and a model's output
        depending on what was evicted. The codecs are idempotent on their own output (int8: the
        row's absmax decodes to itself, so the same scale and codes come back; downcasts: values
        already representable), so the disk copy written later decodes to these very bytes.
        """
        assert e.offset is not None
        e.protect += 1
        try:
            view = self.ram.view(e.offset, e.nbytes)
            await asyncio.get_running_loop().run_in_executor(self.io, self._round_trip, e, view)
        finally:
            self.m.unprotect(e)

    def _round_trip(self, e: Entry, view: memoryview) -> None:
        from tierd.codecs import get_codec

        plan = self._plan(e, view)
        codec = get_codec(plan.codec)
        if codec.lossless:
            return
        for i in range(plan.n_chunks):
            stored = bytes(codec.encode_chunk(plan, i, view))  # a copy: decode writes the same span
            codec.decode_chunk(plan, i, stored, view)

    def _plan(self, e: Entry, view: memoryview) -> Any:
        """Choose the codec (explicit > tag rule > measured) and prepare its plan (in ``io``)."""
        from tierd.calibrate import Calibration
        from tierd.codecs import get_codec
        from tierd.codecs.policy import choose

        calib = self.calibration or Calibration.assumed()
        choice = choose(calib, e.dtype, list(e.shape), _sample(view), requested=e.codec,
                        tag_codecs=self.tag_codecs, tags=list(e.tags), cores=self.cores)  # fmt: skip
        return get_codec(choice.codec).prepare(view, e.dtype, list(e.shape), CHUNK_BYTES)

    # ---- durable put, delete, evict ------------------------------------------------------------
    async def seal_durable(self, cid: int, put_id: int) -> tuple[str, int]:
        """Write a durable put through to disk, then publish it."""
        e = self.m._writing(cid, put_id)
        await self.store(e)
        if e.state != WRITING or cid not in self.m.clients:
            raise InvalidRequest(f"put {put_id} was aborted while it was being written", put_id=put_id)
        key, version = self.m.seal(cid, put_id)
        await self.settled()
        return key, version

    async def settled(self) -> None:
        """Wait until every pending unpublish / delete is committed (replies that promise it)."""
        pending = list(self._disk_ops)
        if pending:
            await asyncio.gather(*(asyncio.shield(p) for p in pending), return_exceptions=True)

    async def evict(self, key: str) -> dict[str, Any]:
        """Push an entry's bytes down to disk (tierctl evict)."""
        e = self.m.resolve(key)
        if self.disk is None:
            raise Unsupported("this tierd has no disk tier (disk_bytes=0): nowhere to evict to")
        if e.leases:
            raise InvalidRequest(
                f"{key!r} is leased by {e.leases} reader(s): it stays in RAM until released", leases=e.leases
            )
        if e.pins:
            raise InvalidRequest(f"{key!r} is pinned in {sorted(e.pins)}: unpin it first")
        if e.offset is None:
            return {"evicted": key, "moved": False, "tiers": e.tiers}
        moved = await self.demote(e)
        return {"evicted": key, "moved": moved, "tiers": e.tiers}

    async def verify(self, prefix: str = "") -> list[dict[str, Any]]:
        """Read every disk copy (durable ones first) and check its checksums."""
        if self.disk is None:
            return []
        loop = asyncio.get_running_loop()
        out = []
        todo = [e for e in list(self.m.entries.values()) if e.disk is not None and e.key.startswith(prefix)]
        todo.sort(key=lambda e: (not e.durable, e.key))
        for e in todo:
            rec = e.disk
            if rec is None:
                continue
            e.protect += 1
            try:
                why = await loop.run_in_executor(self.reader, self.disk.verify, rec)
            finally:
                self.m.unprotect(e)
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
        rec = e.disk
        if rec is None or self.disk is None:
            return
        disk = self.disk

        async def unpublish() -> None:
            try:
                await asyncio.get_running_loop().run_in_executor(self.writer, disk.unpublish, rec)
            finally:
                self._unpublish.pop(e.version, None)

        self._unpublish[e.version] = self._disk_op(unpublish())

    def _on_free(self, e: Entry) -> None:
        rec = e.disk
        if rec is None or self.disk is None or e.state not in ("freed",):
            return
        disk = self.disk
        e.disk = None

        async def delete() -> None:
            await asyncio.get_running_loop().run_in_executor(self.writer, disk.delete, rec)

        self._disk_op(delete())

    # ---- background balance --------------------------------------------------------------------
    def poke(self) -> None:
        """Something grew: let the balancer check the watermarks."""
        self._wake.set()

    async def balance_once(self, target_used: int | None = None, take_prefetched: bool = False) -> int:
        """Demote coldest first until RAM use is at ``target_used`` (default: the low watermark).

        Prefetched entries not read yet are left alone unless ``take_prefetched`` (memory pressure):
        they are about to be read, and demoting them would only read them again.
        """
        if self.disk is None:
            return 0
        target = int(self.ram.ceiling * self.low) if target_used is None else target_used
        freed = 0
        while self.ram.used_bytes > target:
            e = self.victim(take_prefetched)
            if e is None:
                break
            before = self.ram.used_bytes
            try:
                await self.demote(e)
            except TierFull as ex:
                log.warning("cannot demote to disk: %s", ex)
                break
            freed += max(0, before - self.ram.used_bytes)
        return freed

    async def balancer(self) -> None:
        """Keep RAM use under the high watermark, demoting down to the low one."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            if self.ram.used_bytes > self.ram.ceiling * self.high:
                freed = await self.balance_once()
                log.debug("watermark: demoted %d bytes", freed)


def _sample(view: memoryview, size: int = 1 << 20) -> memoryview:
    """Up to ``size`` bytes from the middle of a region (the codec policy measures on it)."""
    n = len(view)
    if n <= size:
        return view
    start = (n // 2 - size // 2) // 64 * 64
    return view[start : start + size]


__all__ = ["ABORTED", "Placement", "RecordMeta"]
