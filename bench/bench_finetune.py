"""One LoRA-style training step of a Qwen3-VL-shaped random bf16 model (4 images + text, 1784 tokens),
five ways, in one run: what the training process peaks at, and how long the step takes.

    python bench/bench_finetune.py [--repeats 3] [--json OUT] [--no-cgroup] [--quick]

Modes (each run is its own process: one warm-up step, then the measured step; the same inputs and
weights everywhere; base weights frozen, rank-8 adapters on the text q/v and the vision qkv trained;
the loss is on the last 64 tokens, the reply, whose logits alone are computed, as a trainer that
masks the prompt does: with logits for every position a 32k vocabulary's float32 logits and their
gradients, not the layers' activations, set the peak):
 1. plain: autograd keeps what it saves in the process;
 2. tierd: ``with offload_activations(client)`` around forward and backward (lossless), against a
    daemon whose RAM tier holds everything;
 3. save_on_cpu: ``torch.autograd.graph.save_on_cpu()``, torch's own: it moves saved tensors from a
    GPU to host memory; on this CPU-only machine it can only copy them (measured to show it does not
    apply here);
 4. checkpoint: transformers' gradient checkpointing alone (non-reentrant), every decoder layer and
    vision block;
 5. checkpoint+tierd: both (only the checkpointed layers' inputs and what runs outside them are saved).
Per run: the step's wall time; peak RssAnon of the process (sampled every 2 ms: the memory that is the
process's own; VmHWM would also count the daemon's RAM arena, which every client maps whole) and
RssAnon before the step (weights, inputs); a digest of the adapters' gradients (equal digests
= bit-identical gradients). Without a memory limit the offloaded activations sit in the daemon's RAM
tier (2 GiB here): the process's memory drops, the machine's does not; the cgroup run is the one where
the machine's total is bounded.

Then, with root, a memory-cgroup (v1) run: the daemon (RAM tier 64 MiB, disk tier) and the training
process in one group whose limit is below the plain step's peak and above the offloaded one's (page
cache counts): the plain step is OOM-killed, the offloaded one completes, its activations demoted to
the disk tier and read back ahead of backward.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from memcg import Cgroup

MiB = 1 << 20
MODES = ["plain", "tierd", "save_on_cpu", "checkpoint", "checkpoint+tierd"]
N_IMAGES = 4
ANSWER = 64  # the reply's tokens: the last text run's end


# -- model ------------------------------------------------------------------------------------------
def make_config(quick: bool):
    """Qwen3-VL-shaped (mrope, GQA, deepstack, tied 32k vocabulary), small enough for 2 CPU cores."""
    from transformers import Qwen3VLConfig

    hidden, inter, layers, vh, vdepth = (256, 768, 4, 128, 4) if quick else (384, 1152, 8, 192, 4)
    vocab = 32768
    return Qwen3VLConfig(
        text_config={
            "hidden_size": hidden, "intermediate_size": inter, "num_hidden_layers": layers,
            "num_attention_heads": hidden // 64, "num_key_value_heads": hidden // 128 or 1, "head_dim": 64,
            "vocab_size": vocab, "max_position_embeddings": 8192,
            "rope_scaling": {"rope_type": "default", "mrope_section": [12, 10, 10],
                             "mrope_interleaved": True},
        },
        vision_config={
            "depth": vdepth, "hidden_size": vh, "intermediate_size": 4 * vh, "num_heads": vh // 64,
            "out_hidden_size": hidden, "patch_size": 16, "spatial_merge_size": 2, "temporal_patch_size": 2,
            "deepstack_visual_indexes": [1, 3] if vdepth >= 4 else [0], "num_position_embeddings": 256,
        },
        image_token_id=vocab - 4, video_token_id=vocab - 3,
        vision_start_token_id=vocab - 2, vision_end_token_id=vocab - 1, tie_word_embeddings=True,
    )  # fmt: skip


class LoRA:
    """Adds ``x A^T B^T`` to a frozen linear layer's output through a forward hook (removable)."""

    @staticmethod
    def attach(linear, rank: int = 8):
        import torch

        dt = linear.weight.dtype
        a = torch.nn.Parameter((torch.randn(rank, linear.in_features) * 0.02).to(dt))
        b = torch.nn.Parameter((torch.randn(linear.out_features, rank) * 0.02).to(dt))
        linear.register_parameter("lora_A", a)
        linear.register_parameter("lora_B", b)
        return linear.register_forward_hook(lambda m, inp, out: out + (inp[0] @ m.lora_A.t()) @ m.lora_B.t())


def build(quick: bool):
    import torch
    from transformers import Qwen3VLForConditionalGeneration

    torch.manual_seed(0)
    cfg = make_config(quick)
    model = Qwen3VLForConditionalGeneration(cfg).to(torch.bfloat16)
    model.requires_grad_(False)
    for layer in model.model.language_model.layers:
        LoRA.attach(layer.self_attn.q_proj)
        LoRA.attach(layer.self_attn.v_proj)
    for block in model.model.visual.blocks:
        LoRA.attach(block.attn.qkv)
    return model.train(), cfg


def make_batch(cfg, quick: bool) -> dict:
    """N_IMAGES images of 24x24 patches (144 tokens each) between text runs of 240: 1784 tokens (quick: 16x16
    patches, text runs of 64: 584)."""
    import torch

    g = torch.Generator().manual_seed(1)
    h = w = 16 if quick else 24
    v = cfg.vision_config
    per_image = h * w // (v.spatial_merge_size**2)
    text = 64 if quick else 240
    ids: list[int] = []
    for _ in range(N_IMAGES):
        ids += torch.randint(0, cfg.text_config.vocab_size - 8, (text,), generator=g).tolist()
        ids += [cfg.vision_start_token_id] + [cfg.image_token_id] * per_image + [cfg.vision_end_token_id]
    ids += torch.randint(0, cfg.text_config.vocab_size - 8, (text,), generator=g).tolist()
    input_ids = torch.tensor([ids])
    return {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "mm_token_type_ids": (input_ids == cfg.image_token_id).to(torch.int32),
        "pixel_values": torch.randn(N_IMAGES * h * w, 3 * 2 * 16 * 16, generator=g).to(torch.bfloat16),
        "image_grid_thw": torch.tensor([[1, h, w]] * N_IMAGES),
    }


def answer_loss(model, batch: dict, answer: int):
    """Supervised fine-tuning's loss: next-token cross entropy on the last ``answer`` tokens only (the
    reply), their logits alone computed (``logits_to_keep``), as a trainer that masks the prompt does."""
    import torch

    logits = model(**batch, logits_to_keep=answer + 1).logits[0, :-1].float()
    return torch.nn.functional.cross_entropy(logits, batch["input_ids"][0, -answer:])


# -- the worker -------------------------------------------------------------------------------------
def status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


class PeakAnon:
    """Samples RssAnon every 2 ms on a thread (torch's kernels release the GIL) and keeps the maximum."""

    def __init__(self) -> None:
        self.peak = status_bytes("RssAnon")
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, status_bytes("RssAnon"))

    def __enter__(self) -> PeakAnon:
        self._t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, status_bytes("RssAnon"))


def worker(a: argparse.Namespace) -> None:
    import torch

    from tierd.pages import limit_heap_retention
    from tierd_client import Client
    from tierd_integration import offload_activations

    # freed buffers go back to the OS in every mode (offload_activations does this itself): otherwise
    # glibc keeps up to 32 MiB blocks in a heap that never shrinks and RssAnon measures the allocator
    limit_heap_retention()
    model, cfg = build(a.quick)
    batch = make_batch(cfg, a.quick)
    if a.mode.startswith("checkpoint"):
        model.activation_checkpointing_enable({"use_reentrant": False})
    client = Client(a.socket) if "tierd" in a.mode else None
    stats: dict = {}

    def step() -> None:
        model.zero_grad(set_to_none=True)
        if client is not None:
            ctx = offload_activations(client)
        elif a.mode == "save_on_cpu":
            ctx = torch.autograd.graph.save_on_cpu()
        else:
            ctx = contextlib.nullcontext()
        with ctx:
            answer_loss(model, batch, ANSWER).backward()
        if client is not None:
            stats.update(vars(ctx.stats))

    step()  # warm-up: allocator, lazy initialisation
    if a.ready_file:  # the parent resets the cgroup's peak now
        Path(a.ready_file).write_text("1")
        while Path(a.ready_file).exists():
            time.sleep(0.01)
    base_anon = status_bytes("RssAnon")
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM
    with PeakAnon() as peak:
        t0 = time.perf_counter()
        step()
        step_s = time.perf_counter() - t0
    digest = hashlib.sha256()
    for _, p in sorted((n, p) for n, p in model.named_parameters() if p.requires_grad):
        digest.update(p.grad.view(torch.uint8).numpy().tobytes())
    out = {
        "mode": a.mode, "step_s": step_s, "base_anon": base_anon, "peak_anon": peak.peak,
        "vm_hwm": status_bytes("VmHWM"), "grad_sha256": digest.hexdigest()[:16],
        "tokens": int(batch["input_ids"].shape[1]), "offload": stats,
        "threads": torch.get_num_threads(),
    }  # fmt: skip
    if client is not None:
        c = client.stats()["counters"]
        out["daemon"] = {
            k: c.get(k, 0) for k in ("demotions", "reads_disk", "prefetch_issued", "prefetch_used")
        }
        client.close()
    Path(a.out).write_text(json.dumps(out))


# -- the parent -------------------------------------------------------------------------------------


def run_worker(
    tmp: Path, mode: str, a: argparse.Namespace, socket: str, n: int, cg: Cgroup | None = None
) -> dict:
    out, ready = tmp / f"{mode}.{n}.json", tmp / f"{mode}.{n}.ready"
    cmd = [
        sys.executable,
        __file__,
        "--role",
        "worker",
        "--mode",
        mode,
        "--socket",
        socket,
        "--out",
        str(out),
    ]
    if a.quick:
        cmd.append("--quick")
    if cg is not None:
        cmd = [*cg.prefix(), *cmd, "--ready-file", str(ready)]
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd)
    res: dict = {"mode": mode}
    try:
        while p.poll() is None and time.perf_counter() - t0 < a.timeout:
            if cg is not None and ready.exists():
                cg.set("memory.max_usage_in_bytes", 0)  # the group's peak from the measured step on
                ready.unlink()
            time.sleep(0.01)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
            res["error"] = f"timed out after {a.timeout:.0f}s"
    res["rc"] = p.returncode
    if cg is not None:
        res["cg_stat"] = {k: int(v) for k, v in (ln.split() for ln in cg.get("memory.stat").splitlines())}
        res["cg_max_usage"] = int(cg.get("memory.max_usage_in_bytes"))
        res["cg_limit"] = int(cg.get("memory.limit_in_bytes"))
        res["cg_oom_kills"] = cg.oom_kills()
    if out.exists():
        res.update(json.loads(out.read_text()))
    elif "error" not in res:
        res["error"] = f"exited with {p.returncode}" + (" (OOM-killed)" if res.get("cg_oom_kills") else "")
    return res


def spread(xs: list[float]) -> str:
    if not xs:
        return "-"
    m = statistics.median(xs)
    return f"{m:.2f} ({min(xs):.2f}-{max(xs):.2f})"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--role", default="parent", help=argparse.SUPPRESS)
    ap.add_argument("--mode", default="plain", help=argparse.SUPPRESS)
    ap.add_argument("--socket", default="", help=argparse.SUPPRESS)
    ap.add_argument("--out", default="", help=argparse.SUPPRESS)
    ap.add_argument("--ready-file", default="", help=argparse.SUPPRESS)
    ap.add_argument("--repeats", type=int, default=3, help="runs per mode, each its own process [3]")
    ap.add_argument("--quick", action="store_true", help="a smaller model and batch (a smoke test, ~1 min)")
    ap.add_argument("--no-cgroup", action="store_true", help="skip the memory-cgroup run (it needs root)")
    ap.add_argument("--cg-repeats", type=int, default=2, help="cgroup runs of each of plain and tierd [2]")
    ap.add_argument("--tier-mib", type=int, default=64, help="the RAM tier in the cgroup run, MiB [64]")
    ap.add_argument("--timeout", type=float, default=600, help="seconds per run before it is killed [600]")
    ap.add_argument("--json", default="", help="also write the results here")
    ap.add_argument(
        "--modes", default=",".join(MODES), help=f"modes to run, comma-separated [{','.join(MODES)}]"
    )
    a = ap.parse_args()
    if a.role == "worker":
        worker(a)
        return 0
    if a.repeats < 1:
        ap.error("--repeats must be at least 1")
    if not set(a.modes.split(",")) <= set(MODES):
        ap.error(f"--modes takes some of {','.join(MODES)}, not {a.modes}")

    from tierd import launch

    R: dict = {"runs": [], "cgroup": {}}

    def log(msg: str) -> None:
        print(f"[bench_finetune] {msg}", flush=True)

    with tempfile.TemporaryDirectory(prefix="tierd-ft-", dir="/tmp") as d:
        tmp = Path(d)
        daemon = launch.start(tmp / "a.sock", "--state-dir", str(tmp / "sa"), "--disk-bytes", "0",
                              ram_bytes="2GiB", log_path=tmp / "a.log")  # fmt: skip
        try:
            for n in range(a.repeats):  # interleaved, so drift over the run hits every mode alike
                for mode in a.modes.split(","):
                    r = run_worker(tmp, mode, a, str(daemon.socket), n)
                    R["runs"].append(r)
                    if "error" in r:
                        log(f"the daemon's log, last lines:\n{daemon.log()[-3000:]}")
                    log(f"{mode:17s} run {n + 1}/{a.repeats}: " + (r.get("error") or
                        f"step {r['step_s']:.2f}s, peak anon {r['peak_anon'] / MiB:.0f} MiB "
                        f"(base {r['base_anon'] / MiB:.0f})"))  # fmt: skip
        finally:
            daemon.stop()
        ok = [r for r in R["runs"] if "error" not in r]
        by = {m: [r for r in ok if r["mode"] == m] for m in MODES}
        if not a.no_cgroup and os.geteuid() == 0 and by["plain"] and by["tierd"]:
            R["cgroup"] = cgroup_run(tmp, a, by, log)
        elif not a.no_cgroup:
            log("cgroup run skipped: it needs root and a plain and a tierd result")
    if a.json:
        Path(a.json).write_text(json.dumps(R, indent=1))
    report(R, a)
    return 0


def cgroup_run(tmp: Path, a: argparse.Namespace, by: dict, log) -> dict:
    """Daemon + trainer in one memory cgroup whose limit lies between the offloaded and the plain peak."""
    from tierd import launch

    plain_peak = min(r["peak_anon"] for r in by["plain"])
    tierd_peak = max(r["peak_anon"] for r in by["tierd"])
    # the limit is set once the daemon runs in the group: what it holds then (its own memory and its
    # pre-faulted RAM tier) plus the offloaded process's peak and a third of the gap to the plain one
    # (room for the disk tier's page cache). The RAM tier is small (64 MiB): under the group's pressure
    # the daemon gives back arena pages it does not use, so a large idle tier would only make room for
    # the plain process.
    room = tierd_peak + (plain_peak - tierd_peak) // 3
    res: dict = {"tier": a.tier_mib * MiB, "plain_peak_anon": plain_peak, "tierd_peak_anon": tierd_peak}
    if plain_peak - tierd_peak < 200 * MiB:
        log(f"cgroup run skipped: the peaks ({plain_peak / MiB:.0f}, {tierd_peak / MiB:.0f} MiB) are close")
        res["skipped"] = "the model's activations are too small next to the process's other memory"
        return res
    for n, mode in enumerate(["plain", "tierd"] * a.cg_repeats):
        cg = Cgroup(f"tierd-ft-{os.getpid()}-{n}")
        try:
            sock, state = tmp / f"cg-{n}.sock", tmp / f"cg-{n}"
            daemon = launch.start(sock, "--state-dir", str(state), "--disk-bytes", "8GiB",
                                  ram_bytes=f"{a.tier_mib}MiB", log_path=tmp / f"cg-{n}.log",
                                  prefix=cg.prefix())  # fmt: skip
            try:
                daemon_bytes = int(cg.get("memory.usage_in_bytes"))
                limit = res.setdefault("limit", daemon_bytes + room)  # the first run's, for both
                res[f"{mode}_daemon_bytes"] = daemon_bytes
                log(f"cgroup {mode}: the daemon holds {daemon_bytes / MiB:.0f} MiB, limit {limit / MiB:.0f}")
                cg.set("memory.limit_in_bytes", limit)
                with contextlib.suppress(OSError):
                    cg.set("memory.memsw.limit_in_bytes", limit)  # no swapping out of the budget either
                r = run_worker(tmp, mode, a, str(sock), 100 + n, cg)
            finally:
                daemon.stop()
            res.setdefault(mode, []).append(r)
            log(f"cgroup {limit / MiB:.0f} MiB, {mode}: " + (r.get("error") or
                f"completed, step {r['step_s']:.2f}s, group peak {r['cg_max_usage'] / MiB:.0f} MiB, "
                f"daemon {r.get('daemon')}"))  # fmt: skip
        finally:
            cg.remove()
    return res


def report(R: dict, a: argparse.Namespace) -> None:
    ok = [r for r in R["runs"] if "error" not in r]
    if not ok:
        print("no run completed")
        return
    print(f"\none training step, {ok[0]['tokens']} tokens ({N_IMAGES} images + text), {a.repeats} runs "
          f"per mode, {ok[0]['threads']} threads; median (min-max)")  # fmt: skip
    print(f"{'mode':18s} {'step s':>18s} {'peak anon MiB':>20s} {'over base MiB':>20s}  grads")
    plain_steps = [r["step_s"] for r in ok if r["mode"] == "plain"]
    base_step = statistics.median(plain_steps) if plain_steps else float("nan")
    for m in MODES:
        rs = [r for r in ok if r["mode"] == m]
        if not rs:
            print(f"{m:18s} (no run completed)")
            continue
        digests = sorted({r["grad_sha256"] for r in rs})
        print(f"{m:18s} {spread([r['step_s'] for r in rs]):>18s} "
              f"{spread([r['peak_anon'] / MiB for r in rs]):>20s} "
              f"{spread([(r['peak_anon'] - r['base_anon']) / MiB for r in rs]):>20s}  {','.join(digests)}"
              f"  x{statistics.median([r['step_s'] for r in rs]) / base_step:.2f} time")  # fmt: skip
    t = [r for r in ok if r["mode"] == "tierd"]
    if t:
        s = t[0]["offload"]
        print(f"tierd: {s['offloaded']} tensors / {s['offloaded_bytes'] / MiB:.0f} MiB offloaded per "
              f"step, {s['kept_small']} small and {s['kept_other']} others kept, "
              f"{s['shared']} shared saves")  # fmt: skip
    cg = R.get("cgroup") or {}
    if "plain" in cg or "tierd" in cg:
        tier = cg["tier"] / MiB
        print(f"memory cgroup {cg['limit'] / MiB:.0f} MiB (daemon RAM tier {tier:.0f} MiB + disk tier):")
        for m, r in [(mode, r) for mode in ("plain", "tierd") for r in cg.get(mode, [])]:
            d = r.get("daemon") or {"demotions": 0, "reads_disk": 0, "prefetch_used": 0}
            print(f"  {m:6s}: " + (r.get("error") or f"completed in {r['step_s']:.2f}s (group peak "
                  f"{r['cg_max_usage'] / MiB:.0f} MiB, demotions {d['demotions']}, demand reads from "
                  f"disk {d['reads_disk']}, read after a hint {d['prefetch_used']})"))  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
