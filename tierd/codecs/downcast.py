"""bf16 / fp16: a float32 tensor stored as bfloat16 or float16 (half the bytes). Lossy.

Decode upcasts back to float32 (exact), so the tensor keeps its dtype. Encoding rounds to nearest,
ties to even; +-inf and NaN are kept.

Stated error (``plan.error_bound`` = u, ``params["abs_floor"]`` = f), for every value x::

    |x - decode(x)| <= u * |x| + f

  * bf16: u = 2**-8 (8 significant bits), f = 2**-134 (half the smallest bf16 subnormal). bf16 has
    float32's exponent range; prepare() refuses data whose absmax would round up to inf (within half
    a bf16 step of float32's max).
  * fp16: u = 2**-11 (11 significant bits), f = 2**-25 (half the smallest fp16 subnormal: values
    below ~6.1e-5 lose relative precision, below 2**-25 they become 0). fp16 stops at 65504:
    prepare() scans the data and raises ValueError if a finite value would overflow to inf.
"""

from __future__ import annotations

import numpy as np

from tierd.codecs._bits import F16, F32, U16, bf16_to_f32, f32_to_bf16
from tierd.codecs.base import Buffer, Chunk, Codec, Plan, array_bytes, as_u8, round_chunk

_BLOCK = 1 << 20


def finite_absmax(x: np.ndarray) -> float:
    """Largest |value| among the finite values of a float array (0.0 when there are none)."""
    best = 0.0
    for s in range(0, x.size, _BLOCK):
        b = x[s : s + _BLOCK]
        m = float(np.max(np.abs(b))) if b.size else 0.0
        if not np.isfinite(m):
            fin = b[np.isfinite(b)]
            m = float(np.max(np.abs(fin))) if fin.size else 0.0
        best = max(best, m)
    return best


class _Downcast(Codec):
    lossless = False
    unit_roundoff = 0.0
    abs_floor = 0.0
    half = "?"

    def why_not(self, dtype: str, shape: list[int]) -> str | None:
        if dtype != "float32":
            return f"{self.name} stores float32 tensors at half size, not {dtype}"
        return None

    def _overflows(self, absmax: float) -> bool:
        raise NotImplementedError

    def prepare(self, raw: Buffer, dtype: str, shape: list[int], chunk_bytes: int) -> Plan:
        u8, shape, size = self._check_prepare(raw, dtype, shape, chunk_bytes)
        m = finite_absmax(u8.view(F32))
        if self._overflows(m):
            raise ValueError(
                f"{self.name} cannot hold this tensor: its absmax {m:.6g} overflows {self.half} "
                f"(use {'bf16, ' if self.name == 'fp16' else ''}zstd or raw)"
            )
        params = {"abs_floor": self.abs_floor}
        return self._plan(dtype, shape, u8.size, round_chunk(chunk_bytes, size), params, self.unit_roundoff)

    def _check_stored(self, i: int, stored: Buffer, n: int) -> np.ndarray:
        src = as_u8(stored, "stored chunk")
        if src.size != 2 * n:
            raise ValueError(f"{self.name} chunk {i}: stored {src.size} bytes, expected {2 * n}")
        return src


class Bf16Codec(_Downcast):
    name = "bf16"
    unit_roundoff = 2.0**-8
    abs_floor = 2.0**-134
    half = "bfloat16"

    def _overflows(self, absmax: float) -> bool:
        return bool(f32_to_bf16(np.array([absmax], F32))[0] & 0x7FFF == 0x7F80)

    def encode_chunk(self, plan: Plan, i: int, raw: Buffer) -> Chunk:
        src, _, _ = self._src(plan, i, raw)
        return array_bytes(f32_to_bf16(src.view(F32)))

    def decode_chunk(self, plan: Plan, i: int, stored: Buffer, out: Buffer) -> None:
        dst, start, end = self._dst(plan, i, out)
        src = self._check_stored(i, stored, (end - start) // 4)
        bf16_to_f32(src.view(U16), out=dst.view(F32))


class Fp16Codec(_Downcast):
    name = "fp16"
    unit_roundoff = 2.0**-11
    abs_floor = 2.0**-25
    half = "float16 (max 65504)"

    def _overflows(self, absmax: float) -> bool:
        with np.errstate(over="ignore"):
            return bool(np.isinf(np.float32(absmax).astype(F16)))

    def encode_chunk(self, plan: Plan, i: int, raw: Buffer) -> Chunk:
        src, _, _ = self._src(plan, i, raw)
        with np.errstate(over="ignore"):  # inf stays inf; prepare() refused finite overflows
            half = src.view(F32).astype(F16)
        return array_bytes(half)

    def decode_chunk(self, plan: Plan, i: int, stored: Buffer, out: Buffer) -> None:
        dst, start, end = self._dst(plan, i, out)
        src = self._check_stored(i, stored, (end - start) // 4)
        np.copyto(dst.view(F32), src.view(F16))
