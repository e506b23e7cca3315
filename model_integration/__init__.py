"""tierd_integration: model hooks that serve a model's weights, KV cache and vision features from tierd.

This package is the import name of the ``model_integration/`` folder.

- weights: ``ingest`` a safetensors checkpoint tensor by tensor; ``from_pretrained`` builds a Qwen3-VL
  on the meta device bound to tierd (resident views, or per-block streaming hooks with prefetch;
  ``device="cuda"``: views of the GPU tier);
  ``offload_model`` does the same for a model in memory; ``detach`` makes a bound model plain again.
- checkpoint: ``make_random_checkpoint`` (a small random Qwen3-VL, offline) and ``sample_inputs``.
- kvcache: ``TierdKVCache``, a transformers Cache that keeps a window of K/V in the process and
  offloads older blocks to tierd (scope="client": gone when the client is); ``cache_kwargs(cache)``
  passes it to ``generate`` under the name the installed transformers takes.
- activations: ``offload_activations(client, min_bytes=, codec=)``, a context manager that keeps what
  autograd saves for backward in tierd (scope="client"), hinted back in backward order, deleted as
  consumed; lossless unless ``codec="bf16"``. Works with gradient checkpointing.
- optimizer: ``offload_optimizer_state(optimizer, client)`` keeps Adam's moments in tierd between
  steps, fetched one parameter group at a time.
- vision: ``enable_vision_cache`` keys the vision tower's outputs (deepstack included) by the image;
  on a hit the tower does not run. ``disable_vision_cache`` removes it.

It needs the ``model`` extra (transformers, safetensors), which the daemon and the client do not:
``pip install 'tierd[model]'``.
"""

try:
    import safetensors  # noqa: F401
    import transformers  # noqa: F401
except ImportError as e:  # pragma: no cover - exercised in a venv without the extra (tests/test_packaging.py)
    raise ImportError(
        f"tierd_integration needs the model extra, which is not installed ({e.name} is missing): "
        "pip install 'tierd[model]'"
    ) from e

from tierd_integration.activations import offload_activations
from tierd_integration.checkpoint import make_random_checkpoint, sample_inputs
from tierd_integration.kvcache import TierdKVCache, cache_kwargs
from tierd_integration.layout import RamTierTooSmall
from tierd_integration.optimizer import offload_optimizer_state
from tierd_integration.vision import disable_vision_cache, enable_vision_cache
from tierd_integration.weights import (
    detach,
    from_pretrained,
    ingest,
    offload_model,
    streaming_minimum,
)

__all__ = [
    "RamTierTooSmall",
    "TierdKVCache",
    "cache_kwargs",
    "detach",
    "disable_vision_cache",
    "enable_vision_cache",
    "from_pretrained",
    "ingest",
    "make_random_checkpoint",
    "offload_activations",
    "offload_model",
    "offload_optimizer_state",
    "sample_inputs",
    "streaming_minimum",
]
