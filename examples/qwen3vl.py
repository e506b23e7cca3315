"""Qwen3-VL served by tierd: weights streamed from the daemon's tiers, vision features cached.

    python examples/qwen3vl.py [CHECKPOINT_DIR]        (make demo runs it with no argument)

1. Starts `tierd` on its defaults (or uses the one already serving the default socket).
2. With no CHECKPOINT_DIR, builds a small random Qwen3-VL shaped like the real one and saves it as
   safetensors under ~/.cache/tierd/ (no weights can be downloaded here); any local real
   checkpoint works the same way when given.
3. A model process: `tierd_integration.from_pretrained(dir, client)` ingests the checkpoint once
   (durable weight entries) and returns a model whose weights are views of tierd's RAM tier;
   `enable_vision_cache` keys vision features by the image; `generate()` is called unchanged with an
   image and a prompt, twice: the second time the vision tower is skipped.
4. A second model process on the same weights adds no copy of them.
5. Prints `tierctl status`.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path


def model_process(checkpoint: Path, label: str) -> None:
    import psutil
    import torch

    import tierd_integration as ti
    from tierd_client import Client

    with Client() as c:
        entries_before = len(c.ls())
        t0 = time.perf_counter()
        model = ti.from_pretrained(checkpoint, c)
        t1 = time.perf_counter()
        cache = ti.enable_vision_cache(model, c)
        inputs = ti.sample_inputs(model.config, seed=0)
        outs = []
        for _ in range(2):
            t = time.perf_counter()
            with torch.inference_mode():
                out = model.generate(**inputs, max_new_tokens=16, do_sample=False)
            outs.append((out[0, inputs["input_ids"].shape[1] :].tolist(), time.perf_counter() - t))
        arena = [m for m in psutil.Process().memory_maps() if "tierd-ram" in m.path]
        private = sum(m.private_clean + m.private_dirty for m in arena)
        in_arena = sum(1 for p in model.parameters() if c.arena is not None and c.arena.contains(p))
        n_params = sum(1 for _ in model.parameters())
        new = len(c.ls()) - entries_before
        print(f"[{label} pid {os.getpid()}] model ready in {t1 - t0:.2f}s ({new} new entries); {in_arena}/"
              f"{n_params} parameters are views of tierd's arena ({private >> 20} MiB of it private to this "
              "process)")  # fmt: skip
        print(f"[{label}] generate #1 (vision miss) {outs[0][1]:.2f}s, #2 (vision hit) {outs[1][1]:.2f}s; "
              f"vision cache hits {cache.hits}, misses {cache.misses}; tokens {outs[0][0]}")  # fmt: skip
        if outs[0][0] != outs[1][0]:
            raise SystemExit("the cached vision features changed the output")
        ti.detach(model)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", nargs="?", help="a local Qwen3-VL checkpoint folder [a small random one]")
    ap.add_argument("--role", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.role:
        model_process(Path(args.checkpoint), args.role)
        return 0

    from tierd import launch
    from tierd_client.tierctl import main as tierctl

    if args.checkpoint:
        checkpoint = Path(args.checkpoint)
    else:
        import tierd_integration as ti

        checkpoint = Path.home() / ".cache" / "tierd" / "qwen3vl-random"
        if not (checkpoint / "config.json").exists():
            print(
                f"building a small random Qwen3-VL checkpoint in {checkpoint} (no downloads here)...",
                flush=True,
            )
            ti.make_random_checkpoint(checkpoint, size="small", seed=0)
    daemon = launch.serving_or_start()
    try:
        for label in ("model process A", "model process B"):
            subprocess.run([sys.executable, __file__, str(checkpoint), "--role", label], check=True)
        print("\n$ tierctl status")
        tierctl(["status"])
    finally:
        if daemon is not None:
            daemon.stop()
            print("tierd stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
