"""The chunk store interface, and the one place where entries become chunks and chunks come back.

A chunk store keeps, per entry version, its encoded chunks and one record (:class:`RecordMeta`:
key, dtype, shape, tags, lifetime, the codec plan, and per chunk its stored size and xxh3-64). It
may be durable (LMDB: a committed record survives kill -9 and reboot) or not (a store in memory).

Contract of the primitives an implementation writes (tests/test_tier_contract.py checks each one)::

    _put_chunk(version, i, data)      store chunk i; raise NoRoom when the store is full
    _commit(rec, encoded)             make the record visible, after all of its chunks (durable
                                      stores: durable when rec.durable before returning)
    _read_chunk(version, i, use)      call use(buf) with chunk i's bytes, or use(None) when absent;
                                      buf is valid only during the call; returns what use returns
    _unpublish(version)               remove the record only (a scan no longer finds the version;
                                      its chunks stay readable for a read already in flight)
    _delete(version)                  remove the record and every chunk; idempotent
    _scan() -> [(version, encoded)]   every committed record (at start, before serving)
    _chunk_versions() -> {version}    every version with chunks stored (orphans are swept)
    _record_bytes(rec)                what one record takes of the store's capacity

What every store gets from this class, written once: :meth:`write` cuts a tensor into chunks,
encodes them by the plan's codec in a thread pool, checksums each and stores it, then commits the
record last, so a version is visible only once every chunk is stored (a crash leaves all or
nothing; orphans are swept by :meth:`load_index`); :meth:`read_into` decodes chunks into the
caller's buffer, checking each checksum first, and raises :class:`CorruptEntry` rather than hand
out wrong bytes; :meth:`verify` checks without decoding; the counters behind ``stats()``.

Every method here blocks (I/O, codecs): the daemon calls them in executors, never on its loop.
Writes of one store are not concurrent (placement has one writer thread); reads may be.
"""

from __future__ import annotations

import logging
import threading
import time
from abc import abstractmethod
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import Executor, Future
from dataclasses import dataclass, field
from typing import Any, ClassVar, NoReturn, TypeVar

import msgspec
import xxhash

from tierd.codecs import Plan, get_codec
from tierd.errors import CorruptEntry, StorageError, TierFull
from tierd.tiers.base import Tier

log = logging.getLogger("tierd.store")

#: Raw bytes per chunk. Small enough that a write transaction is short and LMDB finds contiguous
#: free pages for it; large enough that per-chunk overhead is negligible.
CHUNK_BYTES = 16 << 20
#: Raw bytes per chunk of an entry written while memory pressure holds the RAM tier below its
#: capacity (``moves``): a chunk on its way to a store is held about twice (the disk tier's staging
#: buffer, LMDB's dirty pages) until it commits, so a demotion meant to give memory back first takes
#: that much; with 16 MiB chunks it took 32 MiB, enough to OOM-kill a model process in a tight cgroup.
RELIEF_CHUNK_BYTES = 4 << 20
#: Chunks a write encodes ahead of the one it stores (their encoded bytes are held until stored:
#: encoding every chunk of an entry at once held a whole compressed copy of it)
ENCODE_AHEAD = 2
T = TypeVar("T")


class RecordMeta(msgspec.Struct):
    key: str
    version: int
    dtype: str
    shape: list[int]
    nbytes: int
    tags: list[str]
    durable: bool
    ttl: float | None
    scope: str
    created: float
    plan: dict[str, Any]
    chunks: list[tuple[int, int]]  # (stored size, xxh3-64) per chunk
    #: the uid that put it (its trust domain); -1 in records older than uids: the daemon's own
    uid: int = -1
    #: why the codec policy chose ``plan``'s codec (``tierctl why``); empty in older records
    codec_reason: str = ""
    #: where the store keeps each chunk, if it says (the disk tier: the file offset of a chunk it
    #: can read directly, else -1); a hint checked at every read, empty in older records
    places: list[int] = []

    @property
    def stored_bytes(self) -> int:
        return sum(n for n, _ in self.chunks)

    @property
    def codec(self) -> str:
        return str(self.plan["codec"])


_enc = msgspec.msgpack.Encoder()
_dec = msgspec.msgpack.Decoder(RecordMeta)


def encode_record(rec: RecordMeta) -> bytes:
    """A record as stores keep it (msgpack); :meth:`ChunkStore.load_index` decodes it."""
    return _enc.encode(rec)


class NoRoom(Exception):
    """Raised by a store's ``_put_chunk`` / ``_commit`` when it is full; ``write`` turns it into
    TierFull (after removing what it wrote). The message says why, in the store's own terms."""


@dataclass
class StoreStats:
    records: int = 0
    raw_bytes: int = 0
    stored_bytes: int = 0
    used_bytes: int = 0
    reads: int = 0
    writes: int = 0
    read_bytes: int = 0
    """encoded (stored) bytes of the chunks read"""
    write_bytes: int = 0
    """encoded (stored) bytes of the chunks written"""
    read_seconds: float = 0.0
    """wall time of reads, decoding and checksums included"""
    write_seconds: float = 0.0
    """wall time of writes, encoding and the commit included"""
    corrupt: int = 0
    by_codec: dict[str, int] = field(default_factory=dict)


class ChunkStore(Tier):
    kind: ClassVar[str] = "chunks"
    #: whether a committed record survives a daemon restart (durable puts need such a store)
    durable: ClassVar[bool]

    def __init__(self) -> None:
        self._lock = threading.Lock()  # guards the counters
        self.counts = StoreStats()

    # -- what an implementation writes -----------------------------------------------------------
    @abstractmethod
    def _put_chunk(self, version: int, index: int, data: Any) -> None: ...

    @abstractmethod
    def _commit(self, rec: RecordMeta, encoded: bytes) -> None: ...

    @abstractmethod
    def _read_chunk(self, version: int, index: int, use: Callable[[Any], T]) -> T: ...

    @abstractmethod
    def _unpublish(self, version: int) -> None: ...

    @abstractmethod
    def _delete(self, version: int) -> None: ...

    @abstractmethod
    def _scan(self) -> Iterable[tuple[int, bytes]]: ...

    @abstractmethod
    def _chunk_versions(self) -> Iterable[int]: ...

    @abstractmethod
    def _record_bytes(self, rec: RecordMeta) -> int: ...

    def _store_stats(self) -> dict[str, Any]:
        """The store's own numbers for status (path, file size, ...); none by default."""
        return {}

    def shed(self) -> int:
        """Let go of memory the store keeps only for speed (memory pressure); returns the bytes let
        go. None by default."""
        return 0

    # -- Tier ------------------------------------------------------------------------------------
    @property
    def used_bytes(self) -> int:
        return self.counts.used_bytes

    def stats(self) -> dict[str, Any]:
        s = self.counts
        return {
            "capacity_bytes": self.capacity_bytes,
            "used_bytes": s.used_bytes,
            "free_bytes": max(0, self.capacity_bytes - s.used_bytes),
            "raw_bytes": s.raw_bytes,
            "stored_bytes": s.stored_bytes,
            "ratio": round(s.raw_bytes / s.stored_bytes, 3) if s.stored_bytes else 1.0,
            "by_codec": dict(s.by_codec),
            "records": s.records,
            "reads": s.reads,
            "writes": s.writes,
            "read_bytes": s.read_bytes,
            "write_bytes": s.write_bytes,
            "read_seconds": round(s.read_seconds, 6),
            "write_seconds": round(s.write_seconds, 6),
            "corrupt": s.corrupt,
            **self._store_stats(),
        }

    def _account(self, rec: RecordMeta, sign: int) -> None:
        with self._lock:
            s = self.counts
            s.records += sign
            s.raw_bytes += sign * rec.nbytes
            s.stored_bytes += sign * rec.stored_bytes
            s.used_bytes += sign * self._record_bytes(rec)
            s.by_codec[rec.codec] = s.by_codec.get(rec.codec, 0) + sign

    # -- start-up --------------------------------------------------------------------------------
    def load_index(self, keep: Callable[[RecordMeta], bool]) -> list[RecordMeta]:
        """Every complete record ``keep`` accepts; the others, and orphan chunks, are deleted."""
        records: list[RecordMeta] = []
        drop: set[int] = set()
        for version, encoded in self._scan():
            try:
                rec = _dec.decode(encoded)
            except msgspec.DecodeError:
                drop.add(version)
                continue
            if keep(rec):
                records.append(rec)
            else:
                drop.add(version)
        live = {r.version for r in records}
        drop |= {v for v in self._chunk_versions() if v not in live}
        for version in drop:
            self._delete(version)
        for r in records:
            self._account(r, +1)
        return records

    # -- write -----------------------------------------------------------------------------------
    def write(self, meta: dict[str, Any], plan: Plan, raw: memoryview, pool: Executor) -> RecordMeta:
        """Encode ``raw`` by ``plan`` and commit it as one record; returns the record.

        Chunks are encoded in ``pool``, at most ``ENCODE_AHEAD`` beyond the one being stored, and
        stored one by one; the record commits last. When the store is full every chunk written is
        removed and TierFull is raised.
        """
        t0 = time.perf_counter()
        codec = get_codec(plan.codec)
        version = int(meta["version"])
        futures: deque[Future[Any]] = deque()
        submitted = 0
        sums: list[tuple[int, int]] = []
        try:
            for i in range(plan.n_chunks):
                while submitted < min(plan.n_chunks, i + 1 + ENCODE_AHEAD):
                    futures.append(pool.submit(codec.encode_chunk, plan, submitted, raw))
                    submitted += 1
                data = futures.popleft().result()
                sums.append((len(data), xxhash.xxh3_64_intdigest(data)))
                self._put_chunk(version, i, data)
                del data
            rec = RecordMeta(plan=plan.to_dict(), chunks=sums, **meta)
            self._commit(rec, encode_record(rec))
        except BaseException as e:
            for f in futures:
                f.cancel()
            try:
                self._delete(version)
            except StorageError as gone:  # a full device can refuse even a delete: the chunks left
                log.warning("%s: could not remove the chunks of %r v%d (%s); the next start sweeps them",
                            self.name, meta["key"], version, gone)  # fmt: skip
            if isinstance(e, NoRoom):
                free = max(0, self.capacity_bytes - self.counts.used_bytes)
                raise TierFull(
                    f"{self.name} tier full: {meta['key']!r} ({plan.nbytes} bytes raw) does not fit in "
                    f"{self.capacity_bytes} bytes ({free} free by tierd's count; {e})",
                    tier=self.name, requested_bytes=plan.nbytes, free_bytes=free,
                    capacity_bytes=self.capacity_bytes,
                ) from None  # fmt: skip
            raise
        self._account(rec, +1)
        with self._lock:
            self.counts.writes += 1
            self.counts.write_bytes += sum(size for size, _ in sums)
            self.counts.write_seconds += time.perf_counter() - t0
        return rec

    # -- read ------------------------------------------------------------------------------------
    def read_into(self, rec: RecordMeta, out: memoryview, pool: Executor) -> None:
        """Decode every chunk of ``rec`` into ``out`` (rec.nbytes), checking each chunk's checksum."""
        t0 = time.perf_counter()
        plan = Plan.from_dict(rec.plan)
        codec = get_codec(plan.codec)

        def one(i: int) -> None:
            size, digest = rec.chunks[i]

            def use(buf: Any) -> None:
                if buf is None or len(buf) != size or xxhash.xxh3_64_intdigest(buf) != digest:
                    self._corrupt(rec, i, "missing" if buf is None else "checksum mismatch")
                codec.decode_chunk(plan, i, buf, out)  # copies out while the buffer is valid

            self._read_chunk(rec.version, i, use)

        for f in [pool.submit(one, i) for i in range(plan.n_chunks)]:
            f.result()
        self._count_read(rec, time.perf_counter() - t0)

    def _count_read(self, rec: RecordMeta, seconds: float) -> None:
        with self._lock:
            self.counts.reads += 1
            self.counts.read_bytes += sum(size for size, _ in rec.chunks)
            self.counts.read_seconds += seconds

    def verify(self, rec: RecordMeta) -> str | None:
        """None when every chunk is present with its checksum; else what is wrong."""
        for i, (size, digest) in enumerate(rec.chunks):

            def check(buf: Any, size: int = size, digest: int = digest) -> str | None:
                if buf is None:
                    return "missing"
                if len(buf) != size or xxhash.xxh3_64_intdigest(buf) != digest:
                    return "checksum mismatch"
                return None

            why = self._read_chunk(rec.version, i, check)
            if why is not None:
                return f"chunk {i} {why}"
        return None

    def _corrupt(self, rec: RecordMeta, i: int, why: str) -> NoReturn:
        with self._lock:
            self.counts.corrupt += 1
        raise CorruptEntry(
            f"{rec.key!r} v{rec.version} is corrupt on {self.name} (chunk {i} of {len(rec.chunks)}: "
            f"{why}); it is not served: delete it and put it again",
            key=rec.key, version=rec.version, chunk=i,
        )  # fmt: skip

    # -- delete ----------------------------------------------------------------------------------
    def unpublish(self, rec: RecordMeta) -> None:
        """Remove a record only (one tiny commit): a restart no longer finds it, while its chunks
        stay readable for a read already in flight; :meth:`delete` removes them later."""
        self._unpublish(rec.version)

    def delete(self, rec: RecordMeta) -> None:
        """Remove a record and its chunks (after the last reader of the version is gone)."""
        self._delete(rec.version)
        self._account(rec, -1)
