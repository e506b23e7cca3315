"""The disk tier: one LMDB environment on the SSD, holding encoded chunks and their metadata.

Layout of ``<state_dir>/tierd.lmdb`` (one file, plus LMDB's ``-lock`` file; ``statedir.py`` says what
else the directory holds and what is refused at start)::

    db "meta"    version (8 bytes, big-endian) -> msgpack record: key, dtype, shape, tags, lifetime,
                                                  durable, codec plan, per-chunk (size, xxh3-64)
    db "chunks"  version + chunk index (8 + 4)  -> the chunk's encoded bytes
    db "info"    b"id"                          -> this file's id (statedir.py)

This is a :class:`~tierd.tiers.store.ChunkStore`: chunking, codecs and checksums are that
module's, shared by every store; this one stores chunks and records. Each chunk commits in its own
short write transaction and the meta record last (``_commit``), so a kill at any point leaves
either the whole entry or nothing readable; chunks without a meta record are swept at the next
start. Commits fsync (LMDB sync=True), so a committed durable entry also survives a reboot.

A raw entry (no codec) is read with ``pread`` straight into its destination (the RAM tier), its
chunks one after another on a file descriptor of its own, so the kernel sees one sequential read and
reads ahead in large pieces: 1.33-1.94 GB/s cold here against 0.59-0.92 GB/s for the same bytes
faulted in through the mapping in 16 MiB pieces by 1-4 threads (``bench/bench_disk.py
--read-paths``: 1 GiB, page cache dropped before each, 3 rounds), and one copy less. LMDB still says
where each value lies (its address in the mapping, never touched, minus the mapping's start) inside
a read transaction held for that chunk, so a writer cannot reuse its pages meanwhile; each chunk's
xxh3 is then checked in place. Other codecs hand their decoder each chunk straight from LMDB's
read-only mapping (``buffers=True``, readahead on) inside such a transaction; the decoder copies out
before it ends. Pages read or written are then dropped from the mapping and the page cache (madvise
+ fadvise DONTNEED): the bytes now live in a memory tier (or were just demoted out of one), and must
not be held a second time. All of this runs in the daemon's executors, never on its event loop.
Writes are serialised by one lock (LMDB has a single writer anyway).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import math
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
from tierd.tiers.store import CHUNK_BYTES, ChunkStore, NoRoom, RecordMeta

PAGE = 4096
T = TypeVar("T")
_VKEY = struct.Struct(">Q")
_CKEY = struct.Struct(">QI")


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

    # -- Tier ------------------------------------------------------------------------------------
    @property
    def capacity_bytes(self) -> int:
        return self._capacity

    def _store_stats(self) -> dict[str, Any]:
        return {"file_bytes": (self.env.info()["last_pgno"] + 1) * PAGE, "path": str(self.path)}

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.env.close()
            os.close(self._fd)
            self.state.close()

    def _record_bytes(self, rec: RecordMeta) -> int:
        return sum(_pages(n) for n, _ in rec.chunks) + PAGE

    # -- ChunkStore primitives -------------------------------------------------------------------
    def _scan(self) -> Iterator[tuple[int, bytes]]:
        with self.env.begin(db=self.meta_db) as txn:
            found = [(_VKEY.unpack(k)[0], bytes(v)) for k, v in txn.cursor()]
        return iter(found)

    def _chunk_versions(self) -> set[int]:
        with self.env.begin(db=self.chunk_db) as txn:
            return {_CKEY.unpack(k)[0] for k in txn.cursor().iternext(keys=True, values=False)}

    def _put_chunk(self, version: int, index: int, data: Any) -> None:
        self._put(self.chunk_db, _CKEY.pack(version, index), data)

    def _commit(self, rec: RecordMeta, encoded: bytes) -> None:
        self._put(self.meta_db, _VKEY.pack(rec.version), encoded)
        if rec.durable:
            with self._failing("sync", len(encoded)):
                self.env.sync(True)  # commits fsync their data; this makes the meta page durable too
        with self.env.begin(db=self.chunk_db, buffers=True) as txn:  # written pages: not needed in RAM
            for i in range(len(rec.chunks)):
                buf = txn.get(_CKEY.pack(rec.version, i))
                if buf is not None:
                    self._drop_cached(buf)

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
            buf = txn.get(_CKEY.pack(version, index))
            out = use(buf)  # the buffer dies with the transaction: use copies out of it
            if buf is not None:
                self._drop_cached(buf)
            return out

    def read_into(self, rec: RecordMeta, out: memoryview, pool: Any) -> None:
        """As :meth:`ChunkStore.read_into`; a raw entry's chunks are read with pread straight into
        ``out``, in order, on a descriptor of this read's own (see the module docstring), each
        chunk's xxh3 checked there (a mismatch is CorruptEntry and the caller does not publish
        ``out``)."""
        plan = Plan.from_dict(rec.plan)
        if plan.codec != "raw":
            super().read_into(rec, out, pool)
            return
        t0 = time.perf_counter()
        fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)  # its own readahead state
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
            for i, (size, digest) in enumerate(rec.chunks):
                start, end = plan.span(i)
                if end - start != size:
                    self._corrupt(rec, i, "wrong size")
                dst = out[start:end]
                if not self._pread_chunk(fd, rec.version, i, dst):
                    self._corrupt(rec, i, "missing")
                if xxhash.xxh3_64_intdigest(dst) != digest:
                    self._corrupt(rec, i, "checksum mismatch")
        finally:
            os.close(fd)
        self._count_read(rec, time.perf_counter() - t0)

    def _pread_chunk(self, fd: int, version: int, index: int, dst: memoryview) -> bool:
        """Read chunk ``index`` of ``version`` into ``dst`` (its size) with pread on ``fd``;
        False when it is absent or not ``dst``'s size. The read transaction keeps its pages
        from being reused by a writer until the bytes are in ``dst``."""
        with self.env.begin(db=self.chunk_db, buffers=True) as txn:
            buf = txn.get(_CKEY.pack(version, index))
            if buf is None or len(buf) != len(dst):
                return False
            offset = _address(buf) - self._map_addr  # where the value lies in the file
            done = 0
            while done < len(dst):
                n = os.preadv(fd, [dst[done:]], offset + done)
                if n <= 0:
                    raise StorageError(f"{self.path}: short read at {offset + done}", path=str(self.path))
                done += n
            self._drop_cached(buf)
        return True

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
        with self._write_lock, self._failing("delete", 0), self.env.begin(write=True) as txn:
            txn.delete(prefix, db=self.meta_db)
            cur = txn.cursor(db=self.chunk_db)
            if cur.set_range(prefix):
                while cur.key().startswith(prefix):
                    if not cur.delete():
                        break


__all__ = ["CHUNK_BYTES", "DiskTier", "RecordMeta"]
