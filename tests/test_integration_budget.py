"""RAM budgets for a streaming Qwen3-VL with the real 2B model's proportions (tests/ builds it at 1/32
of the width: vocabulary 74x the hidden size, 28 decoder layers, 24 vision blocks, bf16).

Below the minimum that ``streaming_minimum`` states, ``from_pretrained`` refuses with a typed error
before anything is read or put; at the minimum and every budget above it up to the whole model, a
real daemon with that RAM tier (and a disk tier) serves it and generate gives the plain model's tokens.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tierd_client import Client, TierFull
from tierd_integration import (
    RamTierTooSmall,
    detach,
    from_pretrained,
    make_random_checkpoint,
    sample_inputs,
    streaming_minimum,
)

NEW_TOKENS = 5


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_random_checkpoint(tmp_path_factory.mktemp("ckpt") / "vl-2b-prop", size="2b-proportions")


@pytest.fixture(scope="module")
def weights_bytes(ckpt: Path) -> int:
    return sum(p.stat().st_size for p in ckpt.glob("*.safetensors"))


@pytest.fixture(scope="module")
def inputs_and_reference(ckpt: Path) -> tuple[dict, torch.Tensor]:
    from transformers import Qwen3VLForConditionalGeneration

    plain = Qwen3VLForConditionalGeneration.from_pretrained(ckpt).eval()
    assert plain.dtype == torch.bfloat16
    inputs = sample_inputs(plain, seed=3)
    with torch.no_grad():
        return inputs, plain.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)


def _ram_capacity(c: Client) -> int:
    return next(int(t["capacity_bytes"]) for t in c.stats()["tiers"] if t["name"] == "ram")


def test_the_minimum_is_stated_and_below_it_nothing_is_read(start_daemon, ckpt, weights_bytes) -> None:
    need = streaming_minimum(ckpt)
    # the largest run of 3 blocks (the tied embedding and the two decoder layers after it: the
    # embedding streams as a block of its own when that needs less than keeping it resident)
    assert 0.15 * weights_bytes < need < 0.3 * weights_bytes
    assert streaming_minimum(ckpt, prefetch_depth=1) < need < streaming_minimum(ckpt, prefetch_depth=3)
    d = start_daemon(ram_bytes=str(need - 4096), disk_bytes="64MiB")
    with Client(socket=d.socket) as c:
        room = _ram_capacity(c)
        assert room < need
        with pytest.raises(RamTierTooSmall) as err:
            from_pretrained(ckpt, c)
        assert isinstance(err.value, TierFull)
        assert err.value.details["requested_bytes"] == need
        assert err.value.details["capacity_bytes"] == room
        assert "--ram-bytes" in str(err.value) and "prefetch_depth" in str(err.value)
        assert c.ls() == [] and c.stats()["counters"]["puts"] == 0  # nothing was ingested
        with pytest.raises(RamTierTooSmall):  # a budget below the minimum is refused the same way
            from_pretrained(ckpt, c, ram_budget=need // 2)
        assert c.stats()["leases"] == 0


@pytest.mark.parametrize("share", [None, 0.26, 0.3, 0.4, 0.6, 1.2])
def test_every_budget_from_the_minimum_up_generates_the_plain_tokens(
    start_daemon, ckpt, weights_bytes, inputs_and_reference, share
) -> None:
    """share None: a RAM tier of exactly the stated minimum; else that share of the weights' bytes
    (1.2: the whole model fits and is resident)."""
    inputs, reference = inputs_and_reference
    need = streaming_minimum(ckpt)
    ram = need if share is None else max(need, int(share * weights_bytes))
    ram = -(-ram // 4096) * 4096  # the daemon rounds its RAM tier down to whole pages
    d = start_daemon(ram_bytes=str(ram), disk_bytes="64MiB")
    with Client(socket=d.socket) as c:
        assert _ram_capacity(c) >= need
        model = from_pretrained(ckpt, c)
        binding = model._tierd_binding
        assert binding.mode == ("resident" if share == 1.2 else "streaming")
        # at the minimum even the (tied) embedding and output head stream; with room, they stay
        assert binding.edges == (share is None)
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
        assert torch.equal(out, reference), f"RAM tier {ram} bytes ({ram / weights_bytes:.0%} of the weights)"
        if binding.mode == "streaming":  # every pass measured; the window never below the one sized for
            pace = binding.pacer.stats()
            assert pace["passes"] >= NEW_TOKENS and pace["forwards"] > pace["passes"]
            assert min(pace["depths"]) >= 2 and pace["compute_s"] > 0
        detach(model)
        assert c.stats()["leases"] == 0
