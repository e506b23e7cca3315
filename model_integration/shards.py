"""Reading safetensors shards one tensor at a time, without mapping the file and without its pages
staying in the page cache.

The format: an 8-byte little-endian header length ``N``, ``N`` bytes of JSON mapping each tensor name to
``{"dtype", "shape", "data_offsets": [begin, end]}`` (offsets from the end of the header; an optional
``__metadata__`` entry), then the data. A tensor is read with ``preadv`` into fresh memory, and the
pages it came through are dropped from the page cache right after (``POSIX_FADV_DONTNEED``). Under a
memory cgroup page cache counts against the limit; ingesting a checkpoint must not fill it with
pages nobody reads again.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}  # fmt: skip
MAX_HEADER = 100 << 20


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: torch.dtype
    dtype_code: str  # as the file names it: "BF16", "F32", ...
    shape: tuple[int, ...]
    begin: int  # absolute file offsets
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


class Shard:
    """One ``.safetensors`` file: its tensor table, read from the header, and reads of single tensors."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        st = self.path.stat()
        self.size = st.st_size
        #: changes when the file is rewritten: ingest's quick check compares it (as make and rsync do)
        self.stamp = f"{self.path.name}:{st.st_size}:{st.st_mtime_ns}"
        self.tensors: dict[str, TensorInfo] = {}
        self.metadata: dict[str, Any] = {}
        with open(self.path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise ValueError(f"{self.path}: not a safetensors file (shorter than its 8-byte header size)")
            (n,) = struct.unpack("<Q", raw)
            if n > min(MAX_HEADER, self.size - 8):
                raise ValueError(f"{self.path}: not a safetensors file (a {n}-byte header in {self.size})")
            try:
                header = json.loads(f.read(n))
            except (UnicodeDecodeError, json.JSONDecodeError) as ex:
                raise ValueError(f"{self.path}: not a safetensors file (header: {ex})") from None
        base = 8 + n
        if not isinstance(header, dict):
            raise ValueError(f"{self.path}: safetensors header is not a JSON object")
        for name, d in header.items():
            if name == "__metadata__":
                self.metadata = dict(d or {})
                continue
            try:
                dtype = DTYPES[d["dtype"]]
                shape = tuple(int(s) for s in d["shape"])
                b, e = (int(x) for x in d["data_offsets"])
            except (KeyError, TypeError, ValueError) as ex:
                raise ValueError(f"{self.path}: bad entry for tensor {name!r}: {ex!r}") from None
            want = math.prod(shape) * dtype.itemsize
            if not 0 <= b <= e <= self.size - base or e - b != want:
                raise ValueError(
                    f"{self.path}: tensor {name!r} has offsets [{b}, {e}) for {want} bytes of "
                    f"{d['dtype']}{list(shape)} in a file of {self.size} bytes"
                )
            self.tensors[name] = TensorInfo(name, dtype, d["dtype"], shape, base + b, base + e)

    def read(self, name: str) -> torch.Tensor:
        """The tensor ``name`` in new memory (its page cache pages dropped after the read)."""
        info = self.tensors[name]
        buf = torch.empty(info.nbytes, dtype=torch.uint8)
        fd = os.open(self.path, os.O_RDONLY)
        try:
            view = buf.numpy().data
            done = 0
            while done < info.nbytes:
                got = os.preadv(fd, [view[done:]], info.begin + done)
                if got <= 0:
                    raise ValueError(f"{self.path}: truncated while reading {name!r}")
                done += got
            os.posix_fadvise(fd, info.begin, info.nbytes, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
        if info.nbytes == 0:
            return torch.empty(info.shape, dtype=info.dtype)
        return buf.view(info.dtype).reshape(info.shape)


def shards(checkpoint_dir: str | Path) -> list[Shard]:
    files = sorted(Path(checkpoint_dir).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {checkpoint_dir}")
    return [Shard(f) for f in files]
