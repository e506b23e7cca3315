"""What every tier is, and the two kinds of tier there are.

A tier is a place an entry's bytes can live. The daemon runs an ordered list of them, fastest
first, built from the configuration's ``tiers`` setting (:mod:`tierd.tiers.registry`)::

    name   kind          class                           location of a version's bytes
    ----   ----          -----                           -----------------------------
    ram    memory tier   tierd.tiers.ram.RamTier         offset of a region in a memfd arena
    disk   chunk store   tierd.tiers.disk.DiskTier       RecordMeta of an LMDB record

Two kinds, two small interfaces, each stated as a contract in its own module:

- :class:`~tierd.tiers.memory.MemoryTier`: byte-addressable memory that clients map (RAM today,
  the GPU next): allocate / free regions under a ceiling, a view, the handle a client maps.
- :class:`~tierd.tiers.store.ChunkStore`: encoded chunks plus one record per version (LMDB today,
  a remote store later): put chunks, commit the record, read, delete, scan at start. Chunking,
  codecs and checksums live in that module once, for every store.

Both share this base: a ``name`` (what users see in status, pin and show), ``capacity_bytes``,
``used_bytes``, ``stats()`` and ``close()``. A tier knows nothing of entries, leases or pins: the
manager (:mod:`tierd.manager`) owns those and records, per version, one location per tier
(``Entry.where``); placement (:mod:`tierd.placement`) moves bytes between neighbouring tiers with
one two-step move. So a new tier is a class of one of the two kinds plus a line of configuration,
and no manager or placement code changes; docs/tiers.md draws the whole picture.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar


class Tier(ABC):
    #: "memory" (:class:`~tierd.tiers.memory.MemoryTier`) or "chunks" (a chunk store)
    kind: ClassVar[str]
    #: "ram", "disk", ...: the name users see in status, pin and show; unique in a daemon's list.
    name: str

    @property
    @abstractmethod
    def capacity_bytes(self) -> int:
        """Bytes the tier may hold in all."""

    @property
    @abstractmethod
    def used_bytes(self) -> int:
        """Bytes now taken by what it holds (including alignment padding and record overhead)."""

    @abstractmethod
    def stats(self) -> dict[str, Any]:
        """Numbers for ``status``: at least capacity_bytes and used_bytes. Cheap; on the loop."""

    @abstractmethod
    def close(self) -> None:
        """Release the tier's resources. Idempotent."""
