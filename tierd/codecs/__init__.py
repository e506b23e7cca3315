"""Codecs: how a tensor's bytes are stored in the disk tier, chunk by chunk. numpy + zstandard only.

The contract
============

A tensor arrives as raw little-endian bytes (any C-contiguous buffer, typically a memoryview of
uint8), a dtype name (torch's, without "torch.": see ``tierd.protocol.DTYPE_SIZES``) and a shape
(list of ints; ``[]`` is a 0-d tensor, a 0 anywhere makes an empty one)::

    class Codec:                     # one instance per name, stateless (thread-safe)
        name: str                    # "raw" | "zstd" | "int8" | "bf16" | "fp16"
        lossless: bool
        def applies(self, dtype: str, shape: list[int]) -> bool
        def why_not(self, dtype: str, shape: list[int]) -> str | None    # the reason applies() is False
        def prepare(self, raw, dtype: str, shape: list[int], chunk_bytes: int) -> Plan
        def encode_chunk(self, plan: Plan, i: int, raw) -> bytes | memoryview  # raw = the whole tensor
        def decode_chunk(self, plan: Plan, i: int, stored, out) -> None         # out = the whole tensor

    @dataclass
    class Plan:
        codec: str; dtype: str; shape: list[int]; nbytes: int; n_chunks: int
        raw_chunk_bytes: int; params: dict; error_bound: float | None
        def span(self, i: int) -> tuple[int, int]     # (start, end) of chunk i in the raw bytes
        def to_dict(self) -> dict                     # msgpack-able: store it next to the chunks
        @classmethod
        def from_dict(cls, d: dict) -> Plan           # ValueError when malformed or inconsistent

Rules every codec keeps:

* ``prepare`` checks the input (dtype known, shape valid, ``len(raw)`` = size, the codec applies, and
  for some codecs the data itself: int8 needs finite values, fp16/bf16 refuse values that would
  overflow) and fixes the chunking. Everything that decode needs besides the chunk lives in the plan
  (``params`` holds only ints, floats, str, bytes, lists, dicts), so ``Plan.to_dict()`` persisted
  with the chunks is enough to decode after a restart.
* Chunk i covers the raw bytes ``plan.span(i)``. Chunk boundaries are multiples of the item size (for
  int8, of a whole quantization group: a row). Chunks are ``raw_chunk_bytes`` long (chunk_bytes
  rounded down to that unit, at least one unit), the last one shorter. An empty tensor has 0 chunks.
* ``encode_chunk(plan, i, raw)`` depends only on span i of raw and on the plan, and
  ``decode_chunk(plan, i, stored, out)`` writes exactly span i of ``out`` and nothing else, reading
  only that chunk and the plan: chunks encode and decode in any order, in parallel threads, and
  each one can be verified on its own. The codecs' numpy and zstandard work releases the GIL.
* ``encode_chunk`` may return a memoryview (raw: a slice of ``raw`` itself, no copy; downcasts and
  int8: a fresh array's bytes): store or copy it before ``raw`` changes.
* Decode restores the original dtype and shape: lossy codecs store fewer bits, never another dtype.
* ``Plan.error_bound``: None for lossless codecs (bit-exact round trip, every dtype). For lossy ones,
  the max error they state; what it is relative to is in the codec's docstring (int8: the absmax of
  the value's row; bf16/fp16: the value itself), with an absolute floor near zero in
  ``params["abs_floor"]``.
* Bad input raises ``ValueError`` with a message that says what was wrong (never a crash, and never
  a partial write outside the chunk's span).

The codecs
==========

``raw`` (every dtype), ``zstd`` (every dtype; level 1, byte shuffle for multi-byte dtypes; see
:mod:`tierd.codecs.zstd` for the measurements), ``int8`` (float32/float16/bfloat16 with >= 1 dims;
per-row absmax; :mod:`tierd.codecs.int8`), ``bf16`` and ``fp16`` (float32 only, stored at half size;
:mod:`tierd.codecs.downcast`). Which one an entry gets: :mod:`tierd.codecs.policy`.

Helpers: :func:`encode_all` / :func:`decode_all` run the chunks in a ThreadPoolExecutor (or inline
with ``pool=None``); :func:`encode` / :func:`decode` are the one-call forms.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import Executor

from tierd.codecs.base import DEFAULT_CHUNK_BYTES, Buffer, Chunk, Codec, Plan
from tierd.codecs.downcast import Bf16Codec, Fp16Codec
from tierd.codecs.int8 import Int8Codec
from tierd.codecs.raw import RawCodec
from tierd.codecs.zstd import ZstdCodec

__all__ = [
    "CODECS",
    "CODEC_NAMES",
    "DEFAULT_CHUNK_BYTES",
    "Buffer",
    "Chunk",
    "Codec",
    "Plan",
    "decode",
    "decode_all",
    "encode",
    "encode_all",
    "get_codec",
]

#: One stateless instance per codec, in the order tierctl lists them.
CODECS: list[Codec] = [RawCodec(), ZstdCodec(), Int8Codec(), Bf16Codec(), Fp16Codec()]
CODEC_NAMES: tuple[str, ...] = tuple(c.name for c in CODECS)
_BY_NAME: dict[str, Codec] = {c.name: c for c in CODECS}


def get_codec(name: str) -> Codec:
    """The codec called ``name``; ValueError listing the known names otherwise."""
    try:
        return _BY_NAME[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown codec {name!r}; known codecs: {', '.join(CODEC_NAMES)}") from None


def encode_all(codec: Codec, plan: Plan, raw: Buffer, pool: Executor | None = None) -> list[Chunk]:
    """Every chunk of ``raw`` encoded, in order; in ``pool``'s threads when one is given.

    zstd releases the GIL, so a ThreadPoolExecutor with one worker per core scales with the cores.
    """
    if pool is None or plan.n_chunks <= 1:
        return [codec.encode_chunk(plan, i, raw) for i in range(plan.n_chunks)]
    return list(pool.map(lambda i: codec.encode_chunk(plan, i, raw), range(plan.n_chunks)))


def decode_all(
    codec: Codec, plan: Plan, chunks: Sequence[Buffer], out: Buffer, pool: Executor | None = None
) -> None:
    """Decode every chunk into ``out`` (the whole tensor's bytes, writable); in ``pool`` if given."""
    if len(chunks) != plan.n_chunks:
        raise ValueError(f"got {len(chunks)} chunks, the plan has {plan.n_chunks}")
    if pool is None or plan.n_chunks <= 1:
        for i, c in enumerate(chunks):
            codec.decode_chunk(plan, i, c, out)
        return
    # list() so that the first exception (a ValueError from a bad chunk) is raised here
    list(pool.map(lambda i: codec.decode_chunk(plan, i, chunks[i], out), range(plan.n_chunks)))


def encode(
    name: str,
    raw: Buffer,
    dtype: str,
    shape: list[int],
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    pool: Executor | None = None,
) -> tuple[Plan, list[Chunk]]:
    """prepare + encode_all in one call."""
    codec = get_codec(name)
    plan = codec.prepare(raw, dtype, shape, chunk_bytes)
    return plan, encode_all(codec, plan, raw, pool)


def decode(plan: Plan, chunks: Sequence[Buffer], out: Buffer, pool: Executor | None = None) -> None:
    """decode_all with the plan's codec."""
    decode_all(get_codec(plan.codec), plan, chunks, out, pool)
