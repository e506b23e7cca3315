"""Two machines' worth of daemons on one host, one real Redis Cluster: daemon A ingests a tiny random
Qwen3-VL checkpoint with share=True; daemon B, with an empty state dir, serves from_pretrained for
the same model from the remote tier after the checkpoint files are gone, and the tokens are
identical; a vision feature computed on A is a hit on B."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from tests.redis_cluster import LocalCluster
from tests.test_integration_weights import NEW_TOKENS, generate
from tests.test_remote import Start, _prefix, _remote, _until_shared
from tierd_client import Client, NotFound
from tierd_integration import from_pretrained, ingest, make_random_checkpoint, sample_inputs
from tierd_integration.vision import disable_vision_cache, enable_vision_cache


def test_b_runs_the_model_a_shared_without_the_checkpoint(
    redis_cluster: LocalCluster, machines: Start, tmp_path: Path
) -> None:
    from transformers import Qwen3VLForConditionalGeneration

    ckpt = make_random_checkpoint(tmp_path / "tiny-vl", size="tiny", seed=0)
    plain = Qwen3VLForConditionalGeneration.from_pretrained(ckpt).eval()
    inputs = sample_inputs(plain, seed=1)
    reference = generate(plain, inputs)
    del plain
    prefix = _prefix()
    a = machines("a", *_remote(redis_cluster, prefix, "--remote-tags", "vision"), disk_bytes="64MiB")
    b = machines("b", *_remote(redis_cluster, prefix, "--remote-tags", "vision"))
    with Client(a.socket) as ca:
        got = ingest(ca, ckpt, "tiny-vl", share=True, progress=False)
        manifest = [e["key"].rsplit("/", 1)[1] for e in ca.ls("tiny-vl/.checkpoint/")]
        assert manifest == ["config.json", "generation_config.json", "tensors.json"]
        shared = got["put"] + len(manifest)
        _until_shared(ca, shared)  # every tensor and the checkpoint's description
        model_a = from_pretrained(ckpt, ca, namespace="tiny-vl")
        assert torch.equal(generate(model_a, inputs), reference)
        h = enable_vision_cache(model_a, ca)
        generate(model_a, inputs)  # computes the image's features and puts them, tagged vision
        assert (h.hits, h.misses) == (0, 1)
        _until_shared(ca, shared + 1)
        disable_vision_cache(model_a)

    shutil.rmtree(ckpt)  # B has no checkpoint files: everything comes from the remote tier
    with Client(b.socket) as cb:
        assert cb.ls("tiny-vl/") == []  # an empty daemon
        with pytest.raises(NotFound, match="share=True"):
            from_pretrained(None, cb, namespace="no-such-model")
        model_b = from_pretrained(None, cb, namespace="tiny-vl")
        assert model_b._tierd_binding.mode == "resident"
        out = generate(model_b, inputs)
        assert out.shape[1] == inputs["input_ids"].shape[1] + NEW_TOKENS
        assert torch.equal(out, reference)
        st = cb.stats()["counters"]
        assert st["remote_hits"] == shared and st["shares_written"] == 0

        h = enable_vision_cache(model_b, cb)
        assert torch.equal(generate(model_b, inputs), reference)
        assert (h.hits, h.misses) == (1, 0)  # A's feature, found in the remote tier
        assert cb.stats()["counters"]["remote_hits"] == shared + 1
        disable_vision_cache(model_b)
