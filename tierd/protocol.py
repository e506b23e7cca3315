"""The tierd wire protocol: typed messages in length-prefixed frames, no pickle, and its framing.

Frame layout (all integers little-endian)::

    +----------------+--------+---------------------------+
    | length: uint32 | type:u8| payload: msgpack (length) |
    +----------------+--------+---------------------------+

``length`` counts the payload only. ``type`` picks the message class, and the payload is decoded
straight into it by msgspec, which validates every field: a frame that does not fit its type is an
``invalid`` error, never a crash. Tensor bytes never appear in a frame: only (dtype, shape, offset)
cross the socket; the bytes stay in the RAM tier's arenas, memfds (one per uid) the daemon sends
with SCM_RIGHTS in its reply to HELLO (file descriptors travel beside the bytes, never inside a
frame): the client's own uid's read-write, the others' read-only. A client that meets an arena made
after it connected (a reply names its ``space``) fetches the fds again with HELLO(arenas_only).

A connection goes: HELLO -> WELCOME (+ the arenas' fds) -> requests. Every request but RELEASE carries a
request id ``rid`` echoed by its reply (an ``Ok``, ``PutReady``, ``Got`` or ``Error``); RELEASE is
one-way so a get + release costs one round trip. Messages on one connection are handled in order.

put is two steps: PUT reserves a region (the entry is invisible to everyone), the client copies its
bytes into the arena, SEAL publishes it as the key's newest version. A client that dies between the
two leaves nothing behind.

Framing is written once, here, and does no I/O (in the manner of h11): the daemon's connection and
both clients own a socket and pass what they read to a :class:`FrameReader`; what they send is
:func:`encode` of a message (the writer: stateless, one frame per message). The reader's states::

    HEADER --(5 header bytes buffered; length <= limit)--> PAYLOAD
    PAYLOAD --(length payload bytes buffered)------------> HEADER, one frame out
    HEADER --(a length prefix over the limit)------------> BROKEN (ProtocolError; nothing more is read)

Each side picks its limit: the daemon ``MAX_REQUEST_BYTES``, a client ``MAX_REPLY_BYTES``. The reader
copies a payload at most once: a frame wholly inside one fed chunk comes out as a memoryview of that
chunk (no copy); a frame split across chunks is assembled in a buffer (one copy), which is handed
over as the payload when the frame ends it, and copied out only when more bytes follow in it.
"""

from __future__ import annotations

import struct
from typing import Any

import msgspec

from tierd.errors import ProtocolError

PROTOCOL_VERSION = 2
HEADER = struct.Struct("<IB")
HEADER_SIZE = HEADER.size
#: Largest request payload the daemon accepts; a bigger length prefix closes the connection.
MAX_REQUEST_BYTES = 16 << 20
#: Largest reply payload a client accepts (an ``ls`` of a very large table).
MAX_REPLY_BYTES = 512 << 20
MAX_KEY_BYTES = 1024
#: Most RAM arenas (uids) a daemon serves: a WELCOME carries at most this many fds.
MAX_ARENAS = 64
#: Most GPU slabs a daemon holds: a WELCOME's fds (arenas, slabs, an event table) stay under the
#: kernel's 253 per message.
MAX_SLABS = 128

#: Every dtype an entry can have, with its item size in bytes. Names are torch's, without "torch.".
DTYPE_SIZES: dict[str, int] = {
    "float64": 8,
    "float32": 4,
    "float16": 2,
    "bfloat16": 2,
    "complex128": 16,
    "complex64": 8,
    "complex32": 4,
    "int64": 8,
    "int32": 4,
    "int16": 2,
    "int8": 1,
    "uint64": 8,
    "uint32": 4,
    "uint16": 2,
    "uint8": 1,
    "bool": 1,
    "float8_e4m3fn": 1,
    "float8_e4m3fnuz": 1,
    "float8_e5m2": 1,
    "float8_e5m2fnuz": 1,
    "float8_e8m0fnu": 1,
    "float4_e2m1fn_x2": 1,
}

SCOPES = ("shared", "client")


class Msg(msgspec.Struct, array_like=True):
    """Base of all messages; each subclass has a one-byte ``TYPE``."""


# ---- client -> daemon -------------------------------------------------------------------------


class Hello(Msg):
    version: int
    pid: int
    name: str = ""
    #: only fetch the arenas' fds (a client meets an arena made after it connected): the daemon
    #: answers WELCOME with them and closes; no client is registered
    arenas_only: bool = False


class Put(Msg):
    rid: int
    key: str
    dtype: str
    shape: list[int]
    nbytes: int
    tags: list[str] = []
    durable: bool = False
    codec: str | None = None
    ttl: float | None = None
    scope: str = "shared"
    #: also write it to the remote tier, where other machines' daemons find it (needs --remote)
    share: bool = False
    #: with share: written to the remote tier BEFORE it is sealed here (the client's
    #: durable="remote"): the SEAL answers once the cluster holds it, or fails with the remote's error
    share_first: bool = False


class Seal(Msg):
    rid: int
    put_id: int
    #: also give the new version a copy in this tier above RAM ("gpu": a put of a CUDA tensor),
    #: when it has room; "" = none
    tier: str = ""


class Abort(Msg):
    rid: int
    put_id: int


class Get(Msg):
    rid: int
    #: (key, version) pairs; version 0 means "the newest sealed version".
    refs: list[tuple[str, int]]
    #: the memory tier to lease in: "" = the home tier (RAM); "gpu" promotes there first
    tier: str = ""


class Release(Msg):
    """One-way: no reply. Lease ids this connection does not hold are ignored and counted."""

    leases: list[int]


class Delete(Msg):
    rid: int
    key: str


class Pin(Msg):
    rid: int
    key: str
    tier: str = "ram"


class Unpin(Msg):
    rid: int
    key: str


#: ls pages: the default size, and the most one request may ask for (an entry's info is at most
#: ~17 KiB with 64 tags of 256 characters, so a page stays a few MiB at worst)
LS_PAGE = 256
LS_PAGE_MAX = 1024


class Ls(Msg):
    """One page of the entries whose key starts with ``prefix``, in key order, keys after ``after``;
    at most ``limit`` of them (0: the daemon's default page; it caps the page size). ``remote``: the
    entries the remote tier holds instead of this daemon's own."""

    rid: int
    prefix: str = ""
    after: str = ""
    limit: int = 0
    remote: bool = False


class Stat(Msg):
    rid: int
    key: str


class Status(Msg):
    rid: int


class Prefetch(Msg):
    rid: int
    keys: list[str]


class Evict(Msg):
    """Push an entry's bytes down a tier (to disk), keeping it readable."""

    rid: int
    key: str


class Trace(Msg):
    """Accesses from the daemon's log after ``since`` (seconds on the log's clock), at most ``limit``."""

    rid: int
    since: float = -1.0
    limit: int = 100_000


class Why(Msg):
    """Where the current version of ``key`` is and why: tiers, leases, pins, eviction rank,
    prediction, codec (``tierctl why``)."""

    rid: int
    key: str


class Verify(Msg):
    """Read every disk copy under ``prefix`` and check its checksums."""

    rid: int
    prefix: str = ""


# ---- daemon -> client -------------------------------------------------------------------------


class ArenaInfo(Msg):
    """One arena of the RAM tier as a client gets it: its fd is the one at the same index of the
    WELCOME's SCM_RIGHTS. ``writable``: the client's own uid's arena (the fd is O_RDWR); every other
    arena comes O_RDONLY. ``backed``: pre-faulted by the daemon (map it with MAP_POPULATE)."""

    space: int
    nbytes: int
    writable: bool
    backed: bool


class GpuInfo(Msg):
    """The GPU tier as a client gets it: its backend ("cuda", "simulated"), device index, every
    slab (read-only; ``space`` = the slab's generation) and whether one more fd follows the slabs'
    (the simulated device's event table). The fds come after the arenas', in this order."""

    backend: str
    device: int
    slabs: list[ArenaInfo]
    events: bool


class Welcome(Msg):
    version: int
    daemon_pid: int
    client_id: int
    daemon_version: str
    arenas: list[ArenaInfo]
    gpu: GpuInfo | None = None


class PutReady(Msg):
    rid: int
    put_id: int
    offset: int
    version: int
    #: the arena the region is in (always the putting client's own)
    space: int


class Located(Msg):
    """Where one leased entry's bytes are: a region of an arena (``space``) of the RAM tier."""

    key: str
    version: int
    dtype: str
    shape: list[int]
    offset: int
    nbytes: int
    lease: int
    space: int
    #: what to wait on before reading (a GPU copy in flight; opaque to all but the device's
    #: client half, tierd_client.gpu); empty when the bytes are there
    event: bytes = b""


class Got(Msg):
    rid: int
    items: list[Located]


class Ok(Msg):
    rid: int
    value: Any = None


class Error(Msg):
    rid: int
    code: str
    message: str
    details: dict[str, Any] = {}


HELLO, WELCOME = 0x01, 0x81
PUT, SEAL, ABORT, GET, RELEASE = 0x10, 0x11, 0x12, 0x20, 0x21
DELETE, PIN, UNPIN, LS, STAT, STATUS, PREFETCH = 0x30, 0x31, 0x32, 0x40, 0x41, 0x42, 0x50
EVICT, VERIFY, TRACE, WHY = 0x33, 0x43, 0x44, 0x45
PUT_READY, GOT, OK, ERROR = 0x90, 0xA0, 0x91, 0xFF

REQUEST_TYPES: dict[int, type[Msg]] = {
    HELLO: Hello,
    PUT: Put,
    SEAL: Seal,
    ABORT: Abort,
    GET: Get,
    RELEASE: Release,
    DELETE: Delete,
    PIN: Pin,
    UNPIN: Unpin,
    LS: Ls,
    STAT: Stat,
    STATUS: Status,
    PREFETCH: Prefetch,
    EVICT: Evict,
    VERIFY: Verify,
    TRACE: Trace,
    WHY: Why,
}
REPLY_TYPES: dict[int, type[Msg]] = {WELCOME: Welcome, PUT_READY: PutReady, GOT: Got, OK: Ok, ERROR: Error}
TYPE_OF: dict[type[Msg], int] = {cls: t for t, cls in (REQUEST_TYPES | REPLY_TYPES).items()}

_encoder = msgspec.msgpack.Encoder()
REQUEST_DECODERS = {t: msgspec.msgpack.Decoder(cls) for t, cls in REQUEST_TYPES.items()}
REPLY_DECODERS = {t: msgspec.msgpack.Decoder(cls) for t, cls in REPLY_TYPES.items()}
DecodeError = msgspec.DecodeError  # ValidationError is a subclass


def encode(msg: Msg) -> bytes:
    """The framing's writer: one whole frame (header + payload) for ``msg``."""
    payload = _encoder.encode(msg)
    return HEADER.pack(len(payload), TYPE_OF[type(msg)]) + payload


def decode_reply(mtype: int, payload: bytes | memoryview) -> Msg:
    """A reply frame's message; DecodeError for an unknown type or a payload that does not fit it."""
    dec = REPLY_DECODERS.get(mtype)
    if dec is None:
        raise msgspec.DecodeError(f"unknown reply type 0x{mtype:02x}")
    return dec.decode(payload)


class FrameReader:
    """The framing's reader: fed bytes as they arrive, gives back whole frames ``(type, payload)``.

    ``feed(data)`` then ``next_frame()`` until it returns None (a frame is not all there yet). A
    length prefix over ``max_payload`` raises ProtocolError and leaves the reader BROKEN: the stream
    cannot be re-synchronised, so the caller closes the connection. A payload is a memoryview of a
    fed chunk, of a buffer the reader has let go of, or a bytes copy: it stays valid and unchanged
    after later feeds.
    """

    __slots__ = ("_buf", "_pos", "broken", "max_payload")

    def __init__(self, max_payload: int) -> None:
        self.max_payload = max_payload
        #: the bytes not yet cut into frames are ``_buf[_pos:]``: a fed chunk as is (bytes, read
        #: in place) or, once a frame spans chunks, a bytearray that the next chunks are appended to
        self._buf: bytes | bytearray = b""
        self._pos = 0
        self.broken = False

    @property
    def buffered(self) -> int:
        """Bytes fed and not yet returned as frames (a partial frame)."""
        return len(self._buf) - self._pos

    @property
    def state(self) -> str:
        """``HEADER``, ``PAYLOAD`` or ``BROKEN`` (see the module docstring)."""
        if self.broken:
            return "BROKEN"
        return "PAYLOAD" if self.buffered >= HEADER_SIZE else "HEADER"

    def feed(self, data: bytes) -> None:
        """Add bytes read from the peer (a ``bytes`` chunk; it is kept, never changed)."""
        if self.broken:
            raise ProtocolError("the frame reader is broken: the connection must close")
        if not data:
            return
        buf, pos = self._buf, self._pos
        if pos >= len(buf):  # everything before was consumed: read the new chunk in place
            self._buf, self._pos = data, 0
        elif isinstance(buf, bytearray):
            if pos:
                del buf[:pos]  # cheap: CPython moves a bytearray's start for a prefix delete
                self._pos = 0
            buf += data
        else:  # the tail of an earlier chunk plus this one: assemble them
            tail = bytearray(memoryview(buf)[pos:])
            tail += data
            self._buf, self._pos = tail, 0

    def next_frame(self) -> tuple[int, bytes | memoryview] | None:
        """The next whole frame as (type, payload), or None until more bytes are fed."""
        buf, pos = self._buf, self._pos
        if len(buf) - pos < HEADER_SIZE:
            return None
        length, mtype = HEADER.unpack_from(buf, pos)
        if length > self.max_payload:
            self.broken = True
            raise ProtocolError(f"frame of {length} bytes exceeds the {self.max_payload}-byte limit")
        start = pos + HEADER_SIZE
        end = start + length
        if end > len(buf):
            return None
        self._pos = end
        payload: bytes | memoryview
        if end == len(buf):  # all consumed: let go of the chunk (or hand the assembly buffer over)
            payload = memoryview(buf)[start:end]
            self._buf, self._pos = b"", 0
        elif isinstance(buf, bytes):
            payload = memoryview(buf)[start:end]
        else:  # more follows in the assembly buffer, which will be resized: copy this frame out
            with memoryview(buf) as view:
                payload = bytes(view[start:end])
        return mtype, payload


def check_key(key: str) -> str | None:
    """Why ``key`` is not a valid entry key, or None when it is ("namespace/name")."""
    if not isinstance(key, str) or not key:
        return "a key must be a non-empty string"
    if len(key.encode("utf-8", "surrogatepass")) > MAX_KEY_BYTES:
        return f"a key must be at most {MAX_KEY_BYTES} bytes"
    ns, sep, name = key.partition("/")
    if not sep or not ns or not name:
        return f"key {key!r} must look like 'namespace/name'"
    if "\x00" in key:
        return "a key must not contain NUL"
    return None
