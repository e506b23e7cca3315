"""tierd end to end: a daemon on its defaults, and model processes that share weights through it.

    python examples/shared_weights.py

1. Starts `tierd` with no flags and no config file (or uses the one already serving the default
   socket): a shared-memory RAM tier of 25% of RAM, on $XDG_RUNTIME_DIR/tierd/tierd.sock or
   /tmp/tierd-$UID/tierd.sock.
2. A writer process builds a transformer (about 100M parameters, fixed seed), puts every weight into
   tierd (durable: committed to the disk tier before each put returns) and records the model's
   output on a fixed input.
3. A reader process builds the same model with no weights (meta device), binds every parameter to a
   zero-copy view from tierd, runs the same input and checks the output is bit-identical; it reports
   how much memory it added of its own (USS), which stays far below the weights' size.
4. If it started the daemon: restarts it. The weights were put durable=True, so the new daemon finds
   them in its disk tier (an LMDB file in ~/.local/state/tierd) and a third reader gets them back,
   promoted from disk on first use.
5. Prints `tierctl status`, deletes the demo's entries, and stops the daemon if it started it.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

NS = "demo-model"


def build_model(device: str = "cpu"):
    import torch
    from torch import nn

    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(d_model=768, nhead=12, dim_feedforward=3072, batch_first=True)
    with torch.device(device):
        return nn.TransformerEncoder(layer, num_layers=12, enable_nested_tensor=False).eval()


def sample_input():
    import torch

    g = torch.Generator().manual_seed(1)
    return torch.randn(2, 64, 768, generator=g)


def writer() -> None:
    import torch

    from tierd_client import Client

    t0 = time.perf_counter()
    model = build_model()
    sd = model.state_dict()
    nbytes = sum(t.nbytes for t in sd.values())
    with Client() as c:
        t1 = time.perf_counter()
        for name, t in sd.items():
            c.put(f"{NS}/{name}", t, tags=["weight"], durable=True)
        t2 = time.perf_counter()
        with torch.inference_mode():
            c.put(f"{NS}/output.ref", model(sample_input()), durable=True)
    print(
        f"[writer pid {os.getpid()}] built {len(sd)} tensors, {nbytes / 2**20:.0f} MiB in {t1 - t0:.1f}s; "
        f"put them into tierd in {t2 - t1:.2f}s ({nbytes / (t2 - t1) / 1e9:.1f} GB/s)"
    )


def reader() -> None:
    import psutil
    import torch

    from tierd_client import Client

    model = build_model("meta")
    names = list(model.state_dict())
    with Client() as c:
        t0 = time.perf_counter()
        views = c.get_many([f"{NS}/{n}" for n in names])
        t1 = time.perf_counter()
        model.load_state_dict(dict(zip(names, views, strict=True)), assign=True)
        assert all(c.arena is not None and c.arena.contains(p) for p in model.parameters())
        with torch.inference_mode():
            out = model(sample_input())
        ref = c.get(f"{NS}/output.ref")
        same = torch.equal(out, ref)
        nbytes = sum(v.nbytes for v in views)
        # how the arena's pages appear in this process: resident, and shared with the daemon
        arena = [m for m in psutil.Process().memory_maps() if "tierd-ram" in m.path]
        rss = sum(m.rss for m in arena)
        private = sum(m.private_clean + m.private_dirty for m in arena)
        print(
            f"[reader pid {os.getpid()}] bound {len(views)} weights ({nbytes / 2**20:.0f} MiB) as zero-copy "
            f"views in {(t1 - t0) * 1e3:.1f} ms; output identical to the writer's: {same}; arena pages "
            f"resident here {rss / 2**20:.0f} MiB, private to this process {private / 2**20:.0f} MiB"
        )
        if not same:
            raise SystemExit("reader: output differs from the writer's")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--role", choices=["writer", "reader"], help=argparse.SUPPRESS)
    ap.add_argument("--keep", action="store_true", help="leave the daemon and the demo entries in place")
    args = ap.parse_args()
    if args.role == "writer":
        writer()
        return 0
    if args.role == "reader":
        reader()
        return 0

    from tierd import launch
    from tierd_client import Client
    from tierd_client.tierctl import main as tierctl

    daemon = launch.serving_or_start()
    try:
        for role in ("writer", "reader", "reader"):
            subprocess.run([sys.executable, __file__, "--role", role], check=True)
        if daemon is not None:
            print("\nrestarting tierd: the weights were put durable=True, so they come back from disk...")
            daemon.stop()
            daemon = launch.start(None, ram_bytes=None)
            with Client() as c:
                restored = c.ls(f"{NS}/")
                print(
                    f"tierd pid {daemon.pid}: {len(restored)} entries restored, in tiers "
                    f"{sorted({t for e in restored for t in e['tiers']})}"
                )
            subprocess.run([sys.executable, __file__, "--role", "reader"], check=True)
        print("\n$ tierctl status")
        tierctl(["status"])
        print(f"\n$ tierctl ls --prefix {NS}/ | tail -3")
        with Client() as c:
            entries = c.ls(f"{NS}/")
            print(f"{len(entries)} entries under {NS}/, e.g. {entries[0]['key']} {entries[0]['shape']}")
            if not args.keep:
                for e in entries:
                    c.delete(e["key"])
    finally:
        if daemon is not None and not args.keep:
            daemon.stop()
            print("tierd stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
