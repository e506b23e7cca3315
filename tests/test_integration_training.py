"""Fine-tuning through tierd: saved activations (offload_activations) and Adam's moments
(offload_optimizer_state) on a small random Qwen3-VL with LoRA-style adapters and an image, against a
real daemon. Gradients and updated weights are compared bit for bit with the same step run plainly."""

from __future__ import annotations

import copy
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from tests.conftest import wait_until
from tierd_client import Client
from tierd_integration import offload_activations, offload_optimizer_state
from tierd_integration.checkpoint import make_config, sample_inputs

MiB = 1 << 20


class LoRA(torch.nn.Module):
    """``base(x) + x A^T B^T``: the base layer frozen, A and B trained (B nonzero, so A gets a gradient)."""

    def __init__(self, base: torch.nn.Linear, rank: int = 4) -> None:
        super().__init__()
        self.base = base
        self.A = torch.nn.Parameter(torch.randn(rank, base.in_features) * 0.05)
        self.B = torch.nn.Parameter(torch.randn(base.out_features, rank) * 0.05)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (x @ self.A.t()) @ self.B.t()


def lora_model(size: str = "tiny", seed: int = 0) -> torch.nn.Module:
    """A random Qwen3-VL, every weight frozen, adapters on the text q/v and the vision blocks' qkv."""
    from transformers import Qwen3VLForConditionalGeneration

    torch.manual_seed(seed)
    model = Qwen3VLForConditionalGeneration(make_config(size))
    model.requires_grad_(False)
    for layer in model.model.language_model.layers:
        layer.self_attn.q_proj = LoRA(layer.self_attn.q_proj)
        layer.self_attn.v_proj = LoRA(layer.self_attn.v_proj)
    for block in model.model.visual.blocks:
        block.attn.qkv = LoRA(block.attn.qkv)
    return model.train()


def batch(model: torch.nn.Module, grid: tuple[int, int] = (8, 8)) -> dict:
    inputs = sample_inputs(model, seed=3, grid=grid)
    inputs["labels"] = inputs["input_ids"].clone()
    return inputs


def trainable(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def grads_of_step(model: torch.nn.Module, inputs: dict, offload=None) -> dict[str, torch.Tensor]:
    """One forward + backward (inside ``offload`` when given); the adapters' gradients."""
    model.zero_grad(set_to_none=True)
    if offload is None:
        model(**inputs).loss.backward()
    else:
        with offload:
            model(**inputs).loss.backward()
    return {n: p.grad.clone() for n, p in trainable(model)}


def assert_bit_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys() and a
    for n in a:
        assert torch.equal(a[n], b[n]), f"{n}: max |diff| {(a[n] - b[n]).abs().max().item()}"
    assert any(g.abs().sum() > 0 for g in a.values()), "no gradient reached the adapters"


def enable_checkpointing(model: torch.nn.Module, kwargs: dict) -> None:
    """transformers' gradient checkpointing: activation_checkpointing_enable from 5.24 on (the old
    name warns there), gradient_checkpointing_enable before."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return lora_model("tiny")


def test_lossless_gradients_are_bit_identical_and_nothing_is_left(daemon, model) -> None:
    inputs = batch(model)
    plain = grads_of_step(model, inputs)
    with Client(daemon.socket) as c:
        off = offload_activations(c, min_bytes=4096)
        got = grads_of_step(model, inputs, off)
        assert_bit_identical(plain, got)
        s = off.stats
        assert s.offloaded > 10 and s.fetched >= s.offloaded - s.shared, s
        assert s.deleted == s.offloaded and s.hinted > 0, s
        assert c.ls(off.prefix) == [] and off.live_entries == 0
        st = c.stats()
        assert st["counters"]["prefetch_hints"] > 0 and st["leases"] == 0


@pytest.mark.parametrize("reentrant", [False, True], ids=["nonreentrant", "reentrant"])
def test_transformers_gradient_checkpointing(daemon, reentrant: bool) -> None:
    """Only the checkpointed layers' inputs are saved (and offloaded); gradients stay bit-identical."""
    model = lora_model("tiny")
    inputs = batch(model)
    plain = grads_of_step(model, inputs)
    enable_checkpointing(model, {"use_reentrant": reentrant})
    if reentrant:  # a reentrant checkpoint needs an input that requires grad (as for the text embeddings)
        model.model.visual.patch_embed.register_forward_hook(lambda _m, _i, out: out.requires_grad_(True))
    with Client(daemon.socket) as c:
        off_plain = offload_activations(c, min_bytes=4096)
        full = grads_of_step(lora_model("tiny"), inputs, off_plain)
        off = offload_activations(c, min_bytes=4096)
        got = grads_of_step(model, inputs, off)
        assert_bit_identical(plain, got)
        # checkpointing leaves fewer saved tensors: the layers' inputs and what runs outside them
        assert 0 < off.stats.offloaded < off_plain.stats.offloaded, (off.stats, off_plain.stats)
        assert_bit_identical(plain, full)
        assert c.ls("act/") == []


@pytest.mark.parametrize("reentrant", [False, True], ids=["nonreentrant", "reentrant"])
def test_torch_checkpoint_inputs_are_offloaded(daemon, reentrant: bool) -> None:
    """torch.utils.checkpoint saves its inputs through the hooks: they are the entries stored. What
    the reentrant recompute saves during backward stays in the process (it is used at once)."""
    torch.manual_seed(1)
    lin = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.GELU(), torch.nn.Linear(256, 256))
    x = torch.randn(64, 256, requires_grad=True)

    def run(offload=None) -> tuple[torch.Tensor, torch.Tensor]:
        lin.zero_grad()
        x.grad = None
        if offload is None:
            torch.utils.checkpoint.checkpoint(lin, x, use_reentrant=reentrant).square().sum().backward()
        else:
            with offload:
                torch.utils.checkpoint.checkpoint(lin, x, use_reentrant=reentrant).square().sum().backward()
        return x.grad.clone(), lin[0].weight.grad.clone()

    want = run()
    with Client(daemon.socket) as c:
        off = offload_activations(c, min_bytes=64 * 256 * 4)
        got = run(off)
        assert all(torch.equal(a, b) for a, b in zip(want, got, strict=True))
        # x (the checkpoint's input) and the output (saved by square) are what is stored
        assert off.stats.offloaded == 2 and c.ls("act/") == [], off.stats


def test_bf16_codec_keeps_its_stated_bound(daemon) -> None:
    """codec="bf16": float32 is stored at half the bytes and each saved value comes back rounded to
    bf16 (nearest-even), within |x - x'| <= 2**-8 |x| + 2**-134; other dtypes stay exact."""
    g = torch.Generator().manual_seed(5)
    x = (torch.randn(512, 512, generator=g) * torch.logspace(-20, 20, 512)).requires_grad_()
    with Client(daemon.socket) as c, offload_activations(c, min_bytes=0, codec="bf16") as off:
        (x * x).sum().backward()  # d/dx = 2 * (the saved x)
        saved = x.grad / 2
    assert torch.equal(saved, x.detach().bfloat16().float())
    err = (saved - x.detach()).abs()
    assert bool((err <= 2**-8 * x.detach().abs() + 2**-134).all())
    assert err.max() > 0 and off.stats.offloaded == 1 and off.stats.shared == 1
    assert off.stats.stored_bytes * 2 == off.stats.offloaded_bytes == x.numel() * 4

    y = torch.randn(256, 256, generator=g, dtype=torch.float64, requires_grad=True)
    with Client(daemon.socket) as c, offload_activations(c, min_bytes=0, codec="bf16") as off:
        (y * y).sum().backward()
    assert torch.equal(y.grad, 2 * y.detach()) and off.stats.offloaded == 1


def test_saved_activations_larger_than_the_ram_tier(start_daemon) -> None:
    """A 4 MiB RAM tier, a step saving five times that: entries are demoted to disk in forward
    and read back (hinted ahead) in backward; gradients are still bit-identical."""
    d = start_daemon(ram_bytes="4MiB", disk_bytes="512MiB")
    model = lora_model("small", seed=2)
    inputs = batch(model, grid=(32, 32))
    plain = grads_of_step(model, inputs)
    with Client(d.socket) as c:
        off = offload_activations(c, min_bytes=16 << 10, prefetch_depth=2)
        got = grads_of_step(model, inputs, off)
        assert_bit_identical(plain, got)
        assert off.stats.offloaded_bytes > 5 * 4 * MiB, off.stats
        counters = c.stats()["counters"]
        assert counters["demotions"] > 0 and counters["reads_disk"] + counters["prefetch_issued"] > 0, (
            counters
        )
        assert counters["tier_full"] == 0 and off.stats.put_failures == 0
        assert c.ls("act/") == []


def test_exit_without_backward_deletes_everything(daemon, model) -> None:
    inputs = batch(model)
    with Client(daemon.socket) as c:
        with offload_activations(c, min_bytes=4096) as off:
            loss = model(**inputs).loss
            assert len(c.ls(off.prefix)) == off.live_entries > 0
        assert c.ls("act/") == [] and off.stats.deleted == off.stats.offloaded
        with pytest.raises(RuntimeError, match="run backward inside the with block"):
            loss.backward()


CHILD = textwrap.dedent(
    """
    import sys, time, torch
    sys.path.insert(0, {root!r})
    from tests.test_integration_training import lora_model, batch
    from tierd_client import Client
    from tierd_integration import offload_activations
    model = lora_model("tiny")
    c = Client({socket!r})
    off = offload_activations(c, min_bytes=4096)
    off.__enter__()
    loss = model(**batch(model)).loss
    print(off.live_entries, flush=True)
    time.sleep(600)
    """
)


def test_a_killed_training_process_leaves_nothing(daemon) -> None:
    root = str(Path(__file__).resolve().parent.parent)
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD.format(root=root, socket=str(daemon.socket))],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None
        live = int(child.stdout.readline())  # the forward ran; backward has not started
        assert live > 0
        with Client(daemon.socket) as c:
            assert len(c.ls("act/")) == live
            os.kill(child.pid, signal.SIGKILL)
            child.wait()
            wait_until(
                lambda: c.ls("act/") == [] and c.stats()["clients"] == 1, what="the child's entries to go"
            )
            assert c.stats()["leases"] == 0
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        if child.stdout is not None:
            child.stdout.close()


def adam_run(
    offload_client: Client | None, steps: int = 3
) -> tuple[torch.nn.Module, torch.optim.Adam, object]:
    torch.manual_seed(7)
    net = torch.nn.Sequential(torch.nn.Linear(128, 256), torch.nn.Tanh(), torch.nn.Linear(256, 64))
    opt = torch.optim.Adam(
        [{"params": net[0].parameters()}, {"params": net[2].parameters(), "lr": 3e-3}], lr=1e-3, amsgrad=True
    )
    off = offload_optimizer_state(opt, offload_client, min_bytes=1024) if offload_client else None
    g = torch.Generator().manual_seed(8)
    for _ in range(steps):
        opt.zero_grad()
        net(torch.randn(32, 128, generator=g)).square().mean().backward()
        opt.step()
    return net, opt, off


def test_adam_state_offload_is_bit_identical(daemon) -> None:
    net0, opt0, _ = adam_run(None)
    with Client(daemon.socket) as c:
        net1, opt1, off = adam_run(c)
        for a, b in zip(net0.parameters(), net1.parameters(), strict=True):
            assert torch.equal(a, b)
        # between steps: the moments (3 per parameter with amsgrad) are in tierd, the step counters here
        entries = c.ls(off.prefix)
        assert len(entries) == 3 * 3 and all(e["key"].rsplit("/", 1)[1] != "step" for e in entries)
        assert off.stored_bytes_in_process < 1024 * 4
        sd0, sd1 = opt0.state_dict(), opt1.state_dict()
        for i, st in sd0["state"].items():
            assert st.keys() == sd1["state"][i].keys()
            for k, v in st.items():
                assert torch.equal(v, sd1["state"][i][k]), (i, k)
        assert off.stored_bytes_in_process < 1024 * 4  # state_dict() offloaded them again
        assert len(c.ls(off.prefix)) == 9
        off.remove()
        assert c.ls("opt/") == [] and off.stored_bytes_in_process > 100_000
        assert "step" not in vars(opt1)


class _Probe(torch.autograd.Function):
    """Saves its input and, in backward, records what autograd hands back for it."""

    seen: list[torch.Tensor] = []

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return x * 2

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        _Probe.seen.append(x)
        return g * 2


def test_layouts_come_back_as_saved(daemon) -> None:
    """A transposed and a permuted activation come back with their strides; an expanded one (its
    storage smaller than the tensor) stays in the process."""
    base = torch.randn(64, 32, 16, requires_grad=True)
    cases = [base.transpose(0, 2), base.permute(1, 2, 0), base[:, :1].expand(64, 500, 16), base * 1]
    with Client(daemon.socket) as c, offload_activations(c, min_bytes=1024) as off:
        _Probe.seen.clear()
        sum(_Probe.apply(x).sum() for x in cases).backward()
        assert off.stats.offloaded == 3 and off.stats.kept_other == 1, off.stats
    got = sorted(_Probe.seen, key=lambda t: (t.shape, t.stride()))
    want = sorted(cases, key=lambda t: (t.shape, t.stride()))
    for a, b in zip(got, want, strict=True):
        assert a.shape == b.shape and a.stride() == b.stride() and torch.equal(a, b)


def test_adam_state_offload_after_load_state_dict(daemon) -> None:
    """load_state_dict replaces the state: the stored entries are dropped and the next steps use the
    loaded moments, as the plain optimizer does."""
    net0, opt0, _ = adam_run(None, steps=2)
    with Client(daemon.socket) as c:
        net1, opt1, off = adam_run(c, steps=5)
        net1.load_state_dict(net0.state_dict())
        opt1.load_state_dict(copy.deepcopy(opt0.state_dict()))  # a copy: torch keeps the tensors it gets
        assert c.ls(off.prefix) == []
        g = torch.Generator().manual_seed(9)
        for _ in range(2):
            x = torch.randn(32, 128, generator=g)
            for net, opt in ((net0, opt0), (net1, opt1)):
                opt.zero_grad()
                net(x).square().mean().backward()
                opt.step()
        for a, b in zip(net0.parameters(), net1.parameters(), strict=True):
            assert torch.equal(a, b)
        assert len(c.ls(off.prefix)) == 9
        off.remove()
