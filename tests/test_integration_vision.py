"""The tierd vision cache on a tiny random Qwen3-VL (built here from a config: no downloads), against a
real daemon. test_integration_kv imports the model builder from here."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import wait_until
from tierd_client import Client
from tierd_integration.vision import disable_vision_cache, enable_vision_cache, find_visual

IMAGE_TOKEN, VIDEO_TOKEN, VISION_START, VISION_END = 250, 251, 252, 253


def build_tiny_qwen3vl(seed: int = 0) -> torch.nn.Module:
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    torch.manual_seed(seed)
    cfg = Qwen3VLConfig(
        text_config=dict(
            vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
            rope_parameters={
                "rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3],
                "mrope_interleaved": True,
            },
        ),
        vision_config=dict(
            depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=16,
            spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=64,
            deepstack_visual_indexes=[0, 1],
        ),
        image_token_id=IMAGE_TOKEN, video_token_id=VIDEO_TOKEN,
        vision_start_token_id=VISION_START, vision_end_token_id=VISION_END,
    )  # fmt: skip
    return Qwen3VLForConditionalGeneration(cfg).eval()


def image_inputs(seed: int = 1, grid: tuple[int, int, int] = (1, 4, 4), text: int = 3) -> dict:
    """One image of ``grid`` patches (t, h, w) between ``text`` tokens before and after."""
    gen = torch.Generator().manual_seed(seed)
    t, h, w = grid
    pixel_values = torch.randn(t * h * w, 3 * 2 * 16 * 16, generator=gen)
    n = t * h * w // 4  # spatial_merge_size 2: 4 patches per token
    pre = list(range(1, text + 1))
    ids = [*pre, VISION_START] + [IMAGE_TOKEN] * n + [VISION_END, *range(10, 10 + text)]
    types = [0] * (len(pre) + 1) + [1] * n + [0] * (text + 1)
    return dict(
        input_ids=torch.tensor([ids]),
        attention_mask=torch.ones(1, len(ids), dtype=torch.long),
        pixel_values=pixel_values,
        image_grid_thw=torch.tensor([list(grid)]),
        mm_token_type_ids=torch.tensor([types]),
    )


def text_inputs(n: int = 12, seed: int = 2) -> dict:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 200, (1, n), generator=gen)
    return dict(input_ids=ids, attention_mask=torch.ones_like(ids))


GEN = dict(max_new_tokens=8, do_sample=False)


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return build_tiny_qwen3vl()


def _count_block_calls(model: torch.nn.Module) -> tuple[list[int], list]:
    calls = [0]

    def hook(*_: object) -> None:
        calls[0] += 1

    handles = [blk.register_forward_pre_hook(hook) for blk in find_visual(model).blocks]
    return calls, handles


@torch.no_grad()
def test_hit_gives_identical_tokens_without_running_the_tower(daemon, model) -> None:
    inputs = image_inputs(seed=1)
    calls, hooks = _count_block_calls(model)
    try:
        plain = model.generate(**inputs, **GEN)
        plain_calls = calls[0]
        assert plain_calls == 2  # 2 blocks, once in prefill
        with Client(daemon.socket) as c:
            h = enable_vision_cache(model, c)
            try:
                miss = model.generate(**inputs, **GEN)
                assert (h.hits, h.misses) == (0, 1)
                assert calls[0] == 2 * plain_calls
                [entry] = c.ls("vision/")
                assert "vision" in entry["tags"]
                hit = model.generate(**inputs, **GEN)
                assert (h.hits, h.misses) == (1, 1)
                assert calls[0] == 2 * plain_calls, "the vision tower ran on a hit"
            finally:
                disable_vision_cache(model)
    finally:
        for hk in hooks:
            hk.remove()
    assert torch.equal(miss, plain)
    assert torch.equal(hit, plain)


@torch.no_grad()
def test_hit_features_equal_tower_features(daemon, model) -> None:
    inputs = image_inputs(seed=3)
    pv, grid = inputs["pixel_values"], inputs["image_grid_thw"]
    ref = model.model.get_image_features(pv, grid, return_dict=True)
    with Client(daemon.socket) as c:
        h = enable_vision_cache(model, c)
        try:
            model.model.get_image_features(pv, grid, return_dict=True)
            got = model.model.get_image_features(pv, grid, return_dict=True)
            assert (h.hits, h.misses) == (1, 1)
        finally:
            disable_vision_cache(model)
    assert len(got.deepstack_features) == len(ref.deepstack_features) == 2
    for a, b in zip(got.pooler_output, ref.pooler_output, strict=True):
        assert torch.equal(a, b)
    for fa, fb in zip(got.deepstack_features, ref.deepstack_features, strict=True):
        for a, b in zip(fa, fb, strict=True):
            assert torch.equal(a, b)


@torch.no_grad()
def test_copy_mode_hands_writable_tensors(daemon, model) -> None:
    inputs = image_inputs(seed=4)
    pv, grid = inputs["pixel_values"], inputs["image_grid_thw"]
    with Client(daemon.socket) as c:
        h = enable_vision_cache(model, c, copy=True)
        try:
            model.model.get_image_features(pv, grid, return_dict=True)
            got = model.model.get_image_features(pv, grid, return_dict=True)
            assert h.hits == 1
            got.pooler_output[0].add_(1.0)  # an ordinary tensor, not a view of the arena
        finally:
            disable_vision_cache(model)


@torch.no_grad()
def test_different_image_is_a_miss(daemon, model) -> None:
    with Client(daemon.socket) as c:
        h = enable_vision_cache(model, c)
        try:
            model.generate(**image_inputs(seed=1), **GEN)
            model.generate(**image_inputs(seed=2), **GEN)
            assert (h.hits, h.misses) == (0, 2)
            model.generate(**image_inputs(seed=1, grid=(1, 4, 8)), **GEN)  # other size
            assert (h.hits, h.misses) == (0, 3)
            model.generate(**image_inputs(seed=2), **GEN)
            assert (h.hits, h.misses) == (1, 3)
            assert len(c.ls("vision/")) == 3
        finally:
            disable_vision_cache(model)


@torch.no_grad()
def test_disable_restores_the_original_forward(daemon, model) -> None:
    visual = find_visual(model)
    assert "forward" not in visual.__dict__
    inputs = image_inputs(seed=5)
    calls, hooks = _count_block_calls(model)
    try:
        with Client(daemon.socket) as c:
            h = enable_vision_cache(model, c)
            assert "forward" in visual.__dict__
            with pytest.raises(ValueError):
                enable_vision_cache(model, c)
            model.generate(**inputs, **GEN)
            assert disable_vision_cache(model) is h
            assert "forward" not in visual.__dict__
            assert disable_vision_cache(model) is None
            before = calls[0]
            model.generate(**inputs, **GEN)  # cached, but the cache is off: the tower runs
            assert calls[0] == before + 2
            assert (h.hits, h.misses) == (0, 1)
    finally:
        for hk in hooks:
            hk.remove()


@torch.no_grad()
def test_client_scope_entries_go_with_the_client(daemon, model) -> None:
    with Client(daemon.socket) as c:
        enable_vision_cache(model, c, scope="client", namespace="vscratch")
        try:
            model.generate(**image_inputs(seed=6), **GEN)
            assert len(c.ls("vscratch/")) == 1
        finally:
            disable_vision_cache(model)
    with Client(daemon.socket) as c2:
        wait_until(lambda: c2.ls("vscratch/") == [], what="client-scope vision entries to go")
