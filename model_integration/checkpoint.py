"""Small random Qwen3-VL checkpoints, made offline, and inputs with one image for them.

No tokenizer is saved: none can be built offline without a vocabulary file, so callers (tests, the
demo) feed token ids directly. An image processor config is saved when transformers can make one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

# The vocabulary of the small sizes; the image, video and vision start / end token ids are its last
# four, as the real config puts them after the text tokens.
_VOCAB = 1024

_SIZES: dict[str, dict[str, Any]] = {
    # hidden, text layers, intermediate, vision hidden, vision blocks; optional: vocab, the vision
    # blocks with a deepstack merger (default: every block), dtype of the saved weights (default fp32)
    "tiny": {"hidden": 64, "layers": 2, "inter": 128, "vhidden": 64, "vblocks": 2},
    "small": {"hidden": 128, "layers": 4, "inter": 256, "vhidden": 128, "vblocks": 2},
    # Qwen3-VL-2B's proportions at 1/16 of its width (16 MB): vocabulary 74x the hidden size (the
    # tied head is 15% of the weights, 2B: 15%), 28 decoder layers (69%, 2B: 66%), 24 vision blocks
    # and mergers, deepstack after blocks 5, 11 and 17 (15%, 2B: 19%); the patch embedding, which does
    # not scale with the width, is 1.2% (2B: 0.1%). bf16. Budgets as shares of the weights then mean
    # about what they do at 2B.
    "2b-proportions": {
        "hidden": 128, "layers": 28, "inter": 384, "vhidden": 64, "vblocks": 24, "vocab": 74 * 128,
        "deepstack": [5, 11, 17], "dtype": "bfloat16",
    },
}  # fmt: skip


def make_config(size: str = "tiny") -> Any:
    """A Qwen3VLConfig shaped like the real one (mrope, deepstack on every vision block), only small."""
    from transformers import Qwen3VLConfig

    if size not in _SIZES:
        raise ValueError(f"size must be one of {sorted(_SIZES)}, not {size!r}")
    s = _SIZES[size]
    vocab = s.get("vocab", _VOCAB)
    head_dim = 16
    return Qwen3VLConfig(
        text_config={
            "hidden_size": s["hidden"],
            "intermediate_size": s["inter"],
            "num_hidden_layers": s["layers"],
            "num_attention_heads": s["hidden"] // head_dim,
            "num_key_value_heads": max(1, s["hidden"] // head_dim // 2),
            "head_dim": head_dim,
            "vocab_size": vocab,
            "max_position_embeddings": 1024,
            "rope_scaling": {"rope_type": "default", "mrope_section": [2, 3, 3], "mrope_interleaved": True},
        },
        vision_config={
            "depth": s["vblocks"],
            "hidden_size": s["vhidden"],
            "intermediate_size": s["vhidden"] * 2,
            "num_heads": s["vhidden"] // 16,
            "out_hidden_size": s["hidden"],
            "patch_size": 16,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "deepstack_visual_indexes": s.get("deepstack", list(range(s["vblocks"]))),
            "num_position_embeddings": 64,
        },
        image_token_id=vocab - 4,
        video_token_id=vocab - 3,
        vision_start_token_id=vocab - 2,
        vision_end_token_id=vocab - 1,
        tie_word_embeddings=True,
    )


def make_random_checkpoint(out_dir: str | Path, *, size: str = "tiny", seed: int = 0) -> Path:
    """Build a random Qwen3-VL of ``size`` ("tiny", "small" or "2b-proportions") and save it to ``out_dir``.

    Writes ``config.json``, safetensors shards (``model-0000X-of-0000N.safetensors`` with an index,
    so readers see a real sharded layout) and, where possible, ``preprocessor_config.json``.
    Returns the directory. The same ``size`` and ``seed`` give the same weights.
    """
    from transformers import Qwen3VLForConditionalGeneration

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = make_config(size)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen3VLForConditionalGeneration(cfg).eval()
    model.to(getattr(torch, _SIZES[size].get("dtype", "float32")))
    model.save_pretrained(out, max_shard_size={"tiny": "200KB", "small": "1MB"}.get(size, "4MB"))
    try:
        from transformers import Qwen2VLImageProcessorPil

        proc = Qwen2VLImageProcessorPil(patch_size=16, temporal_patch_size=2, merge_size=2)
        proc.save_pretrained(out)
    except Exception:  # noqa: BLE001 - the processor is optional: inputs can be made by sample_inputs
        pass
    return out


def sample_inputs(model_or_config: Any, *, seed: int = 0, grid: tuple[int, int] = (4, 4)) -> dict[str, Any]:
    """Inputs for generate() with one small random image: pixel_values, image_grid_thw, input_ids
    (text, vision start, the image tokens, vision end, text), attention_mask, mm_token_type_ids."""
    cfg = getattr(model_or_config, "config", model_or_config)
    v = cfg.vision_config
    h, w = grid
    merge = v.spatial_merge_size
    n_patches = h * w
    n_image_tokens = n_patches // (merge * merge)
    g = torch.Generator().manual_seed(seed)
    pixel_values = torch.randn(
        n_patches, v.in_channels * v.temporal_patch_size * v.patch_size**2, generator=g
    )
    text_vocab = cfg.text_config.vocab_size - 8
    before = torch.randint(0, text_vocab, (3,), generator=g).tolist()
    after = torch.randint(0, text_vocab, (4,), generator=g).tolist()
    ids = (
        before
        + [cfg.vision_start_token_id]
        + [cfg.image_token_id] * n_image_tokens
        + [cfg.vision_end_token_id]
        + after
    )
    input_ids = torch.tensor([ids], dtype=torch.long)
    mm = (input_ids == cfg.image_token_id).to(torch.int32)
    return {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "mm_token_type_ids": mm,
        "pixel_values": pixel_values,
        "image_grid_thw": torch.tensor([[1, h, w]], dtype=torch.long),
    }
