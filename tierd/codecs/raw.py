"""raw: the bytes as they are. encode_chunk returns a view (no copy); decode copies into out."""

from __future__ import annotations

import numpy as np

from tierd.codecs.base import Buffer, Chunk, Codec, Plan, as_byte_view, as_u8, round_chunk


class RawCodec(Codec):
    """Stores the raw bytes; applies to every dtype and shape. Lossless, ratio 1."""

    name = "raw"
    lossless = True

    def prepare(self, raw: Buffer, dtype: str, shape: list[int], chunk_bytes: int) -> Plan:
        u8, shape, size = self._check_prepare(raw, dtype, shape, chunk_bytes)
        return self._plan(dtype, shape, u8.size, round_chunk(chunk_bytes, size))

    def encode_chunk(self, plan: Plan, i: int, raw: Buffer) -> Chunk:
        self._check_plan(plan)
        start, end = plan.span(i)
        mv = as_byte_view(raw, "raw")
        if mv.nbytes != plan.nbytes:
            raise ValueError(f"raw holds {mv.nbytes} bytes but the plan is for {plan.nbytes}")
        return mv[start:end]

    def decode_chunk(self, plan: Plan, i: int, stored: Buffer, out: Buffer) -> None:
        dst, start, end = self._dst(plan, i, out)
        src = as_u8(stored, "stored chunk")
        if src.size != end - start:
            raise ValueError(f"raw chunk {i}: stored {src.size} bytes, expected {end - start}")
        np.copyto(dst, src)
