"""The entry table: versions, leases, pins, lifetimes and placement over the tiers.

Everything here runs on the daemon's event loop and is plain Python (no I/O, no locks), so it is
tested as scripted scenarios without a socket. The server turns requests into calls on one
:class:`Manager` and errors from :mod:`tierd.errors` into typed replies.

An entry version goes through::

    begin_put --> WRITING --seal--> SEALED (current) --put same key / delete / expire--> SEALED (hidden)
                     |                                                                      |
                   abort / client gone                                      last lease released
                     v                                                                      v
                   FREED  <-------------------------------------------------------------- FREED

Where a sealed version's bytes are is ``Entry.where`` (:mod:`tierd.entry`): one location per tier
that holds a copy, over the tiers given to the manager, fastest first. The first tier (RAM) is the
home tier: puts are written there and leases point there. Moving bytes between tiers is
:mod:`tierd.placement`'s job; while a move is in flight the version is protected
(:meth:`Manager.protected`), so neither eviction nor freeing can pull the bytes from under it.

Invariants kept here (and checked by :meth:`Manager.check`):
- a region is returned to its tier only when its version is not current, has no lease and no move
  in flight;
- a lease always points at a SEALED version with a home-tier copy; a WRITING version is visible to
  its writer only;
- every lease belongs to exactly one live client and ends when that client goes;
- a version is in at least one tier; a memory tier's used bytes are exactly the regions of the
  versions located in it; a pin names a memory tier the version is in.
"""

from __future__ import annotations

import collections
import contextlib
import heapq
import itertools
import math
import os
import time
from collections.abc import Callable, Iterator
from typing import Any

from tierd.entry import ABORTED, FREED, SEALED, WRITING, ClientInfo, Entry, PutSpec
from tierd.errors import Forbidden, InvalidRequest, NotFound, TierFull, Unsupported
from tierd.metrics import GPU_COUNTERS, Metrics
from tierd.policy import Policy, make_policy
from tierd.protocol import DTYPE_SIZES, LS_PAGE, LS_PAGE_MAX, SCOPES, Located, check_key
from tierd.tiers.base import Tier
from tierd.tiers.memory import MemoryTier
from tierd.tiers.store import ChunkStore, RecordMeta

MAX_TAGS = 64
MAX_TAG_LEN = 256
MAX_DIMS = 64
#: The largest stride a shape may imply, in bytes: torch indexes with int64.
MAX_STRIDE_BYTES = 2**63 - 1


class Manager:
    def __init__(
        self,
        home: MemoryTier,
        *lower: Tier,
        upper: tuple[MemoryTier, ...] = (),
        metrics: Metrics | None = None,
        clock=time.time,
        mono=time.monotonic,
        eviction: str = "lru",
    ) -> None:
        #: the home tier: puts are written here, leases point here
        self.ram = home
        #: every tier, fastest first: ``upper`` tiers (the GPU) above the home tier, ``lower`` below
        order = (*upper, home, *lower)
        self.tiers: dict[str, Tier] = {t.name: t for t in order}
        if len(self.tiers) != len(order):
            raise ValueError(f"tier names must be unique: {[t.name for t in order]}")
        self.rank = {name: i for i, name in enumerate(self.tiers)}
        self.memory: dict[str, MemoryTier] = {
            n: t for n, t in self.tiers.items() if isinstance(t, MemoryTier)
        }
        self.stores: dict[str, ChunkStore] = {
            n: t for n, t in self.tiers.items() if isinstance(t, ChunkStore)
        }
        #: the store durable puts are written to (the first durable chunk store), if any
        self.durable_store = next((t for t in self.stores.values() if t.durable), None)
        #: eviction order per memory tier (first to go first; ``eviction`` names the policy,
        #: :mod:`tierd.policy`); ``policy`` is the home tier's
        self.eviction = eviction
        self.policies: dict[str, Policy[Entry]] = {
            n: make_policy(eviction, capacity=t.capacity_bytes) for n, t in self.memory.items()
        }
        self.policy = self.policies[home.name]
        #: called when a version leaves the key index (placement unpublishes its stored records)
        self.on_hide: Callable[[Entry], None] = lambda e: None
        #: called when a version is gone for good (placement deletes its stored records)
        self.on_free: Callable[[Entry], None] = lambda e: None
        self.entries: dict[str, Entry] = {}  # key -> current sealed version
        self.versions: dict[int, Entry] = {}  # every version whose bytes are held
        self.leases: dict[int, tuple[int, Entry]] = {}  # lease id -> (client id, version)
        #: lease id -> the tier it holds, for leases outside the home tier (GPU leases)
        self.lease_tier: dict[int, str] = {}
        self.clients: dict[int, ClientInfo] = {}
        #: the daemon's counters (their one owner; see tierd.metrics)
        self.metrics = metrics if metrics is not None else Metrics()
        #: bytes in RAM that were prefetched and not read yet (the speculative budget's use)
        self.spec_bytes = 0
        self._loads = 0  # prefetch loads so far: each one's sequence number (Entry.loaded_seq)
        #: per client: at most this many puts reserved and not sealed, of at most this many bytes
        #: (config max_open_puts / max_open_put_bytes): one client cannot hold the home tier
        self.max_open_puts = 4096
        self.max_open_put_bytes = home.capacity_bytes // 2
        #: uids that may change any uid's entries: root and the daemon's own
        self.daemon_uid = os.getuid()
        self.admin_uids = {0, self.daemon_uid}
        self._next_version = 1
        self._next_lease = 1
        self._next_client = 1
        #: the clocks entries are stamped with (wall time, monotonic); tests pass their own
        self.clock = clock
        self.mono = mono

    # ---- clients -------------------------------------------------------------------------------
    def add_client(self, pid: int, uid: int, name: str) -> int:
        cid = self._next_client
        self._next_client += 1
        self.clients[cid] = ClientInfo(cid, pid, uid, name, self.clock())
        return cid

    def client_gone(self, cid: int) -> None:
        """End everything a client held: its leases, its unsealed puts, its scope="client" entries."""
        c = self.clients.pop(cid, None)
        if c is None:
            return
        for lid in list(c.leases):
            self._end_lease(lid)
        for put_id in list(c.puts):
            self._drop_writing(put_id)
        for e in [e for e in self.entries.values() if e.scope == "client" and e.owner == cid]:
            self._hide(e)

    def uid_of(self, cid: int) -> int:
        c = self.clients.get(cid)
        if c is None:
            raise InvalidRequest("client gone")
        return c.uid

    def guard(self, cid: int, e: Entry, verb: str) -> None:
        """Forbidden unless client ``cid``'s uid may change ``e`` (DESIGN: a uid is a trust domain:
        the uid that put it, root and the daemon's uid may; every other uid only reads it)."""
        uid = self.uid_of(cid)
        if uid != e.uid and uid not in self.admin_uids:
            raise Forbidden(
                f"{e.key!r} belongs to uid {e.uid}: uid {uid} may read it but not {verb} it",
                key=e.key, owner_uid=e.uid, uid=uid,
            )  # fmt: skip

    # ---- put -----------------------------------------------------------------------------------
    def tier_full(self, tier: str, key: str, nbytes: int, why: str = "", count: bool = True) -> TierFull:
        """The TierFull for a region of ``nbytes`` in memory tier ``tier`` that cannot be had
        (counted in tier_full unless ``count`` is false)."""
        if count:
            self.metrics.tier_full += 1
        t = self.memory[tier]
        st = t.space()
        need = t.region_bytes(nbytes)
        why = why or (
            "larger than the whole tier"
            if need > st.capacity_bytes
            else "not enough free space"
            if need > st.free_bytes
            else f"free space is fragmented (largest hole {st.largest_free_bytes} bytes)"
        )
        below = "" if self.rank[tier] < len(self.tiers) - 1 else "; no other tier can take it"
        return TierFull(
            f"{tier} tier full: {key!r} needs {need} bytes, {st.free_bytes} free of {st.capacity_bytes} "
            f"({why}){below}",
            tier=tier,
            requested_bytes=need,
            free_bytes=st.free_bytes,
            largest_free_bytes=st.largest_free_bytes,
            capacity_bytes=st.capacity_bytes,
        )

    def check_reservation(self, cid: int, nbytes: int) -> None:
        """TierFull when client ``cid`` may not reserve ``nbytes`` more now (its caps on open puts).

        The byte cap bounds what a client holds at once: a single put of any size that fits the tier
        is allowed when the client holds no other."""
        c = self.clients[cid]
        over_bytes = bool(c.puts) and c.put_bytes + nbytes > self.max_open_put_bytes
        if len(c.puts) >= self.max_open_puts or over_bytes:
            self.metrics.tier_full += 1
            raise TierFull(
                f"this client holds {len(c.puts)} puts of {c.put_bytes} bytes not sealed yet; at most "
                f"{self.max_open_puts} of {self.max_open_put_bytes} bytes (max_open_puts, "
                "max_open_put_bytes): seal or abort some first",
                tier=self.ram.name, requested_bytes=nbytes, open_puts=len(c.puts), open_put_bytes=c.put_bytes,
            )  # fmt: skip

    def begin_put(self, cid: int, req: PutSpec, offset: int | None = None) -> tuple[int, int]:
        """Reserve a region for a new version of ``req.key``; returns (put id = version, offset).

        ``offset``: a region the caller already allocated (after making room); else one is taken
        here, and TierFull is raised when there is none.
        """
        self.validate_put(req)
        uid = self.uid_of(cid)
        old = self.entries.get(req.key)
        if old is not None:
            try:
                self.guard(cid, old, "put a new version of")
            except Forbidden:
                if offset is not None:
                    self.ram.free(offset)
                raise
        if offset is None:
            offset = self.ram.allocate(req.nbytes, owner=uid)
            if offset is None:
                raise self.tier_full(self.ram.name, req.key, req.nbytes)
        now, mono = self.clock(), self.mono()
        version = self.new_version()
        e = Entry(
            key=req.key, version=version, dtype=req.dtype, shape=list(req.shape), nbytes=req.nbytes,
            where={self.ram.name: offset}, tags=list(req.tags), durable=req.durable, ttl=req.ttl,
            scope=req.scope, owner=cid, uid=uid, created=now, last_access=now, last_access_mono=mono,
            codec=None if req.codec in (None, "auto") else req.codec, share=req.share,
            share_first=req.share_first,
        )  # fmt: skip
        self.versions[version] = e
        c = self.clients[cid]
        c.puts.add(version)
        c.put_bytes += req.nbytes
        return version, offset

    def new_version(self) -> int:
        version = self._next_version
        self._next_version += 1
        return version

    def restore(self, entries: list[Entry]) -> None:
        """Take in entries found on disk at start (newest version per key wins)."""
        for e in sorted(entries, key=lambda e: e.version):
            e.state = SEALED
            self.versions[e.version] = e
            old = self.entries.get(e.key)
            self.entries[e.key] = e
            e.current = True
            if old is not None:
                self._hide(old)
            self._next_version = max(self._next_version, e.version + 1)

    def adopt(self, rec: RecordMeta, offset: int) -> Entry:
        """Publish as the key's current version what another machine shared (``rec``, from the
        remote tier), its bytes read into the home region at ``offset`` (the daemon uid's arena): a
        new local version, sealed, owned by no client and by the daemon's uid (another machine's uid
        means nothing here), neither durable nor shared again from here."""
        now, mono = self.clock(), self.mono()
        e = Entry(
            key=rec.key, version=self.new_version(), dtype=rec.dtype, shape=list(rec.shape),
            nbytes=rec.nbytes, where={self.ram.name: offset}, tags=list(rec.tags), durable=False,
            ttl=rec.ttl, scope="shared", owner=0, uid=self.daemon_uid, created=rec.created, last_access=now,
            last_access_mono=mono, state=SEALED,
        )  # fmt: skip
        self.versions[e.version] = e
        old = self.entries.get(e.key)
        self.entries[e.key] = e
        e.current = True
        self.policy.on_put(e.version, e, new=True)
        if old is not None:
            self._hide(old)
        return e

    def validate_put(self, req: PutSpec) -> None:
        why = check_key(req.key)
        if why:
            raise InvalidRequest(why, key=req.key)
        size = DTYPE_SIZES.get(req.dtype)
        if size is None:
            raise InvalidRequest(f"unsupported dtype {req.dtype!r}", dtype=req.dtype)
        if len(req.shape) > MAX_DIMS or any(d < 0 for d in req.shape):
            raise InvalidRequest(f"bad shape {req.shape!r}", shape=req.shape)
        # Every stride (a product of dims, zero dims aside, times the item size) must fit torch's
        # int64: else the put is accepted and every get fails in torch. The error's details stay
        # small enough to encode (the product itself may not fit the wire's 64 bits).
        if math.prod(max(d, 1) for d in req.shape) * size > MAX_STRIDE_BYTES:
            raise InvalidRequest(
                f"shape {req.shape!r} of {req.dtype} spans more than 2**63 bytes", dtype=req.dtype
            )
        expect = math.prod(req.shape) * size
        if req.nbytes != expect:
            raise InvalidRequest(
                f"nbytes {req.nbytes} does not match {req.dtype}{list(req.shape)} ({expect} bytes)",
                nbytes=req.nbytes,
                expected=expect,
            )
        if len(req.tags) > MAX_TAGS or any(not t or len(t) > MAX_TAG_LEN for t in req.tags):
            raise InvalidRequest(f"at most {MAX_TAGS} tags of 1..{MAX_TAG_LEN} characters each")
        if req.scope not in SCOPES:
            raise InvalidRequest(f"scope must be one of {SCOPES}, not {req.scope!r}")
        if req.share and req.scope != "shared":
            raise InvalidRequest(f"share=True needs scope='shared' ({req.key!r} has scope {req.scope!r})")
        if req.share_first and not req.share:
            raise InvalidRequest("share_first (durable='remote') needs share=True")
        if req.ttl is not None and not (req.ttl > 0 and math.isfinite(req.ttl)):
            raise InvalidRequest(f"ttl must be a positive number of seconds, not {req.ttl!r}")
        if req.durable and self.durable_store is None:
            raise Unsupported(
                f"durable=True needs a disk tier and this tierd runs without one (disk_bytes=0); "
                f"put {req.key!r} with durable=False",
                key=req.key,
            )
        if req.codec not in (None, "auto"):
            if not self.stores:
                raise Unsupported(
                    f"codec {req.codec!r} applies to the disk tier, which this tierd runs without "
                    "(disk_bytes=0); use codec=None",
                    codec=req.codec,
                )
            from tierd.codecs import CODEC_NAMES

            if req.codec not in CODEC_NAMES:
                raise InvalidRequest(f"unknown codec {req.codec!r} (known: auto, {', '.join(CODEC_NAMES)})")

    def writing(self, cid: int, put_id: int) -> Entry:
        """The version put ``put_id`` of client ``cid`` is writing; InvalidRequest if there is none."""
        e = self.versions.get(put_id)
        if e is None or e.state != WRITING or e.owner != cid:
            raise InvalidRequest(f"no put {put_id} in progress on this connection", put_id=put_id)
        return e

    def _unreserve(self, cid: int, e: Entry) -> None:
        c = self.clients[cid]
        c.puts.discard(e.version)
        c.put_bytes -= e.nbytes

    def seal(self, cid: int, put_id: int) -> tuple[str, int]:
        """Publish a written version as its key's current one; the previous version is hidden."""
        e = self.writing(cid, put_id)
        old = self.entries.get(e.key)
        if old is not None:
            try:
                self.guard(cid, old, "put a new version of")
            except Forbidden:  # another uid sealed the key first: this put is dropped
                self.abort(cid, put_id)
                raise
        self._unreserve(cid, e)
        self.clients[cid].sealed_bytes += e.nbytes
        e.state = SEALED
        self.entries[e.key] = e
        e.current = True
        if self.ram.name in e.where:
            self.policy.on_put(e.version, e, new=True)
        if old is not None:
            self._hide(old)
        self.metrics.puts += 1
        return e.key, e.version

    def abort(self, cid: int, put_id: int) -> None:
        self._unreserve(cid, self.writing(cid, put_id))
        self._drop_writing(put_id)

    def _drop_writing(self, put_id: int) -> None:
        e = self.versions.get(put_id)
        if e is not None and e.state == WRITING:
            e.state = ABORTED  # never published; freed now, or when its move in flight ends
            self._maybe_free(e)

    # ---- get / release -------------------------------------------------------------------------
    def resolve(self, key: str, version: int = 0) -> Entry:
        if version:
            e = self.versions.get(version)
            if e is None or e.state != SEALED or e.key != key:
                raise NotFound(
                    f"no version {version} of {key!r} (deleted, replaced and released, or never put)",
                    key=key,
                    version=version,
                )
            return e
        e = self.entries.get(key)
        if e is None:
            why = check_key(key)
            raise NotFound(f"no entry {key!r}" + (f" ({why})" if why else ""), key=key)
        return e

    def get(self, cid: int, refs: list[tuple[str, int]]) -> list[Located]:
        """Lease every requested version, or none of them when one is missing (all must be home)."""
        return self.lease(cid, [self.resolve(k, v) for k, v in refs])

    def lease(self, cid: int, found: list[Entry], loaded: int = 0, tier: str = "") -> list[Located]:
        """Lease versions whose bytes are in ``tier`` (home by default; placement promotes the
        others first, ``loaded`` of them). A lease holds the copy in that tier only."""
        client = self.clients.get(cid)
        if client is None:
            return []  # the client went while its get was waiting on the disk
        now, mono = self.clock(), self.mono()
        home = self.ram.name
        tier = tier or home
        t = self.memory[tier]
        split, event_of, policy = t.split, t.event_of, self.policies[tier]
        out = []
        for e in found:
            offset = e.where.get(tier)
            assert offset is not None and e.state == SEALED, f"lease of a version not in {tier}"
            lid = self._next_lease
            self._next_lease += 1
            self.leases[lid] = (cid, e)
            if tier != home:
                self.lease_tier[lid] = tier
            client.leases.add(lid)
            e.leases += 1
            e.held[tier] = e.held.get(tier, 0) + 1
            e.last_access, e.last_access_mono = now, mono
            e.hinted = False
            if e.prefetched:
                e.prefetched = False
                self.spec_bytes -= self.ram.region_bytes(e.nbytes)
                self.metrics.prefetch_used += 1
            policy.on_hit(e.version)
            space, at = split(offset)
            event = event_of(offset)
            out.append(Located(e.key, e.version, e.dtype, e.shape, at, e.nbytes, lid, space, event))
        metrics = self.metrics
        metrics.gets += len(found)
        if tier == home:
            metrics.hits_ram += len(found) - loaded
        else:
            metrics.hits_gpu += len(found) - loaded
        return out

    def release(self, cid: int, lease_ids: list[int]) -> int:
        """End the given leases of this client; returns how many ids were not its leases."""
        client = self.clients.get(cid)
        bad = 0
        for lid in lease_ids:
            if client is None or lid not in client.leases:
                bad += 1
                continue
            self._end_lease(lid)
        metrics = self.metrics
        metrics.releases += len(lease_ids) - bad
        metrics.bad_releases += bad
        return bad

    def _end_lease(self, lid: int) -> None:
        cid, e = self.leases.pop(lid)
        tier = self.lease_tier.pop(lid, self.ram.name)
        c = self.clients.get(cid)
        if c is not None:
            c.leases.discard(lid)
        e.leases -= 1
        e.held[tier] -= 1
        self._maybe_free(e)

    # ---- delete / pin / lifetime ---------------------------------------------------------------
    def delete(self, key: str) -> None:
        e = self.resolve(key)
        self._hide(e)
        self.metrics.deletes += 1

    def _hide(self, e: Entry) -> None:
        """Take a version out of the key index; its bytes go when its last lease does."""
        if self.entries.get(e.key) is e:
            del self.entries[e.key]
        was_current = e.current
        e.current = False
        e.pins.clear()
        if was_current:
            self.on_hide(e)
        self._maybe_free(e)

    def pin(self, key: str, tier: str) -> None:
        e = self.resolve(key)
        memory = list(self.memory)
        if tier not in memory:
            raise Unsupported(
                f"cannot pin {key!r} in {tier!r}: pins hold entries in a memory tier "
                f"(this tierd has {memory})",
                tier=tier,
            )
        if tier not in e.where:
            raise Unsupported(
                f"{key!r} is not in {tier} (it is in {', '.join(e.tiers)}): get it once to bring it into "
                f"{tier}, then pin it"
            )
        e.pins.add(tier)

    def unpin(self, key: str) -> bool:
        e = self.resolve(key)
        had = bool(e.pins)
        e.pins.clear()
        return had

    def prefetch_hint(self, keys: list[str]) -> int:
        """Record hints (the prefetcher acts on them); returns how many keys are known."""
        self.metrics.prefetch_hints += len(keys)
        return sum(1 for k in keys if k in self.entries)

    def expire(self) -> list[str]:
        """Delete entries whose ttl has passed since their last access (leased ones wait)."""
        mono = self.mono()
        gone = [
            e for e in self.entries.values()
            if e.ttl is not None and e.leases == 0 and not e.pins and mono - e.last_access_mono > e.ttl
        ]  # fmt: skip
        for e in gone:
            self._hide(e)
        self.metrics.expired += len(gone)
        return [e.key for e in gone]

    def _maybe_free(self, e: Entry) -> None:
        if not e.current and e.leases == 0 and e.protect == 0 and e.state in (SEALED, ABORTED):
            self._free(e)

    @contextlib.contextmanager
    def protected(self, *entries: Entry) -> Iterator[None]:
        """Hold ``entries`` in place for a move: no eviction, no drop, no free until the block ends
        (a version hidden or aborted meanwhile is freed then)."""
        for e in entries:
            e.protect += 1
        try:
            yield
        finally:
            for e in entries:
                e.protect -= 1
                self._maybe_free(e)

    def mark_prefetched(self, e: Entry, hinted: bool = False) -> None:
        """``e`` was brought into RAM ahead of a read: for a client's hint, or on a prediction."""
        if not e.prefetched and self.ram.name in e.where:
            e.prefetched = True
            self._loads += 1
            e.loaded_seq = self._loads
            self.spec_bytes += self.ram.region_bytes(e.nbytes)
        if hinted:
            self.mark_hinted(e)

    def mark_hinted(self, e: Entry) -> None:
        """A client's hint named ``e``: while it stays in RAM unread, no prediction's load takes
        its room (:meth:`tierd.placement.Placement.victim`)."""
        if self.ram.name in e.where:
            e.hinted = True

    def _unspeculate(self, e: Entry) -> None:
        """A prefetched entry leaves RAM unread: its bytes were wasted."""
        e.hinted = False
        if e.prefetched:
            e.prefetched = False
            self.spec_bytes -= self.ram.region_bytes(e.nbytes)
            self.metrics.prefetch_wasted_bytes += e.nbytes

    def place(self, e: Entry, tier: str, location: Any) -> None:
        """Publish a copy of ``e`` in ``tier`` (the end of a move); ``where`` stays in tier order."""
        where = e.where
        where[tier] = location
        names, rank = list(where), self.rank
        if any(rank[a] > rank[b] for a, b in itertools.pairwise(names)):
            e.where = {n: where[n] for n in sorted(names, key=rank.__getitem__)}
        policy = self.policies.get(tier)
        if policy is not None:
            policy.on_put(e.version, e)

    def set_eviction(self, name: str) -> None:
        """Order every memory tier by policy ``name`` from now on (a reload; ValueError for an
        unknown name, and nothing changes). The new policy starts from the copies there now, least
        recently read first; what the old one had learned is dropped."""
        if name == self.eviction:
            return
        new = {n: make_policy(name, capacity=t.capacity_bytes) for n, t in self.memory.items()}
        for tier, policy in new.items():
            held = sorted((e for e in self.versions.values() if tier in e.where and e.state == SEALED),
                          key=lambda e: e.last_access_mono)  # fmt: skip
            for e in held:
                policy.on_put(e.version, e)
        old, self.policies, self.eviction = self.policies, new, name
        self.policy = new[self.ram.name]
        for policy in old.values():
            policy.close()

    def close(self) -> None:
        """Stop what the policies run in the background (their shadow threads)."""
        for policy in self.policies.values():
            policy.close()

    def drop(self, e: Entry, tier: str) -> int:
        """Free the copy of ``e`` in memory tier ``tier`` (it has another); returns the bytes freed."""
        assert len(e.where) > 1 and tier in self.memory and not e.held.get(tier)
        return self._unplace(e, tier)

    def _unplace(self, e: Entry, tier: str) -> int:
        offset = e.where.pop(tier)
        if tier == self.ram.name:
            self._unspeculate(e)
        self.policies[tier].on_remove(e.version)
        return self.memory[tier].free(offset)

    def _free(self, e: Entry) -> None:
        for tier in [t for t in e.where if t in self.memory]:
            self._unplace(e, tier)
        del self.versions[e.version]
        e.state = FREED
        self.on_free(e)  # placement deletes the records left in chunk stores

    # ---- inspection ----------------------------------------------------------------------------
    def ls(self, prefix: str = "", after: str = "", limit: int = 0) -> list[dict[str, Any]]:
        """One page: the first ``limit`` entries (key order) whose key starts with ``prefix`` and comes
        after ``after``. ``limit`` is clamped to 1..LS_PAGE_MAX (0: LS_PAGE), so no reply is unbounded
        and the loop never sorts the whole table for one request."""
        n = LS_PAGE if limit <= 0 else min(limit, LS_PAGE_MAX)
        keys = heapq.nsmallest(n, (k for k in self.entries if k > after and k.startswith(prefix)))
        return [self.entries[k].info() for k in keys]

    def stat(self, key: str) -> dict[str, Any]:
        return self.resolve(key).info()

    def status(self) -> dict[str, Any]:
        tiers = []
        for name, tier in self.tiers.items():
            st = tier.stats()
            st.update(name=name, entries=sum(1 for e in self.entries.values() if name in e.where))
            if name in self.memory:
                st["versions"] = sum(
                    1 for e in self.versions.values() if e.state == SEALED and name in e.where
                )
            tiers.append(st)
        counters = self.metrics.snapshot()
        if "gpu" not in self.tiers:  # the GPU counters come with the GPU tier
            for name in GPU_COUNTERS:
                counters.pop(name, None)
        return {
            "tiers": tiers,
            "clients": len(self.clients),
            "leases": len(self.leases),
            "counters": counters,
        }

    def client_list(self) -> list[dict[str, Any]]:
        """Every connected client: who it is, since when, and what it holds and has done."""
        out = []
        for c in self.clients.values():
            leased = sum(self.leases[lid][1].nbytes for lid in c.leases)
            out.append({
                "id": c.client_id, "name": c.name, "pid": c.pid, "uid": c.uid, "since": c.connected,
                "leases": len(c.leases), "leased_bytes": leased, "open_puts": len(c.puts),
                "open_put_bytes": c.put_bytes, "put_bytes": c.sealed_bytes, "requests": c.requests,
            })  # fmt: skip
        return out

    def check(self) -> None:
        """Assert the table's invariants (tests call this after every scripted step)."""
        for t in self.memory.values():
            t.check()
        for key, e in self.entries.items():
            assert e.key == key and e.current and e.state == SEALED and self.versions[e.version] is e
        lease_count: collections.Counter[int] = collections.Counter()
        held: collections.Counter[tuple[int, str]] = collections.Counter()
        for lid, (cid, e) in self.leases.items():
            assert e.state == SEALED, "lease on an unsealed or freed version"
            assert lid in self.clients[cid].leases
            tier = self.lease_tier.get(lid, self.ram.name)
            assert tier in e.where, f"lease on a version not in {tier}"
            lease_count[e.version] += 1
            held[e.version, tier] += 1
        for cid, c in self.clients.items():
            assert all(self.versions[v].state == WRITING and self.versions[v].owner == cid for v in c.puts)
            assert c.put_bytes == sum(self.versions[v].nbytes for v in c.puts), "open put bytes are off"
        used: collections.Counter[str] = collections.Counter()
        for v, e in self.versions.items():
            assert e.leases == lease_count[v], f"lease count of version {v} is off"
            assert all(n == held[v, t] for t, n in e.held.items()), f"tier leases of version {v} are off"
            assert e.state in (WRITING, SEALED) or (e.state == ABORTED and e.protect > 0)
            assert e.current or e.leases > 0 or e.protect > 0 or e.state == WRITING, (
                f"version {v} is held for nobody"
            )
            assert e.where, f"version {v} has no bytes anywhere"
            ranks = [self.rank[n] for n in e.where]  # KeyError: a tier this daemon does not have
            assert ranks == sorted(ranks), f"version {v}: where is not in tier order"
            for name, loc in e.where.items():
                assert isinstance(loc, int) == (name in self.memory), f"version {v}: bad location in {name}"
                if name in self.memory:
                    used[name] += self.memory[name].region_bytes(e.nbytes)
            assert e.pins <= e.where.keys(), f"version {v} is pinned in a tier it is not in"
            assert not e.prefetched or self.ram.name in e.where
            assert not e.hinted or self.ram.name in e.where
        for name, t in self.memory.items():
            assert used[name] == t.used_bytes, f"{name}: tier bytes disagree with the versions held"
