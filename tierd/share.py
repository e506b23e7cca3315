"""Sharing: which entries go to the remote tier, writing them there, and finding there what this
daemon does not hold.

The remote tier (:class:`~tierd.tiers.remote.RemoteStore`, Redis Cluster) sits below the disk tier
for the entries it is asked to share, and is shared by every machine's daemon configured with the
same cluster and prefix::

    put(share=True), or a put with a tag in remote_tags (scope "shared" only)
        SEAL: published here and answered as usual (durable ones after their disk write); then, in
        the background, the version is protected (not evicted, not freed), its home bytes written
        to the remote store (raw, 16 MiB chunks, xxh3 each, content-addressed, record last) and
        unprotected. Redis full: the share is dropped and counted (``shares_dropped``), the local
        entry unaffected; any other failure is logged and counted (``shares_failed``).
    put(durable="remote") (the wire's share_first)
        the same write, before the SEAL is applied here: the SEAL answers once the cluster holds the
        version, or fails with TierFull / StorageError (counted the same way) and the client aborts
        the put, so nothing is published here. Not written to the local disk.
    get of a key this daemon does not know (version 0: "the newest")
        the remote record by key -> room in RAM (placement demotes to make it) -> chunks read in
        parallel over the shards, checksums checked -> published here as a new local version
        (not durable, not shared again) -> leased as any other (``remote_hits``). A key absent
        there too is NotFound, as before (``remote_misses``). A dead or paused node fails the get
        with a StorageError naming the remote tier within the configured timeout per call; a
        corrupt chunk fails it with CorruptEntry. Concurrent gets of one key share one fetch.
    ls --remote
        the records the cluster holds under a prefix, in key order, paged.

A key this daemon holds is served from here: the remote tier is consulted only on a local miss, so
a newer version shared by another machine is seen once the key is deleted (or was never put) here.
Deleting an entry here does not delete its shared copy (other machines may be reading it); Redis's
own memory limit and policy bound the cluster.

All redis I/O runs in this object's threads, never on the loop: a writer and ``NET_THREADS`` readers
that each drive one entry, and ``NET_THREADS`` more for their chunks' GETs and SETs (waiting on the
network takes no CPU, and one entry's chunks lie on every shard).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from tierd.entry import SEALED, Entry, PutArgs
from tierd.errors import CorruptEntry, InvalidRequest, StorageError, TierFull
from tierd.protocol import LS_PAGE, LS_PAGE_MAX, check_key
from tierd.tiers.store import CHUNK_BYTES

if TYPE_CHECKING:
    from tierd.config import RemoteSettings
    from tierd.manager import Manager
    from tierd.placement import Placement
    from tierd.tiers.remote import RemoteStore

log = logging.getLogger("tierd.share")
#: threads that wait on the cluster for reads (a 256 MiB entry is 16 chunks over 3+ shards)
NET_THREADS = 8


def open_store(settings: RemoteSettings) -> RemoteStore:
    """Connect to the cluster (the one place redis gets imported); StorageError when it cannot."""
    from tierd.tiers.remote import RemoteStore

    return RemoteStore(settings)


class Sharing:
    def __init__(
        self, manager: Manager, placement: Placement, store: RemoteStore, tags: frozenset[str]
    ) -> None:
        self.m = manager
        self.placement = placement
        self.store = store
        self.tags = tags
        self.metrics = manager.metrics
        #: a share's write, and a fetch's read, each wait in one of these threads for its chunks, which
        #: go through ``net`` (leaf work only, that waits on nothing else: no pool waits on itself)
        self.writer = ThreadPoolExecutor(1, thread_name_prefix="tierd-remote-w")
        self.reader = ThreadPoolExecutor(NET_THREADS, thread_name_prefix="tierd-remote-r")
        self.net = ThreadPoolExecutor(NET_THREADS, thread_name_prefix="tierd-remote-n")
        self._writes: set[asyncio.Task[None]] = set()
        self._fetching: dict[str, asyncio.Future[Entry | None]] = {}

    # ---- write ---------------------------------------------------------------------------------
    def wants(self, e: Entry) -> bool:
        """Whether a sealed version is to be shared: put with share=True, or a tag in remote_tags."""
        return e.scope == "shared" and (e.share or not self.tags.isdisjoint(e.tags))

    def share(self, e: Entry) -> None:
        """Write ``e`` to the remote tier in the background (just after its SEAL)."""
        hold = self.m.protected(e)
        hold.__enter__()  # from now: its home copy stays until the write is over
        task = asyncio.get_running_loop().create_task(self._write(e, hold))
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)

    async def write_now(self, e: Entry) -> None:
        """Write ``e`` to the remote tier and return once the cluster holds it (durable="remote",
        before its SEAL); TierFull (Redis full) or StorageError are raised, and counted."""
        with self.m.protected(e):
            try:
                await self._put_remote(e)
            except TierFull:
                self.metrics.shares_dropped += 1
                raise
            except StorageError:
                self.metrics.shares_failed += 1
                raise

    async def _put_remote(self, e: Entry) -> None:
        home = self.m.ram
        view = home.view(e.where[home.name], e.nbytes)
        meta = {
            "key": e.key, "version": e.version, "dtype": e.dtype, "shape": list(e.shape),
            "nbytes": e.nbytes, "tags": list(e.tags), "durable": False, "ttl": e.ttl,
            "scope": e.scope, "created": e.created,
        }  # fmt: skip
        await asyncio.get_running_loop().run_in_executor(self.writer, self._store, meta, view)
        self.metrics.shares_written += 1

    async def _write(self, e: Entry, hold: contextlib.AbstractContextManager[None]) -> None:
        try:
            await self._put_remote(e)
        except TierFull as ex:
            self.metrics.shares_dropped += 1
            log.warning("not shared: %s", ex)
        except StorageError as ex:
            self.metrics.shares_failed += 1
            log.warning("not shared: %r v%d: %s", e.key, e.version, ex)
        finally:
            hold.__exit__(None, None, None)

    def _store(self, meta: dict[str, Any], view: memoryview) -> None:
        from tierd.codecs import get_codec

        plan = get_codec("raw").prepare(view, meta["dtype"], meta["shape"], CHUNK_BYTES)
        rec = self.store.write(meta, plan, view, self.net)
        self.store.forget(rec)

    # ---- read ----------------------------------------------------------------------------------
    async def fetch(self, key: str) -> Entry | None:
        """The key's entry, from the remote tier when this daemon does not hold it; None when
        neither does. Concurrent calls for one key share one fetch."""
        e = self.m.entries.get(key)
        if e is not None or check_key(key) is not None:
            return e
        pending = self._fetching.get(key)
        if pending is not None:
            return await asyncio.shield(pending)
        fut: asyncio.Future[Entry | None] = asyncio.get_running_loop().create_future()
        self._fetching[key] = fut
        try:
            found = await self._fetch(key)
            fut.set_result(found)
            return found
        except BaseException as ex:
            fut.set_exception(ex)
            fut.exception()  # retrieved: the sharers re-raise it themselves
            raise
        finally:
            del self._fetching[key]

    async def _fetch(self, key: str) -> Entry | None:
        loop = asyncio.get_running_loop()
        rec = await loop.run_in_executor(self.net, self.store.lookup, key)
        if rec is None:
            self.metrics.remote_misses += 1
            return None
        try:
            if rec.key != key:
                raise InvalidRequest(f"it names key {rec.key!r}")
            self.m.validate_put(PutArgs(key, rec.dtype, rec.shape, rec.nbytes, rec.tags, ttl=rec.ttl))
        except InvalidRequest as e:
            self.store.forget(rec)
            raise CorruptEntry(f"the remote tier's record of {key!r} is not a valid entry ({e}); it is "
                               "not served", key=key) from None  # fmt: skip
        home = self.m.ram
        try:
            # another machine's uid means nothing here: a shared entry is the daemon's own
            offset = await self.placement.alloc(key, rec.nbytes, owner=self.m.daemon_uid)
            try:
                view = home.view(offset, rec.nbytes)
                await loop.run_in_executor(self.reader, self.store.read_into, rec, view, self.net)
            except BaseException:
                home.free(offset)
                raise
        finally:
            self.store.forget(rec)
        here = self.m.entries.get(key)
        if here is not None:  # put here while we read: the local version wins
            home.free(offset)
            return here
        self.metrics.remote_hits += 1
        return self.m.adopt(rec, offset)

    # ---- inspection ----------------------------------------------------------------------------
    async def ls(self, prefix: str = "", after: str = "", limit: int = 0) -> list[dict[str, Any]]:
        """One page of the records the cluster holds (key order), as ``ls`` rows."""
        n = LS_PAGE if limit <= 0 else min(limit, LS_PAGE_MAX)
        recs = await asyncio.get_running_loop().run_in_executor(
            self.net, self.store.records, prefix, after, n
        )
        return [
            {
                "key": r.key, "dtype": r.dtype, "shape": list(r.shape), "nbytes": r.nbytes,
                "tags": list(r.tags), "tiers": ["remote"], "encoding": r.codec,
                "stored_bytes": r.stored_bytes, "ttl": r.ttl, "scope": r.scope, "created": r.created,
                "here": r.key in self.m.entries and self.m.entries[r.key].state == SEALED,
            }
            for r in recs
        ]  # fmt: skip

    def status(self) -> dict[str, Any]:
        return {
            "name": self.store.name,
            "where": self.store.cfg.where,
            "remote_tags": sorted(self.tags),
            "shares_in_flight": len(self._writes),
            **self.store.stats(),
        }

    async def close(self, timeout: float = 30.0) -> None:
        """Let the shares in flight finish (up to ``timeout``), then stop the threads."""
        if self._writes:
            _done, pending = await asyncio.wait(list(self._writes), timeout=timeout)
            if pending:
                log.warning("%d shares did not finish at shutdown", len(pending))
        for pool in (self.writer, self.reader, self.net):
            pool.shutdown(wait=True)
        self.store.close()
