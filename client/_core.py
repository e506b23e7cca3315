"""What the blocking and the asyncio client share: the arena mapping, tensor views, leases.

How a get becomes a tensor, and how its lease ends::

    GOT(key, version, dtype, shape, offset, nbytes, lease)
      -> region = arena_ro[offset : offset + nbytes]     a numpy slice of the read-only mapping
      -> tensor = torch.from_numpy(region).view(dtype).view(shape)        (no byte is copied)
      -> weakref.finalize(region, ...)                                    (region dies with the
                                                                           last tensor on it)
    release(tensor) ends the lease now; otherwise the finalizer queues it when the tensor (and
    every view of it) is garbage; the queue is sent ahead of the next request, as one-way RELEASE
    frames. Closing the connection, or the process dying, ends all leases in the daemon.

Got tensors are read-only: the mapping is PROT_READ, so a write into one faults. Entries are
immutable; ``clone()`` a tensor to change it.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import sys
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tierd import protocol
from tierd.errors import InvalidRequest, NotLeased, ProtocolError, from_wire
from tierd.protocol import DTYPE_SIZES

if TYPE_CHECKING:
    import numpy as np
    import torch

# torch and numpy are imported on first use, not at import: tierctl and other control-only users
# start in a few milliseconds instead of a second.
_TORCH_DTYPES: dict[str, torch.dtype] = {}


def _torch_dtype(name: str) -> torch.dtype:
    dt = _TORCH_DTYPES.get(name)
    if dt is None:
        import torch

        dt = _TORCH_DTYPES[name] = getattr(torch, name)
    return dt


@dataclass(frozen=True, slots=True)
class Handle:
    """One sealed version of an entry: what put returns and get accepts. Treat it as opaque."""

    key: str
    version: int

    def __str__(self) -> str:
        return f"{self.key}@v{self.version}"


class Arena:
    """The client's two mappings of the daemon's memfd: read-only for gets, read-write for puts.

    The daemon pre-faults the arena, so its pages exist; a mapping here still needs page-table
    entries. The read-write mapping is made on the first put with MAP_POPULATE (about 40 ms per GiB
    of arena, once), so every put then copies at memcpy speed. The read-only mapping is made on the
    first get without it: a got tensor's pages are mapped as they are first read, so a process pays
    only for the entries it touches. The numpy arrays over a mapping keep it alive as long as any
    tensor on it lives.
    """

    def __init__(self, fd: int, size: int) -> None:
        self.fd = fd
        self.size = size
        self._ro: np.ndarray | None = None
        self._rw: np.ndarray | None = None

    def _map(self, prot: int) -> np.ndarray:
        import numpy as np

        if prot & mmap.PROT_WRITE:
            m = mmap.mmap(self.fd, self.size, flags=mmap.MAP_SHARED | mmap.MAP_POPULATE, prot=prot)
            return np.frombuffer(m, np.uint8)
        m = mmap.mmap(self.fd, self.size, flags=mmap.MAP_SHARED, prot=prot)
        # A numpy array over read-only memory that numpy and torch accept without warnings; the
        # kernel, not a flag, keeps the bytes read-only. The ctypes buffer holds the mmap alive.
        addr = np.frombuffer(m, np.uint8).ctypes.data
        buf: Any = (ctypes.c_uint8 * self.size).from_address(addr)
        buf._mmap = m
        return np.frombuffer(buf, np.uint8)

    @property
    def ro(self) -> np.ndarray:
        if self._ro is None:
            self._ro = self._map(mmap.PROT_READ)
        return self._ro

    @property
    def rw(self) -> np.ndarray:
        if self._rw is None:
            self._rw = self._map(mmap.PROT_READ | mmap.PROT_WRITE)
        return self._rw

    def close(self) -> None:
        # The mappings go when the last array over them does; the fd can go now.
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def contains(self, t: torch.Tensor) -> bool:
        """Whether a tensor's bytes lie in the read-only mapping (a zero-copy view of the arena)."""
        if self._ro is None:
            return False
        base = self._ro.ctypes.data
        ptr = t.untyped_storage().data_ptr()
        return base <= ptr < base + self.size


@dataclass(slots=True)
class _Lease:
    lease: int
    key: str
    version: int
    storage: int
    finalizer: weakref.finalize


def dtype_name(x: Any) -> str:
    import torch

    name = str(x.dtype).removeprefix("torch.") if isinstance(x, torch.Tensor) else str(x.dtype)
    if name not in DTYPE_SIZES:
        raise InvalidRequest(f"dtype {name} cannot be stored (supported: {', '.join(DTYPE_SIZES)})")
    return name


def _storage_id(t: torch.Tensor) -> int:
    return int(t.untyped_storage()._cdata)


class Core:
    """State both clients share; subclasses add the transport (blocking or asyncio)."""

    def __init__(self) -> None:
        self._rid = 0
        self._pid = os.getpid()
        self.arena: Arena | None = None
        self.client_id = 0
        self.daemon_pid = 0
        self._leases: dict[int, _Lease] = {}
        self._by_storage: dict[int, list[int]] = {}
        self._collected: list[int] = []  # lease ids whose tensors were garbage-collected

    # -- bookkeeping -------------------------------------------------------------------------
    def _next_rid(self) -> int:
        self._rid += 1
        return self._rid

    def _check_fork(self) -> None:
        if os.getpid() != self._pid:
            raise ProtocolError(
                "this tierd client was created in another process (before a fork); make a new Client here"
            )

    @staticmethod
    def _hello() -> protocol.Hello:
        name = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "python"
        return protocol.Hello(protocol.PROTOCOL_VERSION, os.getpid(), name)

    def _welcome(self, reply: protocol.Msg, fds: list[int]) -> None:
        if isinstance(reply, protocol.Error):
            for fd in fds:
                os.close(fd)
            raise from_wire(reply.code, reply.message, reply.details)
        if not isinstance(reply, protocol.Welcome) or len(fds) != 1:
            for fd in fds:
                os.close(fd)
            raise ProtocolError("the daemon's WELCOME did not carry the arena")
        self.arena = Arena(fds[0], reply.arena_bytes)
        self.client_id = reply.client_id
        self.daemon_pid = reply.daemon_pid

    @staticmethod
    def _raise_if_error(reply: protocol.Msg) -> None:
        if isinstance(reply, protocol.Error):
            raise from_wire(reply.code, reply.message, reply.details)

    # -- put -------------------------------------------------------------------------------------
    def _put_msg(
        self, key: str, value: Any, tags: Any, durable: bool, codec: str | None, ttl: float | None, scope: str
    ) -> tuple[protocol.Put, Any]:
        import numpy as np
        import torch

        if isinstance(value, np.ndarray):
            if value.dtype.hasobject or value.dtype.kind in "USVMm":
                raise InvalidRequest(f"numpy dtype {value.dtype} cannot be stored")
        elif not isinstance(value, torch.Tensor):
            raise InvalidRequest(f"put takes a torch.Tensor or a numpy.ndarray, not {type(value).__name__}")
        if isinstance(value, torch.Tensor) and (value.is_sparse or value.layout != torch.strided):
            raise InvalidRequest("sparse tensors cannot be stored: call .to_dense() first")
        if isinstance(tags, str):
            tags = [tags]
        name = dtype_name(value)
        shape = [int(d) for d in value.shape]
        nbytes = int(np.prod(shape, dtype=np.int64)) * DTYPE_SIZES[name]
        msg = protocol.Put(
            self._next_rid(),
            key,
            name,
            shape,
            nbytes,
            [str(t) for t in (tags or [])],
            bool(durable),
            codec,
            None if ttl is None else float(ttl),
            scope,
        )
        return msg, value

    def _copy_in(self, offset: int, msg: protocol.Put, value: Any) -> None:
        import numpy as np
        import torch

        assert self.arena is not None
        region = self.arena.rw[offset : offset + msg.nbytes]
        if isinstance(value, np.ndarray):
            np.copyto(region.view(value.dtype).reshape(value.shape), value, casting="no")
        elif (
            value.device.type == "cpu"
            and value.is_contiguous()
            and not value.is_conj()
            and not value.is_neg()
        ):
            # one memcpy through byte views: as fast as numpy.copyto on one core, where torch's
            # copy_ runs at about half of that unless a second core is free (see bench/)
            src = value.detach().reshape(-1).view(torch.uint8).numpy()
            np.copyto(region, src)
        else:  # strided, other devices, lazily conjugated: torch knows how to lay these out
            dst = torch.from_numpy(region).view(_torch_dtype(msg.dtype)).view(msg.shape)
            dst.copy_(value.detach())

    # -- get -------------------------------------------------------------------------------------
    def _view(self, loc: protocol.Located) -> torch.Tensor:
        import torch

        assert self.arena is not None
        region = self.arena.ro[loc.offset : loc.offset + loc.nbytes]
        t = torch.from_numpy(region).view(_torch_dtype(loc.dtype)).view(loc.shape)
        sid = _storage_id(t)
        fin = weakref.finalize(region, self._collected.append, loc.lease)
        fin.atexit = False
        self._leases[loc.lease] = _Lease(loc.lease, loc.key, loc.version, sid, fin)
        self._by_storage.setdefault(sid, []).append(loc.lease)
        return t

    def _forget(self, lid: int) -> _Lease | None:
        lease = self._leases.pop(lid, None)
        if lease is None:
            return None
        lease.finalizer.detach()
        ids = self._by_storage.get(lease.storage)
        if ids is not None:
            ids.remove(lid)
            if not ids:
                del self._by_storage[lease.storage]
        return lease

    def _take_collected(self) -> list[int]:
        """Lease ids of collected tensors, removed from the table: to send as RELEASE."""
        if not self._collected:
            return []
        out = []
        while self._collected:
            lid = self._collected.pop()
            if self._forget(lid) is not None:
                out.append(lid)
        return out

    def _lease_ids_for(self, what: Any) -> list[int]:
        """Take the lease ids release(what) ends out of the table; NotLeased if there are none.

        ``what`` is a tensor from get, a key, a Handle, or a list / tuple of these (one frame). All
        items are checked before any lease is taken out, so a bad item leaves every lease in place.
        """
        items = list(what) if isinstance(what, list | tuple) else [what]
        ids: list[int] = []
        for item in items:
            ids += [lid for lid in self._leases_of(item) if lid not in ids]
        for lid in ids:
            self._forget(lid)
        return ids

    def _leases_of(self, what: Any) -> list[int]:
        import torch

        if isinstance(what, Handle | str):
            key, version = (what.key, what.version) if isinstance(what, Handle) else (what, 0)
            ids = [
                x.lease
                for x in list(self._leases.values())
                if x.key == key and (not version or x.version == version)
            ]
            if not ids:
                raise NotLeased(f"this client holds no lease on {what}", key=key)
            return ids
        if isinstance(what, torch.Tensor):
            found = self._by_storage.get(_storage_id(what))
            if not found:
                raise NotLeased(
                    "this tensor was not returned by get() on this client, or is already released"
                )
            return [found[-1]]
        raise InvalidRequest(
            f"release takes a tensor from get(), a key or a Handle, not {type(what).__name__}"
        )

    @property
    def lease_count(self) -> int:
        """Leases this client holds now (tensors from get not yet released or collected)."""
        return len(self._leases) - len(self._collected)

    def _drop_all_leases(self) -> None:
        for lid in list(self._leases):
            self._forget(lid)
        self._collected.clear()

    @staticmethod
    def _refs(keys: list[Any]) -> list[tuple[str, int]]:
        refs = []
        for k in keys:
            if isinstance(k, Handle):
                refs.append((k.key, k.version))
            elif isinstance(k, str):
                refs.append((k, 0))
            else:
                raise InvalidRequest(f"a key is a str or a Handle, not {type(k).__name__}")
        return refs
