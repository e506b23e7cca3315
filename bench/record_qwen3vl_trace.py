"""Record trace (e): the accesses of a real streaming Qwen3-VL served by a real tierd.

    python bench/record_qwen3vl_trace.py [--size-mb 600] [--tokens 12] [--out qwen3vl.trace.jsonl]
    python bench/bench_predict.py --trace qwen3vl.trace.jsonl     # replay it with every predictor

A Qwen3-VL-shaped random bf16 checkpoint (the bench_qwen3vl.py model at ``--size-mb``) is ingested
durable into a daemon whose RAM tier holds ``--ram-fraction`` of the weights, and a model process
streams it (``from_pretrained(mode="streaming")``) with the vision cache on, answering five prompts
over three images, the first two asked again (so the trace has decoder layers in a cycle, the vision
tower at each prefill, and vision features written once and read back). The daemon's access log is
read after each prompt (``Client.trace``, as ``tierctl trace record`` does) and written as a trace
file that ``bench/bench_predict.py --trace`` replays.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

IMAGES = (0, 1, 0, 2, 1)  # image seeds, in the order they are asked about


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mb", type=int, default=600, help="bf16 weight bytes of the model [600]")
    ap.add_argument("--tokens", type=int, default=12, help="tokens generated per prompt [12]")
    ap.add_argument("--ram-fraction", type=float, default=0.4, help="RAM tier / weights [0.4]")
    ap.add_argument("--out", default="qwen3vl.trace.jsonl", help="trace file to write")
    a = ap.parse_args()

    import torch
    from bench_qwen3vl import inputs_for, make_checkpoint
    from transformers import AutoConfig

    import tierd_integration as ti
    from tierd import launch
    from tierd.predict.log import from_row, write_trace
    from tierd_client import Client

    tmp = Path(tempfile.mkdtemp(prefix="tierd-trace-"))
    t0 = time.perf_counter()
    try:
        weights, _ = make_checkpoint(tmp / "ckpt", a.size_mb)
        cfg = AutoConfig.from_pretrained(tmp / "ckpt")
        ram = int(a.ram_fraction * weights)
        print(f"model: {weights / 2**20:.0f} MiB of weights, RAM tier {ram / 2**20:.0f} MiB", file=sys.stderr)
        disk = str(3 * weights + (256 << 20))
        d = launch.start(tmp / "s.sock", "--state-dir", str(tmp / "state"), "--disk-bytes", disk,
                         ram_bytes=str(ram), log_path=tmp / "tierd.log")  # fmt: skip
        try:
            with Client(d.socket) as c:
                ti.ingest(c, tmp / "ckpt", "qwen3vl", progress=True, durable=True)
                since = c.trace(limit=0)["now"]
                model = ti.from_pretrained(tmp / "ckpt", c, namespace="qwen3vl", mode="streaming",
                                           prefetch_depth=1)  # fmt: skip
                ti.enable_vision_cache(model, c)
                write_trace(a.out, [], append=False)
                total = 0
                for n, seed in enumerate(IMAGES):
                    with torch.inference_mode():
                        model.generate(**inputs_for(cfg, seed=seed), max_new_tokens=a.tokens,
                                       min_new_tokens=a.tokens, do_sample=False)  # fmt: skip
                    while True:  # the log is a bounded ring: read it after every prompt
                        rows = c.trace(since)["accesses"]
                        if not rows:
                            break
                        accesses = [from_row(r) for r in rows]
                        write_trace(a.out, accesses, append=True)
                        since = accesses[-1].t
                        total += len(accesses)
                    print(
                        f"prompt {n + 1}/{len(IMAGES)} (image {seed}): {total} accesses so far",
                        file=sys.stderr,
                    )
                ti.disable_vision_cache(model)
        finally:
            d.stop()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"wrote {total} accesses to {a.out} in {time.perf_counter() - t0:.0f}s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
