"""The codec contract: :class:`Plan`, the :class:`Codec` base class and the checks every codec shares.

See the package docstring (:mod:`tierd.codecs`) for the contract itself.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from tierd.protocol import DTYPE_SIZES

#: What a codec's input may be: the tensor's raw little-endian bytes (any C-contiguous buffer).
Buffer = bytes | bytearray | memoryview
#: What ``encode_chunk`` returns: a new ``bytes`` object, or a view (raw codec, downcasts) that the
#: caller must consume (store or copy) before the source buffer changes.
Chunk = bytes | memoryview

PLAN_VERSION = 1

#: Suggested raw chunk size for the disk tier: large enough that per-chunk overhead (a zstd frame,
#: an LMDB put, a thread hand-off) is noise, small enough that a write transaction stays short.
DEFAULT_CHUNK_BYTES = 4 << 20


def itemsize_of(dtype: str) -> int:
    """Item size of a tierd dtype name; ValueError listing the known names otherwise."""
    size = DTYPE_SIZES.get(dtype) if isinstance(dtype, str) else None
    if size is None:
        raise ValueError(f"unknown dtype {dtype!r}; known: {', '.join(sorted(DTYPE_SIZES))}")
    return size


def check_shape(shape: Any) -> list[int]:
    """A shape as a list of non-negative ints (a tuple is accepted), else ValueError."""
    if not isinstance(shape, list | tuple):
        raise ValueError(f"shape must be a list of ints, got {type(shape).__name__}")
    out: list[int] = []
    for d in shape:
        if isinstance(d, bool) or not isinstance(d, int | np.integer) or d < 0:
            raise ValueError(f"shape must hold non-negative ints, got {list(shape)!r}")
        out.append(int(d))
    return out


def nbytes_of(dtype: str, shape: list[int]) -> int:
    return math.prod(shape) * itemsize_of(dtype)


def as_u8(buf: Buffer, what: str, *, writable: bool = False) -> np.ndarray:
    """A flat uint8 numpy view of ``buf`` (no copy); ValueError if it is not a contiguous buffer."""
    try:
        arr = np.frombuffer(buf, dtype=np.uint8)
    except (TypeError, ValueError, BufferError) as exc:
        raise ValueError(f"{what} must be a contiguous bytes-like object: {exc}") from exc
    if writable and not arr.flags.writeable:
        raise ValueError(f"{what} must be writable (got a read-only buffer)")
    return arr


def as_byte_view(buf: Buffer, what: str) -> memoryview:
    """A flat unsigned-byte memoryview of ``buf`` (no copy); ValueError if it is not contiguous."""
    try:
        mv = memoryview(buf)
        return mv if mv.format == "B" and mv.ndim == 1 else mv.cast("B")
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{what} must be a contiguous bytes-like object: {exc}") from exc


def array_bytes(arr: np.ndarray) -> memoryview:
    """The bytes of a C-contiguous numpy array as a flat memoryview (no copy)."""
    return arr.data.cast("B")


@dataclass
class Plan:
    """How one tensor is cut into chunks and encoded; everything decode needs besides the chunks.

    ``params`` and every other field hold only msgpack-able values (ints, floats, str, bytes, lists,
    dicts of those), so ``to_dict()`` can be stored next to the chunks and read back by
    ``from_dict()`` after a restart.
    """

    codec: str
    dtype: str
    shape: list[int]
    nbytes: int
    n_chunks: int
    raw_chunk_bytes: int
    params: dict[str, Any] = field(default_factory=dict)
    #: Max error stated by a lossy codec (see the codec's docstring for what it is relative to);
    #: None for lossless codecs.
    error_bound: float | None = None

    def span(self, i: int) -> tuple[int, int]:
        """(start, end) of chunk ``i`` in the tensor's raw bytes."""
        if isinstance(i, bool) or not isinstance(i, int | np.integer) or not 0 <= i < self.n_chunks:
            raise ValueError(f"chunk index {i!r} out of range: this plan has {self.n_chunks} chunks")
        start = int(i) * self.raw_chunk_bytes
        return start, min(self.nbytes, start + self.raw_chunk_bytes)

    def to_dict(self) -> dict[str, Any]:
        return {
            "v": PLAN_VERSION,
            "codec": self.codec,
            "dtype": self.dtype,
            "shape": list(self.shape),
            "nbytes": self.nbytes,
            "n_chunks": self.n_chunks,
            "raw_chunk_bytes": self.raw_chunk_bytes,
            "params": dict(self.params),
            "error_bound": self.error_bound,
        }

    @classmethod
    def from_dict(cls, d: Any) -> Plan:
        """Inverse of :meth:`to_dict`; ValueError for anything malformed or inconsistent."""
        if not isinstance(d, dict):
            raise ValueError(f"a plan must be a dict, got {type(d).__name__}")
        if d.get("v", PLAN_VERSION) != PLAN_VERSION:
            raise ValueError(
                f"plan version {d.get('v')!r} is not supported (this tierd reads {PLAN_VERSION})"
            )
        try:
            codec, dtype, shape = d["codec"], d["dtype"], d["shape"]
            nbytes, n_chunks, rcb = d["nbytes"], d["n_chunks"], d["raw_chunk_bytes"]
            params, bound = d.get("params", {}), d.get("error_bound")
        except KeyError as exc:
            raise ValueError(f"plan is missing field {exc.args[0]!r}") from exc
        if not isinstance(codec, str):
            raise ValueError(f"plan codec must be a str, got {codec!r}")
        itemsize_of(dtype)
        shape = check_shape(shape)
        for name, v in (("nbytes", nbytes), ("n_chunks", n_chunks), ("raw_chunk_bytes", rcb)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"plan {name} must be a non-negative int, got {v!r}")
        if not isinstance(params, dict):
            raise ValueError(f"plan params must be a dict, got {type(params).__name__}")
        if bound is not None and (isinstance(bound, bool) or not isinstance(bound, int | float)):
            raise ValueError(f"plan error_bound must be a float or None, got {bound!r}")
        plan = cls(
            codec, dtype, shape, nbytes, n_chunks, rcb, dict(params), None if bound is None else float(bound)
        )
        plan.check()
        return plan

    def check(self) -> None:
        """ValueError unless the sizes agree with each other (dtype x shape, chunk count)."""
        want = nbytes_of(self.dtype, self.shape)
        if self.nbytes != want:
            raise ValueError(f"plan nbytes {self.nbytes} != {self.dtype}{self.shape} = {want} bytes")
        if self.nbytes and self.raw_chunk_bytes <= 0:
            raise ValueError("plan raw_chunk_bytes must be positive")
        if self.raw_chunk_bytes % itemsize_of(self.dtype):
            raise ValueError(
                f"plan raw_chunk_bytes {self.raw_chunk_bytes} is not a multiple of the item size"
            )
        n = -(-self.nbytes // self.raw_chunk_bytes) if self.nbytes else 0
        if self.n_chunks != n:
            raise ValueError(f"plan n_chunks {self.n_chunks} != {n} for {self.nbytes} bytes")


class Codec:
    """Base class of the codecs; one stateless instance per name (see :mod:`tierd.codecs`)."""

    name: ClassVar[str] = ""
    lossless: ClassVar[bool] = True

    # ---- what subclasses provide -------------------------------------------------------------
    def why_not(self, dtype: str, shape: list[int]) -> str | None:
        """None when the codec applies to (dtype, shape), else a short reason why not."""
        return None

    def prepare(self, raw: Buffer, dtype: str, shape: list[int], chunk_bytes: int) -> Plan:
        raise NotImplementedError

    def encode_chunk(self, plan: Plan, i: int, raw: Buffer) -> Chunk:
        raise NotImplementedError

    def decode_chunk(self, plan: Plan, i: int, stored: Buffer, out: Buffer) -> None:
        raise NotImplementedError

    # ---- shared ------------------------------------------------------------------------------
    def applies(self, dtype: str, shape: list[int]) -> bool:
        return self.why_not(dtype, shape) is None

    def __repr__(self) -> str:
        return f"<codec {self.name}>"

    def _check_prepare(
        self, raw: Buffer, dtype: str, shape: list[int], chunk_bytes: int
    ) -> tuple[np.ndarray, list[int], int]:
        """Validate prepare()'s inputs: (u8 view of raw, shape as list, item size)."""
        size = itemsize_of(dtype)
        shape = check_shape(shape)
        why = self.why_not(dtype, shape)
        if why is not None:
            raise ValueError(f"codec {self.name!r} does not apply to {dtype}{shape}: {why}")
        if isinstance(chunk_bytes, bool) or not isinstance(chunk_bytes, int | np.integer) or chunk_bytes < 1:
            raise ValueError(f"chunk_bytes must be a positive int, got {chunk_bytes!r}")
        u8 = as_u8(raw, "raw")
        want = math.prod(shape) * size
        if u8.size != want:
            raise ValueError(f"raw holds {u8.size} bytes but {dtype}{shape} needs {want}")
        return u8, shape, size

    def _plan(
        self,
        dtype: str,
        shape: list[int],
        nbytes: int,
        raw_chunk_bytes: int,
        params: dict[str, Any] | None = None,
        error_bound: float | None = None,
    ) -> Plan:
        n = -(-nbytes // raw_chunk_bytes) if nbytes else 0
        return Plan(self.name, dtype, shape, nbytes, n, raw_chunk_bytes, params or {}, error_bound)

    def _check_plan(self, plan: Plan) -> None:
        if not isinstance(plan, Plan):
            raise ValueError(f"expected a Plan, got {type(plan).__name__}")
        if plan.codec != self.name:
            raise ValueError(f"plan is for codec {plan.codec!r}, not {self.name!r}")

    def _src(self, plan: Plan, i: int, raw: Buffer) -> tuple[np.ndarray, int, int]:
        """(u8 view of chunk i's raw bytes, start, end), with the checks encode_chunk needs."""
        self._check_plan(plan)
        start, end = plan.span(i)
        u8 = as_u8(raw, "raw")
        if u8.size != plan.nbytes:
            raise ValueError(f"raw holds {u8.size} bytes but the plan is for {plan.nbytes}")
        return u8[start:end], start, end

    def _dst(self, plan: Plan, i: int, out: Buffer) -> tuple[np.ndarray, int, int]:
        """(writable u8 view of chunk i's span in out, start, end), with the checks decode needs."""
        self._check_plan(plan)
        start, end = plan.span(i)
        u8 = as_u8(out, "out", writable=True)
        if u8.size != plan.nbytes:
            raise ValueError(f"out holds {u8.size} bytes but the plan is for {plan.nbytes}")
        return u8[start:end], start, end


def round_chunk(chunk_bytes: int, unit: int) -> int:
    """chunk_bytes rounded down to a multiple of unit, at least one unit."""
    return max(unit, chunk_bytes // unit * unit)
