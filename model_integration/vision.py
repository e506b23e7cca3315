"""A tierd-backed cache for a Qwen3-VL vision tower's outputs.

``enable_vision_cache(model, client)`` wraps the vision tower's ``forward`` (``model.model.visual``, the
module ``Qwen3VLModel.get_image_features`` / ``get_video_features`` call). The key is an xxh3-128 of the
pixel values' bytes, dtype and shape plus ``grid_thw``, under ``<namespace>/<model_id>/``. On a hit the
merged image embeddings (``pooler_output``) and every deepstack feature come from tierd and the tower does
not run; on a miss the tower runs and its outputs are put, tagged ``vision``.

One entry per image batch: ``pooler_output`` and the deepstack features all have the shape
``(merged_tokens, out_hidden_size)``, so they are stacked into one tensor ``(1 + n_deepstack, N, D)`` and
put once (a reader never sees half of a result). On a hit the model gets zero-copy views of that entry
(the lease ends when the views are garbage-collected). That is safe for Qwen3-VL: ``get_image_features``
only splits them and ``Qwen3VLModel.forward`` concatenates them (a copy) before any in-place op. Pass
``copy=True`` where other code writes into the features (a view of the arena is read-only); features
also get copied to the pixel values' device when that is not the CPU.

On a hit ``last_hidden_state`` (the pre-merger states, which Qwen3-VL does not use) is ``None``. Calls
asking for hidden states or attentions, and training with grad enabled, bypass the cache. The model's
weights are not fingerprinted: the default ``model_id`` hashes the config and name only, so pass a
``model_id`` to keep fine-tuned variants with one config apart.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch
import xxhash

from tierd_client import NotFound, TierFull

log = logging.getLogger(__name__)

_HANDLE_ATTR = "_tierd_vision_cache"


@dataclass
class VisionCacheHandle:
    """What ``enable_vision_cache`` returns: counters, and ``detach()`` (the same as disable)."""

    model: Any
    visual: torch.nn.Module
    client: Any
    namespace: str
    model_id: str
    scope: str
    copy: bool
    hits: int = 0
    misses: int = 0
    bypassed: int = 0
    put_failures: int = 0
    _had_instance_forward: bool = False
    _saved_instance_forward: Any = None
    _original_forward: Any = field(default=None, repr=False)

    def key_for(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> str:
        return f"{self.namespace}/{self.model_id}/{feature_hash(pixel_values, grid_thw)}"

    def detach(self) -> None:
        disable_vision_cache(self.model)


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    t = t.detach().to("cpu").contiguous()
    if t.numel() == 0:
        return memoryview(b"")
    return t.reshape(-1).view(torch.uint8).numpy().data


def feature_hash(pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> str:
    """xxh3-128 hex of the pixel values (bytes, dtype, shape) and grid_thw (as int64)."""
    h = xxhash.xxh3_128()
    h.update(f"{pixel_values.dtype}|{tuple(pixel_values.shape)}|".encode())
    h.update(_tensor_bytes(pixel_values))
    h.update(b"|grid|")
    h.update(_tensor_bytes(torch.as_tensor(grid_thw).to(torch.int64)))
    return h.hexdigest()


def find_visual(model: torch.nn.Module) -> torch.nn.Module:
    """The vision tower: ``model.model.visual`` (ForConditionalGeneration) or ``model.visual`` (Model)."""
    for path in (("model", "visual"), ("visual",)):
        m: Any = model
        for name in path:
            m = getattr(m, name, None)
            if m is None:
                break
        if isinstance(m, torch.nn.Module):
            return m
    raise ValueError(f"{type(model).__name__} has no vision tower at .model.visual or .visual")


def _default_model_id(model: torch.nn.Module, visual: torch.nn.Module) -> str:
    cfg = getattr(model, "config", None)
    vcfg = getattr(visual, "config", None)
    h = xxhash.xxh3_64()
    h.update(str(getattr(cfg, "_name_or_path", "")).encode())
    h.update((vcfg.to_json_string() if vcfg is not None else type(visual).__name__).encode())
    h.update(str(next(visual.parameters()).dtype).encode())
    return h.hexdigest()


def enable_vision_cache(
    model: torch.nn.Module,
    client: Any,
    *,
    namespace: str = "vision",
    scope: str = "shared",
    model_id: str | None = None,
    copy: bool = False,
) -> VisionCacheHandle:
    """Cache the vision tower's outputs of ``model`` in tierd through ``client``; returns the handle.

    ``scope="shared"`` keeps entries after this client disconnects (other processes reuse them);
    ``"client"`` drops them with the client. Enabling twice on one model raises ValueError.
    """
    if getattr(model, _HANDLE_ATTR, None) is not None:
        raise ValueError("vision cache already enabled on this model; disable_vision_cache() first")
    visual = find_visual(model)
    from transformers.models.qwen3_vl.modeling_qwen3_vl import BaseModelOutputWithDeepstackFeatures

    handle = VisionCacheHandle(
        model=model,
        visual=visual,
        client=client,
        namespace=namespace.rstrip("/"),
        model_id=model_id or _default_model_id(model, visual),
        scope=scope,
        copy=copy,
        _had_instance_forward="forward" in visual.__dict__,
        _saved_instance_forward=visual.__dict__.get("forward"),
        _original_forward=visual.forward,
    )
    original = handle._original_forward
    n_deepstack = len(getattr(visual, "deepstack_visual_indexes", ()))

    def forward(hidden_states: torch.Tensor, grid_thw: torch.Tensor, **kwargs: Any) -> Any:
        if (
            kwargs.get("output_hidden_states")
            or kwargs.get("output_attentions")
            or (visual.training and torch.is_grad_enabled())
        ):
            handle.bypassed += 1
            return original(hidden_states, grid_thw=grid_thw, **kwargs)
        return_dict = kwargs.get("return_dict", True)
        key = handle.key_for(hidden_states, grid_thw)
        try:
            stacked = client.get(key)
        except NotFound:
            stacked = None
        if stacked is not None and stacked.dim() == 3 and stacked.shape[0] == 1 + n_deepstack:
            handle.hits += 1
            feats = stacked
            if handle.copy or hidden_states.device.type != "cpu":
                feats = stacked.to(hidden_states.device, copy=True)
                client.release(stacked)
            out = BaseModelOutputWithDeepstackFeatures(
                last_hidden_state=None,
                pooler_output=feats[0],
                deepstack_features=[feats[1 + i] for i in range(n_deepstack)],
            )
            return out if return_dict else out.to_tuple()
        if stacked is not None:  # a foreign entry under our key: recompute and overwrite
            client.release(stacked)
        handle.misses += 1
        out = original(hidden_states, grid_thw=grid_thw, **kwargs)
        pooled = out.pooler_output if return_dict else out[1]
        deep = list(out.deepstack_features if return_dict else out[2])
        parts = [pooled, *deep]
        if all(p.shape == pooled.shape and p.dtype == pooled.dtype for p in parts):
            try:
                client.put(key, torch.stack([p.detach() for p in parts]), tags=["vision"], scope=handle.scope)
            except TierFull as e:
                handle.put_failures += 1
                log.debug("vision cache: put of %s failed: %s", key, e)
        else:
            handle.put_failures += 1
        return out

    visual.forward = forward
    setattr(model, _HANDLE_ATTR, handle)
    return handle


def disable_vision_cache(model: torch.nn.Module) -> VisionCacheHandle | None:
    """Restore the vision tower's original forward; returns the handle (its counters), or None."""
    handle: VisionCacheHandle | None = getattr(model, _HANDLE_ATTR, None)
    if handle is None:
        return None
    visual = handle.visual
    if handle._had_instance_forward:
        visual.forward = handle._saved_instance_forward
    else:
        visual.__dict__.pop("forward", None)
    delattr(model, _HANDLE_ATTR)
    return handle
