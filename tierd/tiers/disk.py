"""The disk tier: one LMDB environment on the SSD, holding encoded chunks and their metadata.

Layout of ``<state_dir>/tierd.lmdb`` (one file, plus LMDB's ``-lock`` file)::

    db "meta"    version (8 bytes, big-endian) -> msgpack record: key, dtype, shape, tags, lifetime,
                                                  durable, codec plan, per-chunk (size, xxh3-64)
    db "chunks"  version + chunk index (8 + 4)  -> the chunk's encoded bytes

A record is written chunks first, each chunk in its own short write transaction, and its meta
last: a version is visible (to the index rebuilt at start) only once every chunk is committed, so
a kill at any point leaves either the whole entry or nothing readable; chunks without a meta record
are swept at the next start. Commits fsync (LMDB sync=True), so a committed durable entry also
survives a reboot.

Reads copy each chunk out of LMDB's read-only mapping (``buffers=True``, readahead on) into the
caller's buffer inside the read transaction, after checking its xxh3 checksum: a mismatch raises
:class:`CorruptEntry` naming the entry; wrong bytes are never handed out. Pages read or written
are then dropped from the mapping and the page cache (madvise + fadvise DONTNEED): the bytes now
live in the RAM tier (or were just demoted out of it), and must not be held a second time. Transactions never
outlive one chunk, and all of this runs in the daemon's executors, never on its event loop.
Writes are serialised by one lock (LMDB has a single writer anyway).
"""

from __future__ import annotations

import ctypes
import errno
import math
import os
import struct
import threading
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import lmdb
import msgspec
import numpy as np
import xxhash

from tierd.codecs import Plan, get_codec
from tierd.errors import CorruptEntry, TierFull
from tierd.tiers.base import Tier

PAGE = 4096
#: Raw bytes per chunk. Small enough that a write transaction is short and LMDB finds contiguous
#: free pages for it; large enough that per-chunk overhead is negligible.
CHUNK_BYTES = 16 << 20
_VKEY = struct.Struct(">Q")
_CKEY = struct.Struct(">QI")


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

    @property
    def stored_bytes(self) -> int:
        return sum(n for n, _ in self.chunks)

    @property
    def codec(self) -> str:
        return str(self.plan["codec"])


_libc = ctypes.CDLL(None, use_errno=True)
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_MADV_DONTNEED = 4


def _madvise(addr: int, length: int, advice: int) -> None:
    if _libc.madvise(ctypes.c_void_p(addr), ctypes.c_size_t(length), advice) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _mapping_start(fd: int) -> int:
    """Start address of this process's mapping of ``fd``'s file at offset 0 (LMDB's map).

    ``env.info()["map_addr"]`` is the fixed address LMDB was asked for (0 without MDB_FIXEDMAP), not
    where the map is; /proc/self/maps says where it is. Matched by device and inode.
    """
    st = os.fstat(fd)
    with open("/proc/self/maps", encoding="utf-8") as f:
        for line in f:
            parts = line.split(None, 5)
            if len(parts) < 5 or int(parts[2], 16) != 0:
                continue
            major, minor = (int(x, 16) for x in parts[3].split(":"))
            if int(parts[4]) == st.st_ino and os.makedev(major, minor) == st.st_dev:
                return int(parts[0].split("-")[0], 16)
    raise OSError(errno.ENOENT, "LMDB's mapping of its file is not in /proc/self/maps")


def _address(buf: Any) -> int:
    """Address of a read-only buffer's first byte (numpy reads it without copying)."""
    return int(np.frombuffer(buf, dtype=np.uint8).ctypes.data)


_enc = msgspec.msgpack.Encoder()
_dec = msgspec.msgpack.Decoder(RecordMeta)


def _pages(n: int) -> int:
    """Bytes LMDB spends on a value of n bytes (overflow pages plus its header)."""
    return math.ceil((n + 16) / PAGE) * PAGE


@dataclass
class DiskStats:
    records: int = 0
    raw_bytes: int = 0
    stored_bytes: int = 0
    used_bytes: int = 0
    reads: int = 0
    writes: int = 0
    corrupt: int = 0
    by_codec: dict[str, int] = field(default_factory=dict)


class DiskTier(Tier):
    name = "disk"

    def __init__(self, state_dir: Path, capacity: int) -> None:
        state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.path = state_dir / "tierd.lmdb"
        self._capacity = capacity - capacity % PAGE
        self.env = lmdb.open(
            str(self.path), map_size=self._capacity, subdir=False, max_dbs=2, readahead=True,
            sync=True, metasync=False, lock=True, mode=0o600, max_readers=64,
        )  # fmt: skip
        self._fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)  # for posix_fadvise only
        #: where LMDB mapped the file (offset 0): a value's file offset is its address minus this
        self._map_addr = _mapping_start(self._fd)
        self.meta_db = self.env.open_db(b"meta")
        self.chunk_db = self.env.open_db(b"chunks")
        self._write_lock = threading.Lock()
        self._lock = threading.Lock()  # guards the counters below
        self.stats_ = DiskStats()
        self._closed = False

    # -- Tier ------------------------------------------------------------------------------------
    @property
    def capacity_bytes(self) -> int:
        return self._capacity

    @property
    def used_bytes(self) -> int:
        return self.stats_.used_bytes

    def stats(self) -> dict[str, Any]:
        s = self.stats_
        info = self.env.info()
        return {
            "capacity_bytes": self._capacity,
            "used_bytes": s.used_bytes,
            "free_bytes": max(0, self._capacity - s.used_bytes),
            "raw_bytes": s.raw_bytes,
            "stored_bytes": s.stored_bytes,
            "ratio": round(s.raw_bytes / s.stored_bytes, 3) if s.stored_bytes else 1.0,
            "file_bytes": (info["last_pgno"] + 1) * PAGE,
            "by_codec": dict(s.by_codec),
            "path": str(self.path),
        }

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.env.close()
            os.close(self._fd)

    # -- accounting ------------------------------------------------------------------------------
    def _account(self, rec: RecordMeta, sign: int) -> None:
        with self._lock:
            s = self.stats_
            s.records += sign
            s.raw_bytes += sign * rec.nbytes
            s.stored_bytes += sign * rec.stored_bytes
            s.used_bytes += sign * (sum(_pages(n) for n, _ in rec.chunks) + PAGE)
            s.by_codec[rec.codec] = s.by_codec.get(rec.codec, 0) + sign

    # -- start-up --------------------------------------------------------------------------------
    def load_index(self, keep: Callable[[RecordMeta], bool]) -> list[RecordMeta]:
        """Every complete record ``keep`` accepts; the others, and orphan chunks, are deleted."""
        records: list[RecordMeta] = []
        drop: list[int] = []
        with self.env.begin(db=self.meta_db) as txn:
            for k, v in txn.cursor():
                version = _VKEY.unpack(k)[0]
                try:
                    rec = _dec.decode(v)
                except msgspec.DecodeError:
                    drop.append(version)
                    continue
                if keep(rec):
                    records.append(rec)
                else:
                    drop.append(version)
        live = {r.version for r in records}
        orphans: set[int] = set()
        with self.env.begin(db=self.chunk_db) as txn:
            for k in txn.cursor().iternext(keys=True, values=False):
                version = _CKEY.unpack(k)[0]
                if version not in live:
                    orphans.add(version)
        for version in set(drop) | orphans:
            self._delete_version(version)
        for r in records:
            self._account(r, +1)
        return records

    # -- write -----------------------------------------------------------------------------------
    def write(self, meta: dict[str, Any], plan: Plan, raw: memoryview, pool: Executor) -> RecordMeta:
        """Encode ``raw`` by ``plan`` and commit it as one record; returns the record.

        Chunks are encoded in ``pool`` (both cores) and committed one transaction each; the meta
        record commits last. On a full map every chunk written is removed and TierFull is raised.
        """
        codec = get_codec(plan.codec)
        version = int(meta["version"])
        futures = [pool.submit(codec.encode_chunk, plan, i, raw) for i in range(plan.n_chunks)]
        sums: list[tuple[int, int]] = []
        try:
            for i, fut in enumerate(futures):
                data = fut.result()
                sums.append((len(data), xxhash.xxh3_64_intdigest(data)))
                self._put(self.chunk_db, _CKEY.pack(version, i), data, meta, plan)
            rec = RecordMeta(plan=plan.to_dict(), chunks=sums, **meta)
            self._put(self.meta_db, _VKEY.pack(version), _enc.encode(rec), meta, plan)
            if meta["durable"]:
                self.env.sync(True)  # commits fsync their data; this makes the meta page durable too
            with self.env.begin(db=self.chunk_db, buffers=True) as txn:  # written pages: not needed in RAM
                for i in range(len(sums)):
                    buf = txn.get(_CKEY.pack(version, i))
                    if buf is not None:
                        self._drop_cached(buf)
        except BaseException:
            for f in futures:
                f.cancel()
            self._delete_version(version)
            raise
        self._account(rec, +1)
        with self._lock:
            self.stats_.writes += 1
        return rec

    def _drop_cached(self, buf: Any) -> None:
        """Let the page cache go for a value just copied (into the RAM tier) or written (demoted).

        LMDB reads through its own mapping, so the pages stay mapped (and charged to this process's
        cgroup) until dropped: first the mapping's page-table entries, then the cached pages.
        Without this a promoted entry would sit in RAM twice.
        """
        addr = _address(buf)
        start = -(-addr // PAGE) * PAGE
        end = (addr + len(buf)) // PAGE * PAGE
        if end <= start:
            return
        _madvise(start, end - start, _MADV_DONTNEED)
        os.posix_fadvise(self._fd, start - self._map_addr, end - start, os.POSIX_FADV_DONTNEED)

    def _put(self, db: Any, key: bytes, value: Any, meta: dict[str, Any], plan: Plan) -> None:
        with self._write_lock:
            try:
                with self.env.begin(write=True, db=db) as txn:
                    txn.put(key, value)
            except lmdb.MapFullError:
                free = max(0, self._capacity - self.stats_.used_bytes)
                raise TierFull(
                    f"disk tier full: {meta['key']!r} ({plan.nbytes} bytes raw) does not fit in "
                    f"{self._capacity} bytes ({free} free by tierd's count; LMDB needs contiguous pages)",
                    tier="disk", requested_bytes=plan.nbytes, free_bytes=free, capacity_bytes=self._capacity,
                ) from None  # fmt: skip

    # -- read ------------------------------------------------------------------------------------
    def read_into(self, rec: RecordMeta, out: memoryview, pool: Executor) -> None:
        """Decode every chunk of ``rec`` into ``out`` (rec.nbytes), checking each chunk's checksum."""
        plan = Plan.from_dict(rec.plan)
        codec = get_codec(plan.codec)

        def one(i: int) -> None:
            size, digest = rec.chunks[i]
            with self.env.begin(db=self.chunk_db, buffers=True) as txn:
                buf = txn.get(_CKEY.pack(rec.version, i))
                if buf is None or len(buf) != size or xxhash.xxh3_64_intdigest(buf) != digest:
                    self._corrupt(rec, i, "missing" if buf is None else "checksum mismatch")
                codec.decode_chunk(plan, i, buf, out)  # copies out before the transaction ends
                self._drop_cached(buf)

        for f in [pool.submit(one, i) for i in range(plan.n_chunks)]:
            f.result()
        with self._lock:
            self.stats_.reads += 1

    def verify(self, rec: RecordMeta) -> str | None:
        """None when every chunk is present with its checksum; else what is wrong."""
        with self.env.begin(db=self.chunk_db, buffers=True) as txn:
            for i, (size, digest) in enumerate(rec.chunks):
                buf = txn.get(_CKEY.pack(rec.version, i))
                if buf is None:
                    return f"chunk {i} missing"
                if len(buf) != size or xxhash.xxh3_64_intdigest(buf) != digest:
                    return f"chunk {i} checksum mismatch"
        return None

    def _corrupt(self, rec: RecordMeta, i: int, why: str) -> NoReturn:
        with self._lock:
            self.stats_.corrupt += 1
        raise CorruptEntry(
            f"{rec.key!r} v{rec.version} is corrupt on disk (chunk {i} of {len(rec.chunks)}: {why}); "
            "it is not served: delete it and put it again",
            key=rec.key, version=rec.version, chunk=i,
        )  # fmt: skip

    # -- delete ----------------------------------------------------------------------------------
    def unpublish(self, rec: RecordMeta) -> None:
        """Remove a record's meta only (one tiny commit): a restart no longer finds it, while its
        chunks stay readable for a load already in flight; :meth:`delete` removes them later."""
        with self._write_lock, self.env.begin(write=True, db=self.meta_db) as txn:
            txn.delete(_VKEY.pack(rec.version))

    def delete(self, rec: RecordMeta) -> None:
        """Remove a record: meta first (so it is gone at once for a restart), then its chunks."""
        self._delete_version(rec.version)
        self._account(rec, -1)

    def _delete_version(self, version: int) -> None:
        """Meta and chunks go in one transaction: deleting writes no data, so it stays short."""
        prefix = _VKEY.pack(version)
        with self._write_lock, self.env.begin(write=True) as txn:
            txn.delete(prefix, db=self.meta_db)
            cur = txn.cursor(db=self.chunk_db)
            if cur.set_range(prefix):
                while cur.key().startswith(prefix):
                    if not cur.delete():
                        break
