"""Tiers that exist only for the tests: a second memory tier and a chunk store in memory.

They are written against the two interfaces alone (no daemon code knows them), so that the contract
suite runs on more than one implementation of each, and a daemon can be configured with a third
tier (``tiers = "ram,host=tests.extra_tiers:HostTier@8MiB,disk"``) with no other change.
"""

from __future__ import annotations

import mmap
import os
import threading
from collections.abc import Callable, Iterable
from typing import Any, ClassVar, TypeVar

from tierd.alloc import Allocator
from tierd.tiers.memory import MapHandle, MemoryTier, Space
from tierd.tiers.store import ChunkStore, NoRoom, RecordMeta

T = TypeVar("T")


class HostTier(MemoryTier):
    """Plain memfd memory, not pre-faulted, with its own allocator: a second RAM-like tier."""

    def __init__(self, capacity: int, *, name: str = "host") -> None:
        self.name = name
        capacity -= capacity % mmap.PAGESIZE
        self.fd = os.memfd_create(f"tierd-test-{name}", os.MFD_CLOEXEC)
        os.ftruncate(self.fd, capacity)
        self.map = mmap.mmap(self.fd, capacity)
        self.alloc = Allocator(capacity)
        self.ceiling = self.alloc.capacity
        self._closed = False

    @property
    def capacity_bytes(self) -> int:
        return self.alloc.capacity

    @property
    def used_bytes(self) -> int:
        return self.alloc.used_bytes

    def reserve(self, nbytes: int, owner: int = 0) -> int | None:
        return self.alloc.alloc(nbytes)

    def free(self, offset: int) -> int:
        return self.alloc.free(offset)

    def region_bytes(self, nbytes: int) -> int:
        return self.alloc.size_for(nbytes)

    def view(self, offset: int, nbytes: int) -> memoryview:
        return memoryview(self.map)[offset : offset + nbytes]

    def map_handles(self, uid: int) -> list[MapHandle]:
        return [MapHandle(self.fd, self.alloc.capacity)]

    def space(self) -> Space:
        s = self.alloc.stats()
        return Space(s.capacity_bytes, s.free_bytes, s.largest_free_bytes)

    def check(self) -> None:
        self.alloc.check()

    def stats(self) -> dict[str, Any]:
        return {"capacity_bytes": self.capacity_bytes, "used_bytes": self.used_bytes}

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.map.close()
            os.close(self.fd)


class DictStore(ChunkStore):
    """Chunks and records in dicts: a chunk store that does not survive a restart."""

    durable: ClassVar[bool] = False

    def __init__(self, capacity: int, *, name: str = "dict") -> None:
        super().__init__()
        self.name = name
        self._capacity = capacity
        self.chunks: dict[tuple[int, int], bytes] = {}
        self.records: dict[int, bytes] = {}
        self._mu = threading.Lock()

    @property
    def capacity_bytes(self) -> int:
        return self._capacity

    def _record_bytes(self, rec: RecordMeta) -> int:
        return rec.stored_bytes

    def _put_chunk(self, version: int, index: int, data: Any) -> None:
        with self._mu:
            held = sum(len(c) for c in self.chunks.values())
            if held + len(data) > self._capacity:
                raise NoRoom("the dict store holds no more")
            self.chunks[version, index] = bytes(data)

    def _commit(self, rec: RecordMeta, encoded: bytes) -> None:
        with self._mu:
            self.records[rec.version] = encoded

    def _read_chunk(self, version: int, index: int, use: Callable[[Any], T]) -> T:
        return use(self.chunks.get((version, index)))

    def _unpublish(self, version: int) -> None:
        with self._mu:
            self.records.pop(version, None)

    def _delete(self, version: int) -> None:
        with self._mu:
            self.records.pop(version, None)
            for k in [k for k in self.chunks if k[0] == version]:
                del self.chunks[k]

    def _scan(self) -> Iterable[tuple[int, bytes]]:
        with self._mu:
            return list(self.records.items())

    def _chunk_versions(self) -> Iterable[int]:
        with self._mu:
            return {v for v, _ in self.chunks}

    def close(self) -> None:
        pass
