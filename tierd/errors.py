"""Typed errors shared by the daemon and its clients.

Each error has a wire ``code``; the daemon replies with ``(code, message, details)`` and the client
raises the matching class, so ``except TierFull`` works across the socket. The docstring of each
class says whether the caller can recover; callers catch these, never a bare ``Exception``.
"""

from __future__ import annotations

from typing import Any, ClassVar


class TierdError(Exception):
    """Base of every error tierd raises. ``details`` carries the numbers behind the message."""

    code: ClassVar[str] = "error"
    recoverable: ClassVar[bool] = True

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.details = details

    def to_wire(self) -> tuple[str, str, dict[str, Any]]:
        return self.code, self.message, self.details


class DaemonUnavailable(TierdError):
    """No daemon answers at the socket, or the connection to it was lost.

    Recoverable by the caller only by starting tierd (or waiting for systemd to restart it) and
    opening a new Client; leases of the lost connection are gone.
    """

    code = "unavailable"
    recoverable = False


class DaemonTimeout(DaemonUnavailable):
    """The daemon did not answer within the client's ``timeout``. Not recoverable on this connection:
    the client closes it (a late reply could not be matched safely), so its leases end. The call
    that timed out may or may not have taken effect; open a new Client to go on."""

    code = "timeout"


class ProtocolError(TierdError):
    """The peer sent something that is not valid tierd protocol. Not recoverable on this connection."""

    code = "protocol"
    recoverable = False


class VersionMismatch(ProtocolError):
    """Client and daemon speak different protocol versions: upgrade one of them. Not recoverable."""

    code = "version"


class InvalidRequest(TierdError):
    """A well-formed request with a bad argument (key, dtype, shape, size). Recoverable: fix the call."""

    code = "invalid"


class NotFound(TierdError):
    """No such key (or handle version). Recoverable: nothing changed."""

    code = "not_found"


class TierFull(TierdError):
    """No tier can take the bytes. ``details``: tier, requested_bytes, free_bytes, largest_free_bytes.

    Recoverable: release or delete entries, or ask for less; nothing existing was touched.
    """

    code = "tier_full"


class NotLeased(TierdError):
    """release() of a tensor, key or lease this client does not hold. Recoverable: nothing changed."""

    code = "not_leased"


class Unsupported(TierdError):
    """The daemon is not configured for this (e.g. durable=True with no disk tier). Recoverable."""

    code = "unsupported"


class StorageError(TierdError):
    """A tier's device failed a read or write for a reason other than running out of room (an I/O
    error). Recoverable: the request had no effect (a durable put is not durable: abort it or put it
    again without durable=True); the daemon goes on, but the device may need attention."""

    code = "storage"


class Forbidden(TierdError):
    """The key belongs to another uid (a uid is a trust domain): only that uid, root and the
    daemon's own uid may put a new version of it, delete, evict, pin or unpin it. Reading is open
    to every uid the daemon serves. Nothing changed."""

    code = "forbidden"


class CorruptEntry(TierdError):
    """An entry's stored bytes fail their checksum: it is not served. Recoverable only by deleting
    and putting it again; every other entry is unaffected."""

    code = "corrupt"
    recoverable = False


class GpuImportError(TierdError):
    """This process cannot import the daemon's GPU slabs (no cuda-bindings, a driver without POSIX
    fd export, another device): raised in the client, naming the driver call and its error; the
    daemon is unaffected. Not recoverable in this process: read from RAM (tier=None) instead."""

    code = "gpu_import"
    recoverable = False


ERRORS_BY_CODE: dict[str, type[TierdError]] = {
    cls.code: cls
    for cls in (
        TierdError,
        DaemonUnavailable,
        DaemonTimeout,
        ProtocolError,
        VersionMismatch,
        InvalidRequest,
        NotFound,
        TierFull,
        NotLeased,
        Unsupported,
        StorageError,
        Forbidden,
        CorruptEntry,
        GpuImportError,
    )
}


def from_wire(code: str, message: str, details: dict[str, Any] | None) -> TierdError:
    cls = ERRORS_BY_CODE.get(code, TierdError)
    return cls(message, **(details or {}))
