"""Bit-level helpers in numpy: bfloat16 <-> float32, float views of raw bytes, byte shuffles.

bfloat16 is the upper 16 bits of a float32; numpy has no bfloat16 dtype, so bf16 arrays are uint16
arrays of those bits. float32 -> bfloat16 rounds to nearest, ties to even (what torch does), keeps
+-inf, and turns NaN into a quiet NaN of the same sign.
"""

from __future__ import annotations

import numpy as np

U16 = np.dtype("<u2")
U32 = np.dtype("<u4")
F16 = np.dtype("<f2")
F32 = np.dtype("<f4")


def bf16_to_f32(bits: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """uint16 bf16 bits -> float32 (exact). ``out``: a float32 array of the same size to fill."""
    if out is None:
        out = np.empty(bits.shape, F32)
    np.left_shift(bits, 16, out=out.view(U32), dtype=U32)
    return out


def f32_to_bf16(x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """float32 -> uint16 bf16 bits, round to nearest even. ``out``: a uint16 array to fill."""
    u = np.ascontiguousarray(x, dtype=F32).view(U32)
    if out is None:
        out = np.empty(u.shape, U16)
    # r = (u + 0x7FFF + lsb) >> 16, in uint32 (cannot overflow for non-NaN values: the largest
    # finite magnitude 0x7F7FFFFF + 0x8000 = 0x7F807FFF, i.e. rounds up to inf, as it must).
    r = np.right_shift(u, 16)
    np.bitwise_and(r, 1, out=r)
    r += 0x7FFF
    r += u
    r >>= 16
    np.copyto(out, r, casting="unsafe")
    nan = np.isnan(x)
    if nan.any():
        out[nan] = (np.right_shift(u[nan], 16) | 0x0040).astype(U16)
    return out


def to_f32(u8: np.ndarray, dtype: str) -> np.ndarray:
    """The float32 values of raw bytes of a float32/float16/bfloat16 tensor (a view for float32)."""
    if dtype == "float32":
        return u8.view(F32)
    if dtype == "float16":
        return u8.view(F16).astype(F32)
    if dtype == "bfloat16":
        return bf16_to_f32(u8.view(U16))
    raise ValueError(f"not a float dtype this codec handles: {dtype!r}")


def shuffle(src: np.ndarray, k: int) -> np.ndarray:
    """Byte planes of a uint8 array of k-byte items: plane j holds byte j of every item.

    Returns a new contiguous uint8 array (k planes one after the other). k=2 goes through uint16
    arithmetic, which numpy runs ~2x faster than a strided copy; larger k copy one column at a time.
    """
    n = src.size // k
    planes = np.empty(src.size, np.uint8)
    if k == 2:
        x = src.view(U16)
        np.copyto(planes[:n], x, casting="unsafe")  # low bytes
        np.copyto(planes[n:], x >> 8, casting="unsafe")  # high bytes
        return planes
    cols = src.reshape(n, k)
    for j in range(k):
        np.copyto(planes[j * n : (j + 1) * n], cols[:, j])
    return planes


def unshuffle(planes: np.ndarray, k: int, dst: np.ndarray) -> None:
    """Inverse of :func:`shuffle`, written into the uint8 array ``dst`` (same size)."""
    n = dst.size // k
    if k == 2:
        o = dst.view(U16)
        np.copyto(o, planes[n:], casting="unsafe")
        o <<= 8
        o |= planes[:n]
        return
    cols = dst.reshape(n, k)
    for j in range(k):
        np.copyto(cols[:, j], planes[j * n : (j + 1) * n])
