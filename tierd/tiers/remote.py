"""The remote tier: a chunk store on Redis Cluster that several machines' daemons share.

The only module that imports ``redis`` (DESIGN invariant 8), and only when ``--remote`` is given.
Keys, under the configured prefix (``--remote-prefix``, default ``tierd``; several deployments
keep apart by it)::

    PREFIX:c:<blake2b-256 hex>   one encoded chunk, named by a strong hash of its bytes: the same
                                 chunk put by two machines (or by two entries) is stored once
    PREFIX:r:<entry key>         the entry's record: RecordMeta (key, dtype, shape, tags, lifetime,
                                 codec plan, per chunk its size and xxh3-64) plus the chunk ids;
                                 written only after every chunk it names is stored
    PREFIX:index                 a sorted set of the entry keys with a record (``ls --remote``)

Chunk keys spread over the cluster's slots by their hash, so one entry's chunks lie on every shard
and are read in parallel (one GET per chunk from :meth:`ChunkStore.read_into`'s thread pool; the
client keeps a connection pool per node). One record per entry key: the last writer wins, and a
record always names chunks that were all stored before it was (the commit checks they are still
there, in one pipelined round of EXISTS).

How the :class:`~tierd.tiers.store.ChunkStore` primitives map here: ``version`` is a local token.
A write's chunks are remembered under its version until ``_commit`` stores the record; a record
read from the cluster (:meth:`lookup`, :meth:`records`) gets a fresh token whose chunk ids this
object keeps until :meth:`forget`. Chunks belong to no version: a delete removes the record and only
the chunks that a failed write had itself created (a committed chunk may be named by another
record, of this machine or another), so ``_chunk_versions`` is empty and nothing is swept at start.

Faults, all raised as the store's errors: Redis out of memory (``maxmemory``) is NoRoom (TierFull
from ``write``, which removes what it wrote); a node that is down, paused or unreachable is a
StorageError naming the remote tier, after at most ``timeout`` seconds per call (socket timeouts on
every call, no client-side retries: the caller decides); a chunk whose xxh3 does not match is
refused (CorruptEntry, counted) exactly as on the disk tier.
"""

from __future__ import annotations

import hashlib
import itertools
import re
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Executor
from typing import Any, ClassVar, TypeVar

import msgspec
import redis
import xxhash
from redis.backoff import NoBackoff
from redis.cluster import ClusterNode, RedisCluster
from redis.retry import Retry

from tierd.codecs import Plan
from tierd.config import RemoteSettings
from tierd.errors import CorruptEntry, StorageError
from tierd.tiers.store import ChunkStore, NoRoom, RecordMeta

T = TypeVar("T")
#: bytes per GETRANGE when a raw chunk is read (see RemoteStore.read_into)
PIECE = 512 << 10
_ID = re.compile(r"[0-9a-f]{64}")
#: tokens handed out for records read from the cluster start here (a daemon's own versions are far
#: below it), so a token never names a local write in flight
TOKEN_BASE = 1 << 62


class RemoteRecord(msgspec.Struct, array_like=True):
    """What ``PREFIX:r:<key>`` holds."""

    rec: RecordMeta
    ids: list[str]  # the chunks' blake2b-256 hex digests, in order


_enc = msgspec.msgpack.Encoder()
_dec = msgspec.msgpack.Decoder(RemoteRecord)


class RemoteStore(ChunkStore):
    durable: ClassVar[bool] = False  # shared, not a durable put's store: the cluster decides persistence

    def __init__(self, cfg: RemoteSettings, *, name: str = "remote") -> None:
        super().__init__()
        self.name = name
        self.cfg = cfg
        p = cfg.prefix
        self._chunk_key = f"{p}:c:".__add__
        self._record_key = f"{p}:r:".__add__
        self._index_key = f"{p}:index"
        self._state = threading.Lock()
        self._pending: dict[int, list[str]] = {}  # version of a write in flight -> its chunk ids
        self._created: dict[int, list[str]] = {}  # ... and the ids it stored itself (not found there)
        self._known: dict[int, tuple[str, list[str]]] = {}  # token -> (entry key, chunk ids)
        self._tokens = itertools.count(TOKEN_BASE)
        kw: dict[str, Any] = {}
        if cfg.tls:
            kw.update(ssl=True, ssl_ca_certs=cfg.tls_ca)
        self.rc = self._call(
            "connect",
            lambda: RedisCluster(
                startup_nodes=[ClusterNode(h, port) for h, port in cfg.nodes],
                username=cfg.username, password=cfg.password, socket_timeout=cfg.timeout,
                socket_connect_timeout=cfg.timeout, retry=Retry(NoBackoff(), 0),
                require_full_coverage=True, **kw,
            ),
        )  # fmt: skip
        self._capacity = self._call("read maxmemory", self._maxmemory)

    def _maxmemory(self) -> int:
        """The cluster's capacity: the primaries' maxmemory added up (a node without one counts
        the memory of its machine, as Redis then grows until the machine is full)."""
        total = 0
        for info in self.rc.info("memory", target_nodes=RedisCluster.PRIMARIES).values():
            total += int(info.get("maxmemory") or info.get("total_system_memory") or 0)
        return total

    # -- errors ----------------------------------------------------------------------------------
    def _call(self, what: str, fn: Callable[[], T]) -> T:
        """``fn()`` with redis's errors as the store's: NoRoom when Redis is out of memory, else a
        StorageError that names the remote tier and the cluster."""
        try:
            return fn()
        except redis.exceptions.OutOfMemoryError as e:
            raise NoRoom(f"Redis is out of memory (maxmemory): {e}") from None
        except redis.exceptions.ResponseError as e:
            if str(e).startswith("OOM"):
                raise NoRoom(f"Redis is out of memory (maxmemory): {e}") from None
            raise self._failed(what, e) from None
        except (redis.exceptions.RedisError, redis.exceptions.RedisClusterException) as e:
            raise self._failed(what, e) from None

    def _failed(self, what: str, e: BaseException) -> StorageError:
        why = str(e) or type(e).__name__
        return StorageError(
            f"remote tier ({self.cfg.where}): {what} failed within the {self.cfg.timeout} s timeout "
            f"or with an error ({type(e).__name__}: {why})",
            tier=self.name, path=self.cfg.where,
        )  # fmt: skip

    # -- Tier ------------------------------------------------------------------------------------
    @property
    def capacity_bytes(self) -> int:
        return self._capacity

    def _store_stats(self) -> dict[str, Any]:
        return {"path": self.cfg.where, "prefix": self.cfg.prefix}

    def close(self) -> None:
        rc = getattr(self, "rc", None)
        if rc is not None:
            rc.close()

    def _record_bytes(self, rec: RecordMeta) -> int:
        return rec.stored_bytes

    # -- ChunkStore primitives -------------------------------------------------------------------
    def _put_chunk(self, version: int, index: int, data: Any) -> None:
        cid = hashlib.blake2b(data, digest_size=32).hexdigest()
        key = self._chunk_key(cid)
        if not self._call("check a chunk", lambda: self.rc.exists(key)):  # stored once, by its hash
            self._call("write a chunk", lambda: self.rc.set(key, data))
            with self._state:
                self._created.setdefault(version, []).append(cid)
        with self._state:
            ids = self._pending.setdefault(version, [])
            ids.extend([""] * (index + 1 - len(ids)))
            ids[index] = cid

    def _commit(self, rec: RecordMeta, encoded: bytes) -> None:
        with self._state:
            ids = list(self._pending.get(rec.version, []))
        if len(ids) != len(rec.chunks) or not all(ids):
            raise StorageError(f"remote tier: {rec.key!r} committed before all its chunks were written")

        def check() -> list[Any]:
            pipe = self.rc.pipeline()
            for cid in ids:
                pipe.exists(self._chunk_key(cid))
            return pipe.execute()

        if not all(self._call("check the chunks", check)):
            raise StorageError(f"remote tier: a chunk of {rec.key!r} went missing before its record")
        blob = _enc.encode(RemoteRecord(rec=rec, ids=ids))
        self._call("write a record", lambda: self.rc.set(self._record_key(rec.key), blob))
        self._call("index a record", lambda: self.rc.zadd(self._index_key, {rec.key: 0}))
        with self._state:
            self._pending.pop(rec.version, None)
            self._created.pop(rec.version, None)
            self._known[rec.version] = (rec.key, ids)

    def _read_chunk(self, version: int, index: int, use: Callable[[Any], T]) -> T:
        with self._state:
            known = self._known.get(version)
            ids = known[1] if known else self._pending.get(version, [])
        if index >= len(ids) or not ids[index]:
            return use(None)
        data = self._call("read a chunk", lambda: self.rc.get(self._chunk_key(ids[index])))
        return use(data)

    def read_into(self, rec: RecordMeta, out: memoryview, pool: Executor) -> None:
        """As :meth:`ChunkStore.read_into`; a raw chunk is read straight into ``out`` in pieces.

        Each raw chunk is fetched as GETRANGEs of ``PIECE`` bytes in one pipelined round trip and
        copied into its span of ``out``, whose xxh3 is then checked (a mismatch is CorruptEntry and
        the caller does not publish ``out``). Replies then stay below the daemon's mmap threshold
        (:func:`tierd.pages.limit_heap_retention`, 1 MiB): a whole 16 MiB reply would be mapped,
        faulted in and unmapped twice per chunk (the client's buffer, then the bytes object): a
        256 MiB entry took 1.7-2.0 s to read into a daemon that way, and 0.64-0.73 s in pieces (one
        run of each, same machine, same minute). It also saves the copy out of the reply.
        """
        plan = Plan.from_dict(rec.plan)
        if plan.codec != "raw":
            super().read_into(rec, out, pool)
            return
        with self._state:
            known = self._known.get(rec.version)
        ids = known[1] if known else []

        def one(i: int) -> None:
            size, digest = rec.chunks[i]
            start, end = plan.span(i)
            if i >= len(ids) or end - start != size:
                self._corrupt(rec, i, "missing")
            key = self._chunk_key(ids[i])

            def fetch() -> list[Any]:
                pipe = self.rc.pipeline(transaction=False)
                for a in range(0, size, PIECE):
                    pipe.getrange(key, a, min(size, a + PIECE) - 1)
                return pipe.execute()

            dst = out[start:end]
            pos = 0
            for piece in self._call("read a chunk", fetch):
                n = len(piece)
                if pos + n > size:
                    break
                dst[pos : pos + n] = piece
                pos += n
            if pos != size:  # a missing key reads as empty ranges
                self._corrupt(rec, i, "missing" if pos == 0 else "wrong size")
            if xxhash.xxh3_64_intdigest(dst) != digest:
                self._corrupt(rec, i, "checksum mismatch")

        for f in [pool.submit(one, i) for i in range(plan.n_chunks)]:
            f.result()
        with self._lock:
            self.counts.reads += 1

    def _unpublish(self, version: int) -> None:
        with self._state:
            known = self._known.get(version)
        if known is not None:
            key = known[0]
            self._call("delete a record", lambda: self.rc.delete(self._record_key(key)))
            self._call("unindex a record", lambda: self.rc.zrem(self._index_key, key))

    def _delete(self, version: int) -> None:
        """The record (if this object wrote or read it) and the chunks a failed write created."""
        self._unpublish(version)
        with self._state:
            created = self._created.pop(version, [])
            self._pending.pop(version, None)
            self._known.pop(version, None)
        if created:
            keys = [self._chunk_key(cid) for cid in created]
            self._call("delete chunks", lambda: self.rc.delete(*keys))

    def _scan(self) -> Iterator[tuple[int, bytes]]:
        for rec in self.records():
            yield rec.version, _enc_rec.encode(rec)

    def _chunk_versions(self) -> list[int]:
        return []  # content-addressed chunks belong to no version

    # -- what the sharing side asks ---------------------------------------------------------------
    def _adopt(self, blob: Any) -> RecordMeta | None:
        """A record read from the cluster, checked and renumbered with a local token; None when
        there is none; CorruptEntry when it does not decode or does not add up (another machine's
        bytes are checked like a damaged disk record: never trusted to size a read)."""
        if not isinstance(blob, bytes):
            return None
        try:
            found = _dec.decode(blob)
            rec, ids = found.rec, found.ids
            plan = Plan.from_dict(rec.plan)
            if (plan.dtype, list(plan.shape), plan.nbytes) != (rec.dtype, list(rec.shape), rec.nbytes):
                raise ValueError("its codec plan and its dtype, shape or size disagree")
            if not plan.n_chunks == len(rec.chunks) == len(ids) or not all(_ID.fullmatch(i) for i in ids):
                raise ValueError("its chunk list does not match its plan")
        except (msgspec.DecodeError, msgspec.ValidationError, ValueError, TypeError) as e:
            with self._lock:
                self.counts.corrupt += 1
            raise CorruptEntry(
                f"a record on the remote tier ({self.cfg.where}) is damaged ({e}); it is not served",
                tier=self.name,
            ) from None
        token = next(self._tokens)
        with self._state:
            self._known[token] = (rec.key, ids)
        return msgspec.structs.replace(rec, version=token)

    def lookup(self, key: str) -> RecordMeta | None:
        """The committed record of entry ``key``, renumbered with a local token (its chunks are then
        readable with :meth:`read_into` until :meth:`forget`); None when the cluster has none."""
        return self._adopt(self._call("read a record", lambda: self.rc.get(self._record_key(key))))

    def forget(self, rec: RecordMeta) -> None:
        """Drop what :meth:`lookup` kept for ``rec``'s token."""
        with self._state:
            self._known.pop(rec.version, None)

    def keys(self, prefix: str = "", after: str = "", limit: int = 256) -> list[str]:
        """Entry keys with a record, in key order: those starting with ``prefix``, after ``after``."""
        lo = "(" + after if after >= prefix else "[" + prefix
        hi = "[" + prefix + "\U0010ffff" if prefix else "+"  # the largest code point: every key under prefix
        found = self._call(
            "list records", lambda: self.rc.zrangebylex(self._index_key, lo, hi, start=0, num=limit)
        )
        return [k.decode() if isinstance(k, bytes) else k for k in found]

    def records(self, prefix: str = "", after: str = "", limit: int = 256) -> list[RecordMeta]:
        """The records of :meth:`keys`, read in one pipelined round (tokens kept, as by lookup)."""
        keys = self.keys(prefix, after, limit)

        def get_all() -> list[Any]:
            pipe = self.rc.pipeline()
            for k in keys:
                pipe.get(self._record_key(k))
            return pipe.execute()

        out = []
        for blob in self._call("read records", get_all) if keys else []:
            try:
                rec = self._adopt(blob)
            except CorruptEntry:
                continue  # a damaged record is not listed
            if rec is not None:
                out.append(rec)
                self.forget(rec)
        return out


_enc_rec = msgspec.msgpack.Encoder()

__all__ = ["RemoteStore"]
