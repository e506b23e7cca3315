"""Weights served by a real tierd to a tiny random Qwen3-VL (CPU): resident, streaming, detach,
shared between processes, and no leases left behind by a killed model process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from tests.conftest import wait_until
from tierd_client import Client
from tierd_integration import (
    detach,
    from_pretrained,
    ingest,
    make_random_checkpoint,
    offload_model,
    sample_inputs,
    streaming_minimum,
)
from tierd_integration.hooks import StreamBlockHook

NEW_TOKENS = 6
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_random_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-vl", size="tiny", seed=0)


@pytest.fixture(scope="module")
def plain(ckpt: Path):
    from transformers import Qwen3VLForConditionalGeneration

    return Qwen3VLForConditionalGeneration.from_pretrained(ckpt).eval()


@pytest.fixture(scope="module")
def inputs(plain) -> dict:
    return sample_inputs(plain, seed=1)


@pytest.fixture(scope="module")
def reference(plain, inputs) -> torch.Tensor:
    return generate(plain, inputs)


def generate(model, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)


def weight_bytes(ckpt: Path) -> int:
    from tierd_integration.weights import checkpoint_names

    return sum(
        torch.empty(shape, dtype=torch.float32, device="meta").numel() * 4
        for _, shape in checkpoint_names(ckpt).values()
    )


def test_make_random_checkpoint_and_inputs(ckpt: Path, plain, inputs: dict, reference) -> None:
    assert (ckpt / "config.json").exists()
    assert len(list(ckpt.glob("*.safetensors"))) > 1  # sharded
    assert plain.config.vision_config.deepstack_visual_indexes
    n_image = int((inputs["input_ids"] == plain.config.image_token_id).sum())
    assert n_image == inputs["pixel_values"].shape[0] // 4
    assert inputs["pixel_values"].shape[1] == 3 * 2 * 16 * 16
    assert reference.shape[1] == inputs["input_ids"].shape[1] + NEW_TOKENS
    # the same seed makes the same checkpoint
    assert torch.equal(sample_inputs(plain, seed=1)["pixel_values"], inputs["pixel_values"])


def test_resident_and_streaming_generate_identical_tokens(daemon, ckpt, inputs, reference) -> None:
    with Client(socket=daemon.socket) as c:
        resident = from_pretrained(ckpt, c)
        assert resident._tierd_binding.mode == "resident"
        assert all(c.arena.contains(p) for p in resident.parameters())
        assert resident.lm_head.weight is resident.model.language_model.embed_tokens.weight
        assert torch.equal(generate(resident, inputs), reference)

        streaming = from_pretrained(ckpt, c, ram_budget=streaming_minimum(ckpt))
        assert streaming._tierd_binding.mode == "streaming"
        layer = streaming.model.language_model.layers[0]
        hook = layer._tierd_hook
        assert isinstance(hook, StreamBlockHook)
        assert all(p.is_meta for p in layer.parameters())  # a block holds nothing between forwards
        before = c.stats()
        assert torch.equal(generate(streaming, inputs), reference)
        after = c.stats()
        assert hook.calls == NEW_TOKENS  # prefill + one forward per further token
        assert streaming.model.visual.blocks[0]._tierd_hook.calls == 1
        assert all(p.is_meta for p in layer.parameters())
        assert after["leases"] == before["leases"]  # every block lease released after its forward
        assert after["counters"]["prefetch_hints"] > before["counters"]["prefetch_hints"]
        assert c.stats()["counters"]["puts"] == 69  # the second from_pretrained ingested nothing
        detach(streaming)
        detach(resident)
        assert c.stats()["leases"] == 0


def test_ingest_twice_skips_everything(start_daemon, ckpt, capsys) -> None:
    d = start_daemon(disk_bytes="64MiB")
    with Client(socket=d.socket) as c:
        first = ingest(c, ckpt, "tiny", progress=True)
        assert "GB/s" in capsys.readouterr().err
        assert first["put"] == first["tensors"] == 69 and first["skipped"] == 0
        assert first["bytes"] == weight_bytes(ckpt)
        entries = c.ls("tiny/")
        assert all(e["durable"] and "weight" in e["tags"] for e in entries)
        assert all(any(t.startswith("xxh3:") for t in e["tags"]) for e in entries)
        second = ingest(c, ckpt, "tiny", progress=False)
        assert second["put"] == 0 and second["skipped"] == 69 and second["bytes"] == 0
        assert [e["version"] for e in c.ls("tiny/")] == [e["version"] for e in entries]


def test_ingest_quick_check_reads_nothing_unless_the_file_changed(
    start_daemon, ckpt, tmp_path, monkeypatch
) -> None:
    import shutil

    from tierd_integration import shards

    copy = tmp_path / "copy"
    shutil.copytree(ckpt, copy)
    reads: list[str] = []
    real_read = shards.Shard.read

    def counting_read(self, name):
        reads.append(name)
        return real_read(self, name)

    monkeypatch.setattr(shards.Shard, "read", counting_read)
    d = start_daemon(disk_bytes="64MiB")
    with Client(socket=d.socket) as c:
        assert ingest(c, copy, "tiny", progress=False)["put"] == 69 and len(reads) == 69
        reads.clear()
        again = ingest(c, copy, "tiny", progress=False)  # same files: not a byte read
        assert again["skipped"] == 69 and reads == []
        verified = ingest(c, copy, "tiny", progress=False, verify=True)  # read and compared
        assert verified["skipped"] == 69 and verified["put"] == 0 and len(reads) == 69
        reads.clear()
        shard = sorted(copy.glob("*.safetensors"))[0]
        os.utime(shard, ns=(shard.stat().st_atime_ns, shard.stat().st_mtime_ns + 10**9))  # touched
        touched = ingest(c, copy, "tiny", progress=False)
        n = len(shards.Shard(shard).tensors)
        assert touched["skipped"] == 69 and touched["put"] == 0 and len(reads) == n >= 1


def test_ingest_refuses_a_broken_shard_with_its_name(daemon, tmp_path) -> None:
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "model.safetensors").write_bytes((1 << 40).to_bytes(8, "little") + b"{}")
    with Client(socket=daemon.socket) as c, pytest.raises(ValueError, match=r"model\.safetensors"):
        ingest(c, bad, "bad", progress=False)
    (bad / "model.safetensors").write_bytes((2).to_bytes(8, "little") + b"[]")
    with Client(socket=daemon.socket) as c, pytest.raises(ValueError, match="not a JSON object"):
        ingest(c, bad, "bad", progress=False)


def test_ingest_replaces_changed_tensor(daemon, ckpt, tmp_path) -> None:
    from safetensors.torch import load_file, save_file

    changed = tmp_path / "changed"
    changed.mkdir()
    for f in ckpt.glob("*.safetensors"):
        sd = load_file(f)
        if "model.language_model.norm.weight" in sd:
            sd["model.language_model.norm.weight"] = sd["model.language_model.norm.weight"] + 1
        save_file(sd, changed / f.name, metadata={"format": "pt"})
    with Client(socket=daemon.socket) as c:
        ingest(c, ckpt, "tiny", progress=False)
        old = {e["key"]: e["version"] for e in c.ls("tiny/")}
        again = ingest(c, changed, "tiny", progress=False)
        assert again["put"] == 1 and again["skipped"] == 68
        new = {e["key"]: e["version"] for e in c.ls("tiny/")}
        assert {k for k in old if old[k] != new[k]} == {"tiny/model.language_model.norm.weight"}


def test_detach_restores_plain_model(daemon, ckpt, inputs, reference) -> None:
    c = Client(socket=daemon.socket)
    model = from_pretrained(ckpt, c, ram_budget=streaming_minimum(ckpt))  # streaming, no layer kept
    layer = model.model.language_model.layers[1]
    assert "forward" in layer.__dict__
    detach(model)
    assert "forward" not in layer.__dict__ and not hasattr(layer, "_tierd_hook")
    assert not hasattr(model, "_tierd_binding")
    assert c.stats()["leases"] == 0
    c.close()  # the model no longer needs tierd
    assert not any(p.is_meta for p in model.parameters())
    assert model.lm_head.weight is model.model.language_model.embed_tokens.weight
    assert torch.equal(generate(model, inputs), reference)


def test_offload_model_in_memory(daemon, ckpt, plain, inputs, reference) -> None:
    from transformers import Qwen3VLForConditionalGeneration

    model = Qwen3VLForConditionalGeneration.from_pretrained(ckpt).eval()
    with Client(socket=daemon.socket) as c:
        offload_model(model, c, "mem", durable=False, mode="streaming")
        assert len(c.ls("mem/")) == 69  # the tied lm_head is stored once
        assert torch.equal(generate(model, inputs), reference)
        detach(model)
    assert torch.equal(generate(model, inputs), reference)


WORKER = r"""
import json, sys, torch
from tierd_client import Client
from tierd_integration import from_pretrained, sample_inputs
c = Client(socket=sys.argv[1])
model = from_pretrained(sys.argv[2], c, namespace="shared")
base = c.arena.ro.ctypes.data
offsets = {n: p.untyped_storage().data_ptr() - base for n, p in model.named_parameters()}
with torch.no_grad():
    out = model.generate(**sample_inputs(model, seed=1), max_new_tokens=int(sys.argv[3]), do_sample=False)
print(json.dumps({
    "in_arena": all(c.arena.contains(p) for p in model.parameters()),
    "offsets": offsets, "tokens": out.tolist(), "leases": c.lease_count,
}), flush=True)
sys.stdin.read()  # hold the model (and its leases) until told to go, or killed
"""


def spawn(daemon, ckpt: Path) -> tuple[subprocess.Popen, dict]:
    proc = subprocess.Popen(
        [sys.executable, "-c", WORKER, str(daemon.socket), str(ckpt), str(NEW_TOKENS)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )  # fmt: skip
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        proc.kill()
        proc.communicate()
        raise AssertionError(f"worker died: rc={proc.returncode}")
    return proc, json.loads(line)


def test_two_processes_share_the_same_arena_bytes(daemon, ckpt, reference) -> None:
    with Client(socket=daemon.socket) as c:
        a, ra = spawn(daemon, ckpt)
        puts = c.stats()["counters"]["puts"]
        entries = len(c.ls("shared/"))
        b, rb = spawn(daemon, ckpt)
        try:
            assert c.stats()["counters"]["puts"] == puts  # the second process added nothing
            assert len(c.ls("shared/")) == entries == 69
            assert ra["in_arena"] and rb["in_arena"]
            assert ra["offsets"] == rb["offsets"]  # the same bytes of the one arena
            assert ra["tokens"] == rb["tokens"] == reference.tolist()
            assert c.stats()["leases"] == ra["leases"] + rb["leases"] == 2 * 69
        finally:
            for p in (a, b):
                p.communicate("")
        assert a.returncode == b.returncode == 0
        wait_until(lambda: c.stats()["leases"] == 0, what="leases released at exit")


def test_killed_model_process_leaves_no_leases(daemon, ckpt) -> None:
    with Client(socket=daemon.socket) as c:
        baseline = c.stats()["leases"]
        proc, r = spawn(daemon, ckpt)
        assert r["leases"] == 69
        assert c.stats()["leases"] == baseline + 69
        proc.send_signal(signal.SIGKILL)
        proc.communicate()  # waits, and closes our ends of its pipes
        assert proc.returncode == -signal.SIGKILL
        wait_until(lambda: c.stats()["leases"] == baseline, what="leases of the killed process dropped")
        assert len(c.ls("shared/")) == 69  # the weights stay for the next process


def test_tierctl_import(start_daemon, short_tmp: Path) -> None:
    from tierd_integration import make_random_checkpoint

    ckpt = make_random_checkpoint(short_tmp / "ckpt", size="tiny", seed=0)
    d = start_daemon(disk_bytes="256MiB")
    cmd = [sys.executable, "-m", "tierd_client.tierctl", "--socket", str(d.socket), "import", str(ckpt)]
    first = subprocess.run([*cmd, "--namespace", "tiny"], capture_output=True, text=True)
    assert first.returncode == 0, first.stderr
    assert "tensors" in first.stderr  # progress
    again = subprocess.run([*cmd, "--namespace", "tiny", "--json"], capture_output=True, text=True)
    counts = json.loads(again.stdout)
    assert counts["put"] == 0 and counts["skipped"] > 0
    with Client(d.socket) as c:
        weights = c.ls("tiny/")
        assert len(weights) == counts["skipped"]
        assert all("weight" in e["tags"] and e["durable"] for e in weights)
    bad = subprocess.run([*cmd[:-1], str(short_tmp)], capture_output=True, text=True)
    assert bad.returncode == 2 and "not a checkpoint folder" in bad.stderr


def test_streaming_keeps_the_first_layers_resident_when_there_is_room(
    daemon, ckpt, inputs, reference
) -> None:
    with Client(socket=daemon.socket) as c:
        model = from_pretrained(ckpt, c, mode="streaming")  # forced: the tier could hold it all
        binding = model._tierd_binding
        layers = model.model.language_model.layers
        assert binding.kept_blocks == len(layers)  # room for every decoder layer: none streams
        assert all(not hasattr(layer, "_tierd_hook") for layer in layers)
        assert all(c.arena.contains(p) for p in layers[0].parameters())
        assert isinstance(model.model.visual.blocks[0]._tierd_hook, StreamBlockHook)  # prefill only
        before = c.stats()["counters"]["gets"]
        assert torch.equal(generate(model, inputs), reference)
        # the vision blocks and mergers stream (prefill only), the patch embedding stays resident
        visual = model.model.visual
        streamed = []  # in forward order: each deepstack merger right after the block it reads
        for i, block in enumerate(visual.blocks):
            streamed.append(block)
            if i in visual.deepstack_visual_indexes:
                streamed.append(visual.deepstack_merger_list[visual.deepstack_visual_indexes.index(i)])
        streamed.append(visual.merger)
        assert [m for m, _ in binding.blocks] == streamed
        assert all(isinstance(m._tierd_hook, StreamBlockHook) for m in streamed)
        assert not hasattr(visual.patch_embed, "_tierd_hook")
        # decoding fetched nothing for the kept layers: only the streamed vision modules, once, at prefill
        assert c.stats()["counters"]["gets"] - before == sum(len(list(m.parameters())) for m in streamed)
        detach(model)


class _MatmulOps(TorchDispatchMode):
    """Records the batched matmuls (``aten.bmm``) whose right operand is as large as ``numel``: the
    path where torch copies a broadcast weight's transpose before multiplying."""

    def __init__(self, numel: int) -> None:
        super().__init__()
        self.numel = numel
        self.batched: list[tuple[int, ...]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.bmm.default and args[1].numel() >= self.numel:
            self.batched.append(tuple(args[1].shape))
        return func(*args, **(kwargs or {}))


def _head_matmuls(model, ids: torch.Tensor) -> list[tuple[int, ...]]:
    head = model.lm_head.weight
    with torch.no_grad(), _MatmulOps(head.shape[0] * head.shape[1]) as ops:
        model(input_ids=ids, attention_mask=torch.ones_like(ids), logits_to_keep=1)
    return ops.batched


def test_bound_weights_keep_the_plain_models_matmul_path(daemon) -> None:
    """A bound model multiplies by its output head as the plain model does (one mm), in resident and
    streaming mode. A frozen head (requires_grad=False) makes torch broadcast it into a bmm that copies
    its transpose: 622 MB per step at Qwen3-VL-2B's 151,936 x 2,048 head.
    The vocabulary is 74x the hidden size, as in the real model."""
    from transformers import Qwen3VLForConditionalGeneration

    from tierd_integration.checkpoint import make_config

    cfg = make_config("tiny")
    cfg.text_config.vocab_size = 74 * cfg.text_config.hidden_size
    torch.manual_seed(0)
    plain = Qwen3VLForConditionalGeneration(cfg).eval()
    ids = torch.randint(1, 1000, (1, 24))
    assert _head_matmuls(plain, ids) == []
    flags = {n: p.requires_grad for n, p in plain.named_parameters()}
    plain.requires_grad_(False)  # what binding used to do: the detector sees the copying path
    assert _head_matmuls(plain, ids), "a frozen head should take the batched path"
    plain.requires_grad_(True)
    expected = plain(input_ids=ids, logits_to_keep=1).logits.detach()

    with Client(socket=daemon.socket) as c:
        for mode in ("resident", "streaming"):
            model = Qwen3VLForConditionalGeneration(cfg).eval()
            model.load_state_dict(plain.state_dict())
            offload_model(model, c, f"wide-{mode}", durable=False, mode=mode)
            assert model._tierd_binding.mode == mode
            assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
            assert _head_matmuls(model, ids) == [], mode
            with torch.no_grad():
                assert torch.equal(model(input_ids=ids, logits_to_keep=1).logits, expected)
            detach(model)
        assert c.stats()["leases"] == 0


def test_backward_into_bound_weights_is_refused_and_adapters_train(daemon, ckpt, inputs) -> None:
    """Bound weights keep requires_grad (for torch's op path), but an optimizer step into the read-only
    arena would fault: a gradient reaching one raises a clear error at backward instead. Frozen bound
    weights with a trainable adapter beside them train normally."""
    with Client(socket=daemon.socket) as c:
        model = from_pretrained(ckpt, c)
        ids = inputs["input_ids"][:, :8]
        loss = model(input_ids=ids).logits.float().square().mean()
        with pytest.raises(RuntimeError, match="read-only view"):
            loss.backward()
        model.requires_grad_(False)
        adapter = torch.nn.Parameter(torch.zeros(model.config.text_config.hidden_size))
        embed = model.model.language_model.embed_tokens
        handle = embed.register_forward_hook(lambda m, a, out: out + adapter)
        model(input_ids=ids).logits.float().square().mean().backward()
        assert adapter.grad is not None and adapter.grad.abs().sum() > 0
        handle.remove()
        detach(model)


def test_device_cuda_serves_the_weights_from_the_gpu_tier(start_daemon, ckpt, inputs, reference) -> None:
    """from_pretrained(..., device="cuda") on the simulated GPU device (CPU tensors over its slabs):
    resident and streamed RAM -> GPU per block, identical tokens; refused without a GPU tier."""
    from tierd_client import Unsupported

    d = start_daemon("--gpu-backend", "simulated", "--gpu-bytes", "64MiB")
    with Client(socket=d.socket) as c:
        resident = from_pretrained(ckpt, c, device="cuda")
        binding = resident._tierd_binding
        assert binding.mode == "resident" and binding.tier == "gpu"
        assert not any(c.arena.contains(p) for p in resident.parameters())  # not the RAM copies
        assert all("gpu" in e["tiers"] for e in c.ls(f"{binding.namespace}/"))
        assert torch.equal(generate(resident, inputs), reference)

        # a budget that keeps no decoder layer resident: every block streams RAM -> GPU
        streaming = from_pretrained(ckpt, c, device="cuda", ram_budget=streaming_minimum(ckpt))
        assert streaming._tierd_binding.mode == "streaming"
        hook = streaming.model.language_model.layers[0]._tierd_hook
        assert isinstance(hook, StreamBlockHook) and hook.tier == "gpu"
        before = c.stats()
        assert torch.equal(generate(streaming, inputs), reference)
        after = c.stats()
        assert after["counters"]["hits_gpu"] > before["counters"]["hits_gpu"]  # blocks read on the GPU
        assert after["leases"] == before["leases"]
        detach(streaming)
        detach(resident)
        assert c.stats()["leases"] == 0
    d.stop()
    plain = start_daemon()
    with Client(socket=plain.socket) as c, pytest.raises(Unsupported, match="GPU tier"):
        from_pretrained(ckpt, c, device="cuda")
