"""The disk tier: one LMDB environment on the SSD, holding encoded chunks and their metadata.

Layout of ``<state_dir>/tierd.lmdb`` (one file, plus LMDB's ``-lock`` file; ``statedir.py`` says what
else the directory holds and what is refused at start)::

    db "meta"    version (8 bytes, big-endian) -> msgpack record: key, dtype, shape, tags, lifetime,
                                                  durable, codec plan, per-chunk (size, xxh3-64)
                                                  and where each chunk lies (see below)
    db "chunks"  version + chunk index (8 + 4)  -> the chunk's encoded bytes
    db "info"    b"id"                          -> this file's id (statedir.py)
                 b"chunk_lead"                  -> (lead, lead_min): a chunk of lead_min bytes or
                                                  more is stored after `lead` bytes of padding

This is a :class:`~tierd.tiers.store.ChunkStore`: chunking, codecs and checksums are that
module's, shared by every store; this one stores chunks and records. Each chunk commits in its own
short write transaction and the meta record last (``_commit``), so a kill at any point leaves
either the whole entry or nothing readable; chunks without a meta record are swept at the next
start. Commits fsync (LMDB sync=True), so a committed durable entry also survives a reboot.

Reading a raw entry (no codec): a chunk of ``LEAD_MIN`` bytes or more is stored after a lead of
padding that puts its first byte on a 4096-byte boundary of the file (LMDB starts a large value 16
bytes into its first overflow page; the lead costs one page per chunk of up to 16 MiB). Where it
lies is learned when it is written and kept in the record (a record from before: learned at its
first read), and it is read with O_DIRECT straight into its destination, the RAM tier's region
(512-byte aligned, ``tierd.alloc.ALIGN``): the device writes it there, with no page cache in
between, no copy and no readahead past its end. ``bench/bench_disk.py --read-paths`` (1 GiB, page
cache dropped before each way, 2 vCPUs, 3 rounds): 2.17-2.49 GB/s with 0.05-0.07 s of CPU, against
LMDB's mapping faulted in by 1-4 threads at 0.95-1.52 GB/s with 0.42-0.60 s (what py-lmdb's get did
before each pread of the earlier path). LMDB is only asked whether the key is still there, in a read
transaction held for the read, so a writer cannot reuse its pages meanwhile (a cursor set on the key
reads no value; py-lmdb's get touches every page of a value through the mapping, whose readahead
also reads into the next values). A chunk without a known place, a smaller one, a file created
before the lead (lead 0), or a destination not aligned for O_DIRECT is read with ``pread`` into the
destination on a descriptor of its own, LMDB saying where the value lies. Either way each chunk's
xxh3 is checked in place; a directly read chunk that fails it is read again the other way before it
counts as corrupt. Other codecs hand their decoder each chunk straight from LMDB's read-only mapping
(``buffers=True``) inside such a transaction; the decoder copies out before it ends. Pages read or
written through the page cache are then dropped from the mapping and the cache (madvise + fadvise
DONTNEED): the bytes now live in a memory tier (or were just demoted out of one), and must not be
held a second time. All of this runs in the daemon's executors, never on its event loop. Writes are
serialised by one lock (LMDB has a single writer anyway).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import math
import mmap
import os
import struct
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import lmdb
import numpy as np
import xxhash

from tierd.codecs import Plan
from tierd.errors import StorageError
from tierd.tiers.statedir import StateDir, StateError
from tierd.tiers.store import CHUNK_BYTES, ChunkStore, NoRoom, RecordMeta, encode_record

log = logging.getLogger("tierd.disk")

PAGE = 4096
#: a direct read's file offset and length are multiples of this (the largest logical block size
#: that devices report; any smaller one divides it)
DIRECT_BLOCK = 4096
#: a direct read's destination address is a multiple of this (block devices' DMA alignment; the
#: RAM tier's regions start on it, tierd.alloc.ALIGN)
DIRECT_MEMORY = 512
#: LMDB's header at the start of a value's first overflow page: a value's bytes start this far in
_OVERFLOW_HEADER = 16
#: a chunk of this many bytes or more is stored after a lead of padding that puts its first byte on
#: a DIRECT_BLOCK boundary of the file, so it can be read straight into its destination
LEAD_MIN = 64 << 10
#: versions whose chunks' places are remembered (a few dozen bytes per chunk)
MAX_KNOWN = 1 << 16
T = TypeVar("T")
_VKEY = struct.Struct(">Q")
_CKEY = struct.Struct(">QI")
_LAYOUT_KEY = b"chunk_lead"
_LAYOUT = struct.Struct(">II")  # lead bytes, the smallest chunk that has one


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


def _pages(n: int) -> int:
    """Bytes LMDB spends on a value of n bytes (overflow pages plus its header)."""
    return math.ceil((n + 16) / PAGE) * PAGE


class DiskTier(ChunkStore):
    durable: ClassVar[bool] = True

    def __init__(self, state_dir: Path, capacity: int, *, name: str = "disk") -> None:
        super().__init__()
        self.name = name
        self.state = StateDir(state_dir)  # held (flock) until close; refuses what cannot be used
        self.path = state_dir / "tierd.lmdb"
        self._capacity = capacity - capacity % PAGE
        try:
            self.state.before_open(self.path)
            try:
                self.env = lmdb.open(
                    str(self.path), map_size=self._capacity, subdir=False, max_dbs=3, readahead=True,
                    sync=True, metasync=False, lock=True, mode=0o600, max_readers=64,
                )  # fmt: skip
            except lmdb.Error as e:
                raise StateError(
                    f"{self.path} cannot be opened as the disk tier's LMDB file ({e}). Restore it, or move "
                    "it aside to start with an empty disk tier (its entries are then lost)"
                ) from None
            self._fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)  # for posix_fadvise only
            try:
                self.state.after_open(self.path, self.env, self._fd)
            except BaseException:
                self.env.close()
                os.close(self._fd)
                raise
        except BaseException:
            self.state.close()
            raise
        #: where LMDB mapped the file (offset 0): a value's file offset is its address minus this
        self._map_addr = _mapping_start(self._fd)
        self.meta_db = self.env.open_db(b"meta")
        self.chunk_db = self.env.open_db(b"chunks")
        self._write_lock = threading.Lock()
        self._closed = False
        self._lead, self._lead_min = self._layout()
        #: version -> per chunk, the file offset of its first byte when it has a lead (else None),
        #: learned when it was written or first read; see _read_direct
        self._where: dict[int, list[int | None]] = {}
        #: a descriptor opened O_DIRECT (-1 where the filesystem refuses direct I/O)
        self._dfd = self._open_direct()
        self._direct = self._dfd >= 0
        self.direct_read_bytes = 0
        #: a chunk with its lead, staged for LMDB (_put_chunk); None until a write needs it
        self._stage: bytearray | None = None
        self._stage_lock = threading.Lock()
        self._stage_drop = False  # let it go after the chunk being written (shed)

    def _layout(self) -> tuple[int, int]:
        """(lead, smallest chunk with a lead) of this file. A file created without leads (tierd
        before direct reads) keeps none: its chunks are read through the mapping."""
        info = self.env.open_db(b"info")
        with self.env.begin(db=info, write=True) as txn:
            stored = txn.get(_LAYOUT_KEY)
            if stored is None:
                empty = txn.stat(self.chunk_db)["entries"] == 0  # no chunk stored without a lead
                stored = _LAYOUT.pack(DIRECT_BLOCK - _OVERFLOW_HEADER if empty else 0, LEAD_MIN)
                txn.put(_LAYOUT_KEY, stored)
        lead, lead_min = _LAYOUT.unpack(stored)
        return lead, lead_min

    def _open_direct(self) -> int:
        try:
            return os.open(self.path, os.O_RDONLY | os.O_CLOEXEC | os.O_DIRECT)
        except OSError as e:
            log.info("%s: no direct reads on this filesystem (%s); chunks are read through the page cache",
                     self.path, e)  # fmt: skip
            return -1

    def _has_lead(self, stored: int) -> bool:
        """Whether a value of ``stored`` bytes starts with the lead: a chunk of n bytes gets one when
        n >= lead_min, so a value of at least lead_min + lead bytes has it and a shorter one not."""
        return self._lead > 0 and stored >= self._lead_min + self._lead

    # -- Tier ------------------------------------------------------------------------------------
    @property
    def capacity_bytes(self) -> int:
        return self._capacity

    def _store_stats(self) -> dict[str, Any]:
        return {
            "file_bytes": (self.env.info()["last_pgno"] + 1) * PAGE, "path": str(self.path),
            "direct_read_bytes": self.direct_read_bytes,
        }  # fmt: skip

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.env.close()
            os.close(self._fd)
            if self._dfd >= 0:
                os.close(self._dfd)
            self.state.close()

    def _record_bytes(self, rec: RecordMeta) -> int:
        lead = self._lead
        return sum(_pages(n + lead if lead and n >= self._lead_min else n) for n, _ in rec.chunks) + PAGE

    # -- ChunkStore primitives -------------------------------------------------------------------
    def _scan(self) -> Iterator[tuple[int, bytes]]:
        with self.env.begin(db=self.meta_db) as txn:
            found = [(_VKEY.unpack(k)[0], bytes(v)) for k, v in txn.cursor()]
        return iter(found)

    def _chunk_versions(self) -> set[int]:
        with self.env.begin(db=self.chunk_db) as txn:
            return {_CKEY.unpack(k)[0] for k in txn.cursor().iternext(keys=True, values=False)}

    def _put_chunk(self, version: int, index: int, data: Any) -> None:
        # a chunk written again lies elsewhere, and its old pages may still hold its old bytes, which
        # a read at the remembered place would find and serve: what was known of the version goes
        self._where.pop(version, None)
        if self._lead and len(data) >= self._lead_min:
            # the lead, then the chunk (whose bytes then start on a block boundary of the file), in a
            # buffer kept for the next chunk: a fresh one per chunk was faulted in and zeroed by the
            # kernel each time, and made writes 3-4x slower (2x for entries of 24 MiB). It is as
            # large as the largest chunk since it was last let go: memory pressure takes it back
            # (:meth:`shed`), and demotions then write smaller chunks (store.RELIEF_CHUNK_BYTES).
            n = self._lead + len(data)
            with self._stage_lock:
                buf = self._stage
                if buf is None or len(buf) < n:
                    buf = self._stage = None  # the old one goes before the new one is faulted in
                    buf = self._stage = bytearray(n)
                with memoryview(buf) as whole:
                    staged = whole[:n]
                    staged[self._lead :] = data
                    self._put(self.chunk_db, _CKEY.pack(version, index), staged)
                    staged.release()
                if self._stage_drop:
                    self._stage, self._stage_drop = None, False
            return
        self._put(self.chunk_db, _CKEY.pack(version, index), data)

    def shed(self) -> int:
        """Let go of the write staging buffer (memory pressure); returns the bytes let go now. One in
        use is let go once its chunk is written."""
        if not self._stage_lock.acquire(blocking=False):
            self._stage_drop = True
            return 0
        try:
            n = len(self._stage) if self._stage is not None else 0
            self._stage = None
        finally:
            self._stage_lock.release()
        return n

    def _commit(self, rec: RecordMeta, encoded: bytes) -> None:
        where: list[int | None] = []
        with self.env.begin(db=self.chunk_db, buffers=True) as txn:  # written pages: not needed in RAM
            for i in range(len(rec.chunks)):
                buf = txn.get(_CKEY.pack(rec.version, i))
                if buf is not None:
                    where.append(self._place(buf))
                    self._drop_cached(buf)
        if len(where) == len(rec.chunks) and any(w is not None for w in where):
            # kept in the record, so a restart reads directly from the first read on
            rec.places = [-1 if w is None else w for w in where]
            encoded = encode_record(rec)
        self._put(self.meta_db, _VKEY.pack(rec.version), encoded)
        if rec.durable:
            with self._failing("sync", len(encoded)):
                self.env.sync(True)  # commits fsync their data; this makes the meta page durable too
        self._remember(rec.version, where, len(rec.chunks))

    def load_index(self, keep: Callable[[RecordMeta], bool]) -> list[RecordMeta]:
        """As :meth:`ChunkStore.load_index`; the chunks' places a record keeps are remembered."""
        records = super().load_index(keep)
        for rec in records:
            if self._lead and len(rec.places) == len(rec.chunks):
                self._remember(rec.version, [None if p < 0 else p for p in rec.places], len(rec.chunks))
        return records

    def _place(self, buf: Any) -> int | None:
        """File offset of a chunk's first byte when its value has a lead (then it lies on overflow
        pages of its own, which LMDB never moves while the key exists: a chunk is written once), else
        None (a small value lies in its B-tree leaf, which any nearby write copies elsewhere)."""
        if not self._has_lead(len(buf)):
            return None
        return _address(buf) - self._map_addr + self._lead

    def _remember(self, version: int, where: list[int | None], n_chunks: int) -> None:
        if len(where) != n_chunks or not any(w is not None for w in where):
            return
        if len(self._where) >= MAX_KNOWN:
            self._where.pop(next(iter(self._where)), None)
        self._where[version] = where

    @contextlib.contextmanager
    def _failing(self, what: str, nbytes: int) -> Iterator[None]:
        """LMDB's errors as the store's: NoRoom when the map or the filesystem is full, StorageError
        for any other failure. LMDB reports a full filesystem as an I/O error, so the filesystem's
        free space tells the two apart."""
        try:
            yield
        except lmdb.MapFullError:
            raise NoRoom("LMDB needs contiguous pages") from None
        except lmdb.Error as e:
            st = os.statvfs(self.path.parent)
            free = st.f_bavail * st.f_frsize
            if free < nbytes + 16 * PAGE:
                raise NoRoom(f"the filesystem of {self.path} is full ({free} bytes free)") from None
            raise StorageError(f"{self.path}: {what} failed ({e})", path=str(self.path)) from None

    def _put(self, db: Any, key: bytes, value: Any) -> None:
        with self._write_lock, self._failing("write", len(value)), self.env.begin(write=True, db=db) as txn:
            txn.put(key, value)

    def _read_chunk(self, version: int, index: int, use: Callable[[Any], T]) -> T:
        with self.env.begin(db=self.chunk_db, buffers=True) as txn:
            value = txn.get(_CKEY.pack(version, index))
            buf = value[self._lead :] if value is not None and self._has_lead(len(value)) else value
            out = use(buf)  # the buffer dies with the transaction: use copies out of it
            if value is not None:
                self._drop_cached(value)
            return out

    def read_into(self, rec: RecordMeta, out: memoryview, pool: Any) -> None:
        """As :meth:`ChunkStore.read_into`; a raw entry's chunks are read straight into ``out``, in
        order, each chunk's xxh3 checked there (a mismatch is CorruptEntry and the caller does not
        publish ``out``): with a direct read where its place is known (:meth:`_read_direct`), else
        with pread on a descriptor of this read's own (see the module docstring)."""
        plan = Plan.from_dict(rec.plan)
        if plan.codec != "raw":
            super().read_into(rec, out, pool)
            return
        t0 = time.perf_counter()
        where = self._where.get(rec.version)
        if where is not None and len(where) != len(rec.chunks):
            where = None
        learned: list[int | None] = []
        fd = -1
        try:
            for i, (size, digest) in enumerate(rec.chunks):
                start, end = plan.span(i)
                if end - start != size:
                    self._corrupt(rec, i, "wrong size")
                dst = out[start:end]
                place = where[i] if where is not None else None
                if place is not None and self._read_direct(rec.version, i, place, dst):
                    if xxhash.xxh3_64_intdigest(dst) == digest:
                        continue
                    log.warning("%s: chunk %d of %r v%d read directly has the wrong checksum; reading it "
                                "through LMDB", self.name, i, rec.key, rec.version)  # fmt: skip
                    self._where.pop(rec.version, None)
                if fd < 0:
                    fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)  # its own readahead state
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
                if not self._pread_chunk(fd, rec.version, i, dst, learned):
                    self._corrupt(rec, i, "missing")
                if xxhash.xxh3_64_intdigest(dst) != digest:
                    self._corrupt(rec, i, "checksum mismatch")
        finally:
            if fd >= 0:
                os.close(fd)
        if where is None:
            self._remember(rec.version, learned, len(rec.chunks))
        self._count_read(rec, time.perf_counter() - t0)

    def _read_direct(self, version: int, index: int, place: int, dst: memoryview) -> bool:
        """Read chunk ``index`` of ``version``, whose first byte lies at file offset ``place``, into
        ``dst`` with O_DIRECT: the device writes it into ``dst`` itself, with no page cache in
        between and no copy. False when it cannot be done so (the key is gone, no direct I/O here,
        ``dst`` or ``place`` not aligned for it), and the caller reads it the other way.

        LMDB is only asked whether the key is still there (a cursor set on it reads no value, where
        a get would touch every page of the value through the mapping). While the read transaction
        lives, a writer cannot reuse the pages of a value it sees. The last part of a chunk smaller
        than a block is read in its whole block into a bounce block and copied from there.
        """
        if not self._direct or place % DIRECT_BLOCK or _address(dst) % DIRECT_MEMORY:
            return False
        size = len(dst)
        body = size - size % DIRECT_BLOCK
        with self.env.begin(db=self.chunk_db, buffers=True) as txn:
            if not txn.cursor().set_key(_CKEY.pack(version, index)):
                return False
            try:
                self._pread(self._dfd, place, dst[:body])
                if body < size:  # the tail: its whole block into a bounce block (the value's page holds it)
                    with mmap.mmap(-1, DIRECT_BLOCK) as bounce:
                        self._pread(self._dfd, place + body, memoryview(bounce))
                        dst[body:] = memoryview(bounce)[: size - body]
            except StorageError:  # a short read: the place is past the file's end, so not the chunk's
                return False
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise
                log.warning("%s: direct reads refused (%s); chunks are read through the page cache "
                            "from now on", self.path, e)  # fmt: skip
                self._direct = False
                return False
        with self._lock:
            self.direct_read_bytes += size
        return True

    def _pread_chunk(
        self, fd: int, version: int, index: int, dst: memoryview, learned: list[int | None]
    ) -> bool:
        """Read chunk ``index`` of ``version`` into ``dst`` (its size) with pread on ``fd``;
        False when it is absent or not ``dst``'s size. The read transaction keeps its pages
        from being reused by a writer until the bytes are in ``dst``. Where the chunk lies is
        appended to ``learned``."""
        with self.env.begin(db=self.chunk_db, buffers=True) as txn:
            value = txn.get(_CKEY.pack(version, index))
            if value is None:
                return False
            lead = self._lead if self._has_lead(len(value)) else 0
            if len(value) - lead != len(dst):
                return False
            offset = _address(value) - self._map_addr + lead  # where the chunk lies in the file
            self._pread(fd, offset, dst)
            self._drop_cached(value)
            learned.append(self._place(value))
        return True

    def _pread(self, fd: int, offset: int, dst: memoryview) -> None:
        done = 0
        while done < len(dst):
            n = os.preadv(fd, [dst[done:]], offset + done)
            if n <= 0:
                raise StorageError(f"{self.path}: short read at {offset + done}", path=str(self.path))
            done += n

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

    def _unpublish(self, version: int) -> None:
        with (
            self._write_lock,
            self._failing("unpublish", 0),
            self.env.begin(write=True, db=self.meta_db) as txn,
        ):
            txn.delete(_VKEY.pack(version))

    def _delete(self, version: int) -> None:
        """Record and chunks go in one transaction: deleting writes no data, so it stays short."""
        prefix = _VKEY.pack(version)
        self._where.pop(version, None)
        with self._write_lock, self._failing("delete", 0), self.env.begin(write=True) as txn:
            txn.delete(prefix, db=self.meta_db)
            cur = txn.cursor(db=self.chunk_db)
            if cur.set_range(prefix):
                while cur.key().startswith(prefix):
                    if not cur.delete():
                        break


__all__ = ["CHUNK_BYTES", "DiskTier", "RecordMeta"]
