#!/usr/bin/env python3
"""The device checks of scripts/gpu-check.sh, against a real tierd on a real NVIDIA GPU.

STATUS: WRITTEN, NEVER RUN (no session so far had a GPU). Each check prints one line
``check NAME: ok|FAILED ...`` and the numbers behind it; ``--json OUT`` writes them all. Exit 0
when every check passed, 1 otherwise, 2 when this machine has no usable CUDA device.

    slab-in-second-process  a 1 GiB bf16 entry promoted to the GPU tier and read by another process
                            through its imported slab: its float64 sum equals the one put
    read-only-mapping       that process writing through its read-only mapping fails (the bytes
                            the daemon holds are unchanged, the daemon goes on)
    h2d-pinned-vs-pageable  torch copies host -> device at 2 MiB, 64 MiB, 1 GiB from pinned and from
                            pageable memory (GB/s): the bounds a promotion is measured against
    promotion-beside-matmul step time of a matmul loop alone and while promotions run on the
                            daemon's copy stream (the model's stream must not wait for them)
    client-death-frees      a client that mapped a slab is killed; once the entry is deleted, the
                            device memory NVML reports used comes back
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

GiB = 1 << 30
MiB = 1 << 20

READER = textwrap.dedent(
    """
    import sys, torch
    from tierd_client import Client
    c = Client(sys.argv[1])
    t = c.get("check/big", tier="gpu")
    torch.cuda.synchronize()
    print("sum", repr(float(t.double().sum())), t.device, flush=True)
    if sys.argv[2] == "write":
        try:
            t.view(torch.uint8)[:4096].fill_(1)
            torch.cuda.synchronize()
            print("write went through", flush=True)
        except Exception as e:  # a CUDA fault: what we expect
            print("write refused", type(e).__name__, str(e).splitlines()[0], flush=True)
            sys.exit(0)
    sys.stdin.read()  # hold the mapping until killed
    """
)


def reader(sock: Path, mode: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", READER, str(sock), mode], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip


def nvml_used(index: int) -> int:
    import pynvml

    pynvml.nvmlInit()
    try:
        return int(pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(index)).used)
    finally:
        pynvml.nvmlShutdown()


def gbps(n: int, seconds: float) -> float:
    return round(n / seconds / 1e9, 2)


def h2d(torch: Any) -> dict[str, Any]:
    out = {}
    for n in (2 * MiB, 64 * MiB, GiB):
        dst = torch.empty(n, dtype=torch.uint8, device="cuda")
        pageable = torch.ones(n, dtype=torch.uint8)
        pinned = torch.ones(n, dtype=torch.uint8).pin_memory()
        row = {}
        for name, src in (("pageable", pageable), ("pinned", pinned)):
            times = []
            for _ in range(5):
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                dst.copy_(src, non_blocking=True)
                torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
            row[name] = gbps(n, statistics.median(times))
        out[f"{n // MiB}MiB"] = row
        del dst, pageable, pinned
    return out


def matmul_steps(torch: Any, steps: int = 60) -> list[float]:
    a = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        for _ in range(4):
            a = (a @ a).clamp_(-1, 1)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return times


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", type=int, default=0)
    p.add_argument("--json", metavar="OUT")
    args = p.parse_args()
    import torch

    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device visible to torch here; nothing was checked", file=sys.stderr)
        return 2
    from tierd import launch
    from tierd_client import Client

    results: dict[str, Any] = {}
    ok: dict[str, bool] = {}
    with tempfile.TemporaryDirectory(prefix="tierd-gpu-check-") as tmp:
        d = launch.start(
            Path(tmp) / "tierd.sock", "--state-dir", f"{tmp}/state", "--disk-bytes", "0",
            "--gpu-backend", "cuda", "--gpu-device", str(args.device), "--gpu-bytes", "3GiB",
            ram_bytes="4GiB", log_path=Path(tmp) / "tierd.log",
        )  # fmt: skip
        try:
            with Client(d.socket) as c:
                x = torch.randn(GiB // 2, dtype=torch.bfloat16)
                c.put("check/big", x)
                want = float(x.double().sum())
                used_before = nvml_used(args.device)

                # slab-in-second-process
                r = reader(d.socket, "hold")
                assert r.stdout is not None
                line = r.stdout.readline().split()
                got = float(line[1]) if line and line[0] == "sum" else float("nan")
                used_mapped = nvml_used(args.device)
                results["slab-in-second-process"] = {"want": want, "got": got, "reader": " ".join(line)}
                ok["slab-in-second-process"] = abs(got - want) <= 1e-6 * max(1.0, abs(want))

                # client-death-frees (the reader above holds the slab mapped)
                os.kill(r.pid, signal.SIGKILL)
                r.wait(10)
                c.delete("check/big")
                deadline = time.monotonic() + 15
                used_after = nvml_used(args.device)
                while used_after > used_before + 256 * MiB and time.monotonic() < deadline:
                    time.sleep(0.2)
                    used_after = nvml_used(args.device)
                results["client-death-frees"] = {"used_before_bytes": used_before,
                                                 "used_while_mapped_bytes": used_mapped,
                                                 "used_after_bytes": used_after}  # fmt: skip
                ok["client-death-frees"] = used_mapped >= used_before + GiB // 2 and used_after <= (
                    used_before + 256 * MiB
                )

                # read-only-mapping
                c.put("check/big", x)
                w = reader(d.socket, "write")
                out, _ = w.communicate(timeout=120)
                after = c.get("check/big", tier="gpu")
                torch.cuda.synchronize()
                still = float(after.double().sum())
                c.release(after)
                results["read-only-mapping"] = {"reader": out.strip().splitlines(), "sum_after": still}
                ok["read-only-mapping"] = "write refused" in out and still == want and d.proc.poll() is None

                # h2d-pinned-vs-pageable
                results["h2d-pinned-vs-pageable"] = h2d(torch)
                ok["h2d-pinned-vs-pageable"] = True  # numbers for the note, not a pass/fail

                # promotion-beside-matmul
                alone = matmul_steps(torch)
                srcs = [torch.randn(16 * MiB) for _ in range(8)]  # 8 x 64 MiB
                stop = threading.Event()
                promoted = [0]

                def promote() -> None:
                    with Client(d.socket) as pc:
                        while not stop.is_set():
                            for i, s in enumerate(srcs):
                                pc.put(f"check/p{i}", s)
                            got_ = pc.get_many([f"check/p{i}" for i in range(len(srcs))], tier="gpu")
                            promoted[0] += len(got_) * 64 * MiB
                            pc.release(got_)

                th = threading.Thread(target=promote)
                th.start()
                try:
                    beside = matmul_steps(torch)
                finally:
                    stop.set()
                    th.join(120)
                results["promotion-beside-matmul"] = {
                    "step_ms_alone_p50": round(statistics.median(alone) * 1e3, 2),
                    "step_ms_beside_p50": round(statistics.median(beside) * 1e3, 2),
                    "promoted_bytes": promoted[0],
                }
                ok["promotion-beside-matmul"] = promoted[0] > 0
        finally:
            rc = d.stop()
            results["daemon_exit"] = rc
            if rc != 0:
                print((Path(tmp) / "tierd.log").read_text()[-4000:], file=sys.stderr)
    for name, passed in ok.items():
        print(f"check {name}: {'ok' if passed else 'FAILED'} {json.dumps(results.get(name))}")
    if args.json:
        Path(args.json).write_text(json.dumps({"ok": ok, "results": results}, indent=2))
    return 0 if all(ok.values()) and results["daemon_exit"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
