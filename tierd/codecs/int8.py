"""int8: symmetric absmax quantization with one float32 scale per output channel (row). Lossy.

Applies to float32 / float16 / bfloat16 tensors with at least one dimension.

Groups (the values that share one scale):
  * >= 2 dims: one group per output channel, i.e. per row of the 2-D view [shape[0], -1].
  * 1 dim: groups of ``GROUP_1D`` (4096) consecutive values, the last one possibly shorter. A 1-D
    tensor (bias, norm weight) is small; per-block scales keep one outlier from costing the whole
    tensor its precision, and a big 1-D tensor still splits into many chunks.
  * 0 dims: does not apply (nothing to save on one value).

For a group with absmax A: scale = A / 127 (float32), q = rint(x / scale) in [-127, 127] (int8), and
decode gives q * scale in float32, then rounded (to nearest even) to the original dtype, which decode
restores (bf16 by bit manipulation). All scales live in ``params["scales"]`` (float32 little-endian
bytes), so chunk i decodes on its own. A chunk is a whole number of groups; when one group is larger
than chunk_bytes, a chunk is one group.

Stated error, for every value x of a group with absmax A (``plan.error_bound`` = e, and
``params["abs_floor"]`` = f)::

    |x - decode(x)| <= e * A + f,     e = 0.5/127 + u + 2**-20

where 0.5/127 (~0.003937) is the rounding to the int8 grid, u the unit roundoff of the output dtype
(0 for float32, 2**-11 for float16, 2**-8 for bfloat16; the bf16 term is as large as the int8 one,
so bf16 output has e ~ 0.00785), and 2**-20 covers float32 arithmetic (x / scale, q * scale). f is
an absolute floor for values near zero where the output dtype has no relative precision left:
half float16's smallest subnormal (2**-25) for float16 output, 2**-120 for float32 / bfloat16
(groups whose scale is subnormal in float32). Values must be finite: prepare() refuses inf and NaN.
"""

from __future__ import annotations

import numpy as np

from tierd.codecs._bits import F16, F32, U16, f32_to_bf16, to_f32
from tierd.codecs.base import Buffer, Chunk, Codec, Plan, array_bytes, as_u8

GROUP_1D = 4096
_FLOATS = ("float32", "float16", "bfloat16")
_UNIT_ROUNDOFF = {"float32": 0.0, "float16": 2.0**-11, "bfloat16": 2.0**-8}
_ABS_FLOOR = {"float32": 2.0**-120, "float16": 2.0**-25, "bfloat16": 2.0**-120}
#: Scales below this give reciprocals that overflow float32: those groups are done in float64.
_TINY_SCALE = np.float32(2.0**-125)
_BLOCK = 1 << 20  # elements per pass when scanning a whole tensor


def error_bound(dtype: str) -> float:
    """The int8 codec's stated max error relative to the group absmax, for this output dtype."""
    return 0.5 / 127 + _UNIT_ROUNDOFF[dtype] + 2.0**-20


def group_size(shape: list[int]) -> int:
    if len(shape) >= 2:
        g = 1
        for d in shape[1:]:
            g *= d
        return g
    return GROUP_1D


class Int8Codec(Codec):
    name = "int8"
    lossless = False

    def why_not(self, dtype: str, shape: list[int]) -> str | None:
        if dtype not in _FLOATS:
            return f"int8 quantizes float32/float16/bfloat16 tensors, not {dtype}"
        if len(shape) == 0:
            return "int8 needs at least one dimension (a 0-d tensor has nothing to save)"
        return None

    def prepare(self, raw: Buffer, dtype: str, shape: list[int], chunk_bytes: int) -> Plan:
        u8, shape, size = self._check_prepare(raw, dtype, shape, chunk_bytes)
        g = group_size(shape)
        n = u8.size // size
        n_groups = -(-n // g) if n and g else 0
        absmax = np.zeros(n_groups, F32)
        # scan whole groups in blocks of about _BLOCK elements (bounded temporaries)
        groups_per_pass = max(1, _BLOCK // max(g, 1))
        for r0 in range(0, n_groups, groups_per_pass):
            r1 = min(n_groups, r0 + groups_per_pass)
            x = to_f32(u8[r0 * g * size : min(n, r1 * g) * size], dtype)
            _group_absmax(x, g, absmax[r0:r1])
        if not np.isfinite(absmax).all():
            bad = int(np.flatnonzero(~np.isfinite(absmax))[0])
            raise ValueError(f"int8 needs finite values: group {bad} holds inf or NaN")
        scales = (absmax / np.float32(127)).astype(F32)
        with np.errstate(over="ignore"):
            over = ~np.isfinite(scales * np.float32(127))  # 127 * scale must not round up to inf
        scales[over] = np.nextafter(scales[over], np.float32(0))
        group_bytes = max(g, 1) * size
        rows_per_chunk = max(1, chunk_bytes // group_bytes)
        params = {
            "group": g,
            "scales": scales.astype("<f4").tobytes(),
            "abs_floor": _ABS_FLOOR[dtype],
        }
        return self._plan(dtype, shape, u8.size, rows_per_chunk * group_bytes, params, error_bound(dtype))

    @staticmethod
    def _params(plan: Plan) -> tuple[int, np.ndarray]:
        g, sc = plan.params.get("group"), plan.params.get("scales")
        if not isinstance(g, int) or g < 0 or not isinstance(sc, bytes) or len(sc) % 4:
            raise ValueError("bad int8 plan params (need int 'group' and float32 'scales' bytes)")
        scales = np.frombuffer(sc, F32)
        size = 2 if plan.dtype != "float32" else 4
        n = plan.nbytes // size
        if scales.size != (-(-n // g) if n and g else 0) or (g and plan.raw_chunk_bytes % (g * size)):
            raise ValueError("int8 plan params do not match the tensor's shape")
        return g, scales

    def encode_chunk(self, plan: Plan, i: int, raw: Buffer) -> Chunk:
        src, start, _ = self._src(plan, i, raw)
        g, scales = self._params(plan)
        size = 4 if plan.dtype == "float32" else 2
        x = to_f32(src, plan.dtype)
        r0 = start // size // g
        sc = scales[r0 : r0 + -(-x.size // g)]
        q = np.empty(x.size, np.int8)
        if sc.size and sc.min() < _TINY_SCALE:
            _quantize(x.astype(np.float64), g, sc.astype(np.float64), q)
        else:
            _quantize(x, g, sc, q)
        return array_bytes(q)

    def decode_chunk(self, plan: Plan, i: int, stored: Buffer, out: Buffer) -> None:
        dst, start, end = self._dst(plan, i, out)
        g, scales = self._params(plan)
        size = 4 if plan.dtype == "float32" else 2
        q = as_u8(stored, "stored chunk").view(np.int8)
        n = (end - start) // size
        if q.size != n:
            raise ValueError(f"int8 chunk {i}: stored {q.size} values, expected {n}")
        r0 = start // size // g
        sc = scales[r0 : r0 + -(-n // g)]
        if plan.dtype == "float32":
            _dequantize(q, g, sc, dst.view(F32))
        elif plan.dtype == "float16":
            _dequantize(q, g, sc, dst.view(F16))  # multiply in float32, round once to float16
        else:
            tmp = np.empty(n, F32)
            _dequantize(q, g, sc, tmp)
            f32_to_bf16(tmp, out=dst.view(U16))


def _split(n: int, g: int) -> tuple[int, int]:
    """(full groups, length of the trailing partial group) of n values in groups of g."""
    return n // g, n % g


def _group_absmax(x: np.ndarray, g: int, out: np.ndarray) -> None:
    full, tail = _split(x.size, g)
    if full:
        np.max(np.abs(x[: full * g].reshape(full, g)), axis=1, out=out[:full])
    if tail:
        out[full] = np.max(np.abs(x[full * g :]))


def _quantize(x: np.ndarray, g: int, scales: np.ndarray, q: np.ndarray) -> None:
    """q = clip(rint(x / scale)) per group; float32 or float64 throughout (x's dtype)."""
    with np.errstate(divide="ignore"):
        inv = np.where(scales > 0, 1 / np.where(scales > 0, scales, 1), 0).astype(x.dtype)
    full, tail = _split(x.size, g)
    t = np.empty(x.size, x.dtype)
    if full:
        np.multiply(x[: full * g].reshape(full, g), inv[:full, None], out=t[: full * g].reshape(full, g))
    if tail:
        np.multiply(x[full * g :], inv[full], out=t[full * g :])
    np.rint(t, out=t)
    np.clip(t, -127, 127, out=t)
    np.copyto(q, t, casting="unsafe")


def _dequantize(q: np.ndarray, g: int, scales: np.ndarray, out: np.ndarray) -> None:
    full, tail = _split(q.size, g)
    if full:
        np.multiply(
            q[: full * g].reshape(full, g),
            scales[:full, None],
            out=out[: full * g].reshape(full, g),
            dtype=F32,
            casting="unsafe",
        )
    if tail:
        np.multiply(q[full * g :], scales[full], out=out[full * g :], dtype=F32, casting="unsafe")
