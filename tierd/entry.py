"""One entry version, and where its bytes are.

``Entry.where`` maps a tier's name to the version's location in that tier, in tier order (fastest
first)::

    {"ram": 1048576, "disk": RecordMeta(...)}    # a memory tier: a region's offset
                                                 # a chunk store: the committed record

A sealed version is in at least one tier; it can be in several at once (caching is inclusive: a
promoted entry keeps its lower copies, so demoting it again only frees memory). Only the manager
changes ``where`` (:meth:`tierd.manager.Manager.place` / ``unplace``), and only when a move is
published or a copy is dropped, so a reader that finds a location finds whole bytes there.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from tierd.tiers.store import RecordMeta

WRITING, SEALED, ABORTED, FREED = "writing", "sealed", "aborted", "freed"


class PutSpec(Protocol):
    """What a put asks for: the new version's name, shape and lifetime (checked by
    :meth:`tierd.manager.Manager.validate_put`). A decoded PUT message is one, so the daemon passes
    it on without copying; :class:`PutArgs` is one for callers without the wire."""

    @property
    def key(self) -> str: ...
    @property
    def dtype(self) -> str: ...
    @property
    def shape(self) -> Sequence[int]: ...
    @property
    def nbytes(self) -> int: ...
    @property
    def tags(self) -> Sequence[str]: ...
    @property
    def durable(self) -> bool: ...
    @property
    def codec(self) -> str | None: ...
    @property
    def ttl(self) -> float | None: ...
    @property
    def scope(self) -> str: ...
    @property
    def share(self) -> bool: ...
    @property
    def share_first(self) -> bool: ...


@dataclass(frozen=True, slots=True)
class PutArgs:
    """A :class:`PutSpec` built in Python (tests, tools): the same defaults as the client's put."""

    key: str
    dtype: str
    shape: Sequence[int]
    nbytes: int
    tags: Sequence[str] = ()
    durable: bool = False
    codec: str | None = None
    ttl: float | None = None
    scope: str = "shared"
    share: bool = False
    share_first: bool = False


@dataclass(eq=False)
class Entry:
    key: str
    version: int
    dtype: str
    shape: list[int]
    nbytes: int
    tags: list[str]
    durable: bool
    ttl: float | None
    scope: str
    #: the client id that put it (scope="client" entries go with that client)
    owner: int
    #: the uid that put it: its trust domain (only that uid, root and the daemon's uid may change
    #: or delete it) and the arena its RAM copy lives in
    uid: int
    created: float
    last_access: float
    last_access_mono: float
    #: tier name -> location (an int offset in a memory tier, a RecordMeta in a chunk store)
    where: dict[str, Any] = field(default_factory=dict)
    state: str = WRITING
    current: bool = False
    leases: int = 0
    #: leases per tier (a lease holds the copy in the tier it was served from: RAM or GPU)
    held: dict[str, int] = field(default_factory=dict)
    pins: set[str] = field(default_factory=set)
    codec: str | None = None  # requested for chunk-store copies (None = the policy decides)
    protect: int = 0  # moves in flight (Manager.protected)
    prefetched: bool = False  # brought into RAM on a prediction, not read since
    #: when it was last brought into RAM ahead of a read (Manager.mark_prefetched's sequence
    #: number; later loads have higher ones): of the unread prefetches, the last loaded goes first
    loaded_seq: int = 0
    #: named by a client's hint while in RAM (or brought in for one), not read since: a prediction's
    #: load never takes its room
    hinted: bool = False
    share: bool = False  # put with share=True: written to the remote tier after SEAL
    share_first: bool = False  # durable="remote": written to the remote tier before SEAL
    shared: bool = False  # written to the remote tier already (not again after SEAL)

    @property
    def tiers(self) -> list[str]:
        """The tiers holding a copy, fastest first."""
        return list(self.where)

    @property
    def record(self) -> RecordMeta | None:
        """The record of its copy in a chunk store (the fastest one), if it has such a copy."""
        for loc in self.where.values():
            if isinstance(loc, RecordMeta):
                return loc
        return None

    def info(self) -> dict[str, Any]:
        rec = self.record
        plan = rec.plan if rec is not None else None
        return {
            "key": self.key,
            "version": self.version,
            "dtype": self.dtype,
            "shape": list(self.shape),
            "nbytes": self.nbytes,
            "tags": list(self.tags),
            "tiers": self.tiers,
            "encoding": rec.codec if rec is not None else "raw",
            "stored_bytes": rec.stored_bytes if rec is not None else None,
            "error_bound": plan.get("error_bound") if plan else None,
            "checksum": f"xxh3-64 x {len(rec.chunks)} chunks, checked on every read" if rec else None,
            "leases": self.leases,
            "pinned": sorted(self.pins),
            "durable": self.durable,
            "ttl": self.ttl,
            "scope": self.scope,
            "uid": self.uid,
            "created": self.created,
            "last_access": self.last_access,
        }


@dataclass
class ClientInfo:
    client_id: int
    pid: int
    uid: int
    name: str
    connected: float
    leases: set[int] = field(default_factory=set)
    puts: set[int] = field(default_factory=set)
    #: bytes of the puts in ``puts`` (reserved, not sealed yet)
    put_bytes: int = 0
    #: bytes this client has put and sealed, all told
    sealed_bytes: int = 0
    #: requests this client has sent (its connection counts them)
    requests: int = 0
    #: RAM bytes of the known entries its last prefetch hint named (the window it streams with;
    #: memory pressure below critical keeps room for it, see ``tierd.pressure``)
    hint_bytes: int = 0
