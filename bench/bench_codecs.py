#!/usr/bin/env python3
"""Codec table: ratio, encode and decode GB/s (1 thread and 2 threads) of every codec on gaussian
fp16, bf16 and fp32 tensors, with numpy.copyto of the same bytes as the baseline, and the codec the
default policy picks for each (with its reason) from a calibration taken in the same run.

    python bench/bench_codecs.py                 # 64 MiB tensors, 3 interleaved repetitions (~20 s)
    python bench/bench_codecs.py --quick         # 16 MiB, 2 repetitions
    python bench/bench_codecs.py --json out.json

GB/s always counts the tensor's raw (uncompressed) bytes. Encode includes prepare() (int8 scans the
tensor for its row scales, fp16/bf16 for overflow). "2 thr" runs encode_all/decode_all with a
ThreadPoolExecutor of 2 workers. Absolute numbers drift on a VM: read the "x copyto" columns, which
divide by the memcpy measured in the same repetition. numpy + zstandard only: no torch, no daemon.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import zstandard

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tierd import calibrate as cal
from tierd.codecs import CODECS, Codec, Plan, decode_all, encode_all
from tierd.codecs._bits import bf16_to_f32
from tierd.codecs.policy import choose, sample_of

MIB = 1 << 20
DTYPES = ("float16", "bfloat16", "float32")


def gbps(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / 1e9


def as_f32(raw: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "float32":
        return raw.view(np.float32)
    if dtype == "float16":
        return raw.view(np.float16).astype(np.float32)
    return bf16_to_f32(raw.view(np.uint16))


def max_error(codec: Codec, plan: Plan, raw: np.ndarray, out: np.ndarray, rows: int) -> float:
    """int8: max |err| / row absmax; downcasts: max |err| / |x| (x != 0); lossless: bit-exact check."""
    if codec.lossless:
        if not np.array_equal(raw, out):
            raise SystemExit(f"{codec.name} {plan.dtype}: round trip is not bit-exact")
        return 0.0
    x, y = as_f32(raw, plan.dtype), as_f32(out, plan.dtype)
    err = np.abs(x - y)
    if codec.name == "int8":
        am = np.abs(x).reshape(rows, -1).max(axis=1)
        return float((err.reshape(rows, -1).max(axis=1) / am).max())
    # relative to |x| where the half type still has full relative precision (normal range); below it
    # the stated bound is the absolute floor params["abs_floor"], checked here too
    tiny = 2.0**-14 if codec.name == "fp16" else 2.0**-126
    normal = np.abs(x) >= tiny
    if np.any(err[~normal] > plan.params["abs_floor"]):
        raise SystemExit(f"{codec.name} {plan.dtype}: error above the stated absolute floor")
    return float((err[normal] / np.abs(x[normal])).max())


def run(args: argparse.Namespace) -> dict[str, Any]:
    nbytes = args.size_mib * MIB
    chunk = args.chunk_mib * MIB
    state = Path(args.state_dir) if args.state_dir else Path(tempfile.gettempdir())
    print(
        f"machine: {os.cpu_count()} CPUs ({platform.processor() or platform.machine()}), Python "
        f"{platform.python_version()}, numpy {np.__version__}, zstandard {zstandard.__version__}, "
        f"load {os.getloadavg()[0]:.2f}"
    )
    t = time.perf_counter()
    calib = cal.calibrate(state)
    print(f"calibration ({time.perf_counter() - t:.2f} s, disk under {state}, {calib.disk_mode}):")
    print(
        f"  memcpy {calib.memcpy_gbps:.2f} GB/s, disk write {calib.disk_write_gbps:.2f} GB/s, "
        f"read {calib.disk_read_gbps:.2f} GB/s, {calib.cores} cores"
    )
    for d, r in calib.zstd.items():
        print(
            f"  zstd {d:9s} ratio {r.ratio:.3f}  enc {r.encode_gbps:.2f}  dec {r.decode_gbps:.2f} GB/s/core"
        )
    for n in calib.notes:
        print(f"  note: {n}")

    # tensors: 2-D [rows, cols] so int8 has realistic rows (output channels)
    cases = []
    for dtype in DTYPES:
        raw = cal.gaussian_bytes(dtype, nbytes, seed=1)
        size = 4 if dtype == "float32" else 2
        cols = 4096
        shape = [raw.size // size // cols, cols]
        cases.append((dtype, raw, shape))
    src = np.ones(nbytes, np.uint8)
    dst = np.zeros(nbytes, np.uint8)
    np.copyto(dst, src)
    pool = ThreadPoolExecutor(2)
    samples: dict[tuple[str, str, str], list[float]] = {}
    memcpy: list[float] = []
    info: dict[tuple[str, str], dict[str, Any]] = {}
    outs = {dtype: np.zeros(raw.size, np.uint8) for dtype, raw, _ in cases}
    for o in outs.values():
        o[:] = 1  # warm destinations
    for rep in range(args.reps):
        t = time.perf_counter()
        np.copyto(dst, src)
        memcpy.append(gbps(nbytes, time.perf_counter() - t))
        for dtype, raw, shape in cases:
            for codec in CODECS:
                if not codec.applies(dtype, shape):
                    continue
                out = outs[dtype]
                for mode, p in (("1", None), ("2", pool)):
                    t = time.perf_counter()
                    plan = codec.prepare(memoryview(raw), dtype, shape, chunk)
                    chunks = encode_all(codec, plan, memoryview(raw), p)
                    te = time.perf_counter() - t
                    t = time.perf_counter()
                    decode_all(codec, plan, chunks, memoryview(out), p)
                    td = time.perf_counter() - t
                    samples.setdefault((dtype, codec.name, "enc" + mode), []).append(gbps(nbytes, te))
                    samples.setdefault((dtype, codec.name, "dec" + mode), []).append(gbps(nbytes, td))
                if rep == 0:
                    stored = sum(memoryview(c).nbytes for c in chunks)
                    stored += sum(len(v) for v in plan.params.values() if isinstance(v, bytes))
                    info[(dtype, codec.name)] = {
                        "ratio": nbytes / stored,
                        "n_chunks": plan.n_chunks,
                        "max_err": max_error(codec, plan, raw, out, shape[0]),
                        "error_bound": plan.error_bound,
                    }
                del chunks
    pool.shutdown()

    med_copy = statistics.median(memcpy)
    print(
        f"\ncodecs on gaussian (std 0.02) tensors of {args.size_mib} MiB, {args.chunk_mib} MiB chunks, "
        f"median of {args.reps}; numpy.copyto of the same bytes: {med_copy:.2f} GB/s (= 1.00 x copyto)"
    )
    head = (
        f"{'dtype':9s} {'codec':5s} {'ratio':>6s} | {'enc 1thr':>8s} {'enc 2thr':>8s} | {'dec 1thr':>8s} "
        f"{'dec 2thr':>8s} | {'dec2 x copyto':>13s} | {'max err':>9s} {'bound':>9s}"
    )
    print(head)
    print("-" * len(head))
    rows = []
    for dtype, _, shape in cases:
        for codec in CODECS:
            if (dtype, codec.name) not in info:
                continue
            m = {
                k: statistics.median(samples[(dtype, codec.name, k)])
                for k in ("enc1", "enc2", "dec1", "dec2")
            }
            i = info[(dtype, codec.name)]
            bound = "-" if i["error_bound"] is None else f"{i['error_bound']:.3g}"
            err = "exact" if codec.lossless else f"{i['max_err']:.3g}"
            print(
                f"{dtype:9s} {codec.name:5s} {i['ratio']:6.3f} | {m['enc1']:8.2f} {m['enc2']:8.2f} | "
                f"{m['dec1']:8.2f} {m['dec2']:8.2f} | {m['dec2'] / med_copy:13.3f} | {err:>9s} {bound:>9s}"
            )
            rows.append(
                {
                    "dtype": dtype,
                    "shape": shape,
                    "codec": codec.name,
                    **i,
                    **{k + "_gbps": v for k, v in m.items()},
                }
            )
    print(
        "(GB/s of raw bytes; raw encode is a view, hence its absurd speed; ratio counts int8 scales;\n"
        " max err: int8 vs row absmax, fp16/bf16 vs |x| in their normal range, lossless checked bit-exact)"
    )

    print(
        f"\ndefault policy (auto, lossless only) with this run's calibration, {args.size_mib} MiB gaussian:"
    )
    picks = []
    for dtype, raw, shape in cases:
        for cores in (1, 2):
            c = choose(calib, dtype, shape, sample_of(memoryview(raw), dtype), cores=cores)
            print(f"  {dtype:9s} cores={cores}: {c.codec:4s}  {c.reason}")
            picks.append(
                {
                    "dtype": dtype,
                    "cores": cores,
                    "codec": c.codec,
                    "reason": c.reason,
                    "expected_ratio": c.expected_ratio,
                }
            )
    zeros = np.zeros(nbytes, np.uint8)
    c = choose(calib, "float16", [nbytes // 2], sample_of(memoryview(zeros), "float16"), cores=2)
    print(f"  {'zeros f16':9s} cores=2: {c.codec:4s}  {c.reason}")
    picks.append(
        {
            "dtype": "float16 zeros",
            "cores": 2,
            "codec": c.codec,
            "reason": c.reason,
            "expected_ratio": c.expected_ratio,
        }
    )
    print(f"load at end {os.getloadavg()[0]:.2f}")
    return {
        "size_mib": args.size_mib,
        "chunk_mib": args.chunk_mib,
        "reps": args.reps,
        "memcpy_gbps": med_copy,
        "calibration": calib.to_dict(),
        "codecs": rows,
        "policy": picks,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-mib", type=int, default=64)
    ap.add_argument("--chunk-mib", type=int, default=4)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="16 MiB tensors, 2 repetitions")
    ap.add_argument("--state-dir", help="where calibration writes its temp file (default: the temp dir)")
    ap.add_argument("--json", metavar="OUT", help="also write every number to OUT")
    args = ap.parse_args()
    if args.quick:
        args.size_mib, args.reps = 16, 2
    result = run(args)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
