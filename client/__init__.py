"""tierd_client: talk to a tierd daemon; tensors by handle, bytes through shared memory.

>>> from tierd_client import Client
>>> with Client() as c:
...     c.put("demo/w", torch.randn(4096, 4096))
...     t = c.get("demo/w")      # zero-copy, read-only view of the daemon's RAM tier
...     c.release(t)
"""

from tierd.errors import (
    CorruptEntry,
    DaemonTimeout,
    DaemonUnavailable,
    Forbidden,
    GpuImportError,
    InvalidRequest,
    NotFound,
    NotLeased,
    ProtocolError,
    StorageError,
    TierdError,
    TierFull,
    Unsupported,
    VersionMismatch,
)
from tierd_client.aio import AsyncClient
from tierd_client.arena import Handle
from tierd_client.client import Client

__all__ = [
    "AsyncClient",
    "Client",
    "CorruptEntry",
    "DaemonTimeout",
    "DaemonUnavailable",
    "Forbidden",
    "GpuImportError",
    "Handle",
    "InvalidRequest",
    "NotFound",
    "NotLeased",
    "ProtocolError",
    "StorageError",
    "TierFull",
    "TierdError",
    "Unsupported",
    "VersionMismatch",
]
