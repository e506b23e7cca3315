"""Binding a model's parameters to tierd: resident views, or per-block streaming hooks.

Hooks follow the accelerate contract (STYLE.md item 10): a small object with ``init`` /
``pre_forward`` / ``post_forward`` / ``detach``; ``add_hook`` keeps the module's original forward on
the module (``_tierd_old_forward``) and ``remove_hook`` puts it back, so every hook is removable.
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

_META = torch.device("meta")


# -- building without memory ------------------------------------------------------------------------
@contextlib.contextmanager
def empty_parameters() -> Iterator[None]:
    """Create every parameter registered inside on the meta device; buffers stay real.

    Buffers that are not in a checkpoint (rotary ``inv_freq``) are computed at construction, so they
    must not be meta. Parameters are allocated on the CPU for an instant and moved to meta as they
    are registered (as ``accelerate.init_empty_weights(include_buffers=False)`` does).
    """
    old = nn.Module.register_parameter

    def register(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        old(module, name, param)
        if param is not None and param.device != _META:  # a meta one is kept: tying shares it
            p = module._parameters[name]
            assert p is not None
            module._parameters[name] = nn.Parameter(p.to(_META), requires_grad=p.requires_grad)

    nn.Module.register_parameter = register  # type: ignore[method-assign,assignment]
    try:
        yield
    finally:
        nn.Module.register_parameter = old  # type: ignore[method-assign]


# -- setting one tensor -----------------------------------------------------------------------------
def _owner(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    path, _, attr = name.rpartition(".")
    return (model.get_submodule(path) if path else model), attr


def set_tensor(model: nn.Module, name: str, value: torch.Tensor) -> None:
    """Make ``value`` the parameter or buffer called ``name``, with no copy.

    A parameter keeps the ``requires_grad`` flag of the one it replaces, as torch's op choice depends
    on it: ``matmul`` of a 3-d activation with a frozen weight broadcasts the weight into a batched
    ``bmm`` that copies its transpose (622 MB per step for Qwen3-VL-2B's tied 151,936 x 2,048 output
    head), where a weight that requires grad folds the activation into one ``mm``. Keeping the flag
    keeps the plain model's op path (tests/test_integration_weights.py).
    """
    module, attr = _owner(model, name)
    if attr in module._parameters:
        old = module._parameters[attr]
        keep = old.requires_grad if old is not None else False
        param = nn.Parameter(value, requires_grad=keep)
        if keep and not value.is_meta:
            param.register_post_accumulate_grad_hook(_refuse_training)
        module._parameters[attr] = param
    elif attr in module._buffers:
        module._buffers[attr] = value
    else:
        raise KeyError(f"{name} is neither a parameter nor a buffer of the model")


def _refuse_training(param: torch.Tensor) -> None:
    """A bound weight is a read-only view of tierd's memory: an optimizer step writing into it would
    fault (SIGSEGV). Refuse at backward, where the error can still be caught and explained."""
    raise RuntimeError(
        "a gradient reached a weight served by tierd (a read-only view of its memory, which an "
        "optimizer step cannot write): freeze the bound weights (model.requires_grad_(False)) and train "
        "adapters beside them, or detach(model) first to train the weights themselves"
    )


def get_tensor(model: nn.Module, name: str) -> torch.Tensor:
    module, attr = _owner(model, name)
    t: torch.Tensor | None = module._parameters.get(attr)
    if t is None:
        t = module._buffers.get(attr)
    if t is None:
        raise KeyError(name)
    return t


def to_meta(model: nn.Module, name: str) -> None:
    t = get_tensor(model, name)
    set_tensor(model, name, torch.empty(t.shape, dtype=t.dtype, device=_META))


# -- the hook contract ------------------------------------------------------------------------------
class ModelHook:
    """What a hook may do around a module's forward; every method is optional."""

    def init(self, module: nn.Module) -> nn.Module:
        return module

    def pre_forward(self, module: nn.Module, *args: Any, **kwargs: Any) -> tuple[tuple, dict]:
        return args, kwargs

    def post_forward(self, module: nn.Module, output: Any) -> Any:
        return output

    def detach(self, module: nn.Module) -> nn.Module:
        return module


def add_hook(module: nn.Module, hook: ModelHook) -> nn.Module:
    """Wrap ``module.forward`` with ``hook``; the original forward stays on the module."""
    if hasattr(module, "_tierd_hook"):
        remove_hook(module)
    module = hook.init(module)
    old_forward = module.forward
    module._tierd_old_forward = old_forward  # type: ignore[assignment]
    module._tierd_hook = hook  # type: ignore[assignment]

    @functools.wraps(old_forward)
    def forward(*args: Any, **kwargs: Any) -> Any:
        args, kwargs = hook.pre_forward(module, *args, **kwargs)
        try:
            output = old_forward(*args, **kwargs)
        except BaseException:
            hook.post_forward(module, None)
            raise
        return hook.post_forward(module, output)

    module.forward = forward
    return module


def remove_hook(module: nn.Module) -> nn.Module:
    """Undo add_hook: the hook's detach runs, and the original forward is the module's again."""
    hook = module.__dict__.pop("_tierd_hook", None)
    if hook is None:
        return module
    module = hook.detach(module)
    old = module.__dict__.pop("_tierd_old_forward")
    # The original was the bound class method unless someone had set an instance forward before us.
    if getattr(old, "__func__", None) is type(module).forward:
        module.__dict__.pop("forward", None)
    else:
        module.forward = old
    return module


# -- streaming ------------------------------------------------------------------------------------
@dataclass
class Binding:
    """How a model is bound to tierd; kept on the model as ``_tierd_binding`` (detach reads it)."""

    client: Any
    namespace: str
    mode: str  # "resident" | "streaming"
    names: list[str]  # every bound tensor name (checkpoint names)
    tied: dict[str, str] = field(default_factory=dict)  # name -> the name it shares a tensor with
    requires_grad: dict[str, bool] = field(default_factory=dict)  # parameters' flags before binding
    resident_views: list[torch.Tensor] = field(default_factory=list)
    blocks: list[tuple[nn.Module, list[str]]] = field(default_factory=list)
    kept_blocks: int = 0  # streaming: decoder layers kept resident (leased) instead of streamed
    edges: bool = False  # streaming: the embedding and the output head stream too (small RAM)
    tier: str | None = None  # the tier the views come from: None (RAM) or "gpu"
    pacer: Any = None  # streaming: the prefetch depths and their measurements (pacing.Pacer)

    def key(self, name: str) -> str:
        return f"{self.namespace}/{name}"


class StreamBlockHook(ModelHook):
    """One block's weights come from tierd for its forward only.

    pre_forward: one get_many for the block's tensors, bound as views, and a prefetch hint for the
    blocks after it (``ahead[k]``: the keys of the block ``k + 1`` hops ahead; as many as ``pacer``
    says, else all); post_forward: parameters back to meta and the leases released (one frame). The
    wait in get_many and the forward's own time are reported to ``pacer`` (see pacing.py).
    """

    def __init__(
        self,
        client: Any,
        names: list[str],
        keys: list[str],
        ahead: list[list[str]],
        tier: str | None = None,
        pacer: Any = None,
        index: int = 0,
    ) -> None:
        self.client = client
        self.names = names  # relative to the block
        self.keys = keys
        self.ahead = ahead
        self.tier = tier  # "gpu": each forward's views come from the GPU tier (promoted from RAM)
        self.pacer = pacer
        self.index = index
        self.views: list[torch.Tensor] = []
        self.calls = 0
        self._bound_at = 0.0

    @property
    def next_keys(self) -> list[str]:
        """The keys hinted after this block's get, in order, each once."""
        depth = self.pacer.depth(self.index) if self.pacer is not None else len(self.ahead)
        out: list[str] = []
        for keys in self.ahead[:depth]:
            out += [k for k in keys if k not in out]
        return out

    def init(self, module: nn.Module) -> nn.Module:
        for name in self.names:  # the block holds no memory until its forward
            to_meta(module, name)
        return module

    def pre_forward(self, module: nn.Module, *args: Any, **kwargs: Any) -> tuple[tuple, dict]:
        if self.views:  # re-entered without post_forward (should not happen): drop the old leases
            self._unbind(module)
        get = self.client.get_many
        t0 = time.perf_counter()
        views = get(self.keys, tier=self.tier) if self.tier else get(self.keys)
        for name, view in zip(self.names, views, strict=True):
            set_tensor(module, name, view)
        self.views = views
        nxt = self.next_keys
        if nxt:
            self.client.prefetch(nxt)
        self.calls += 1
        self._bound_at = time.perf_counter()
        if self.pacer is not None:
            self.pacer.stalled(self.index, self._bound_at - t0)
        return args, kwargs

    def _unbind(self, module: nn.Module) -> None:
        for name in self.names:
            to_meta(module, name)
        views, self.views = self.views, []
        if views:
            self.client.release(views)

    def post_forward(self, module: nn.Module, output: Any) -> Any:
        if self.pacer is not None and self.views:
            self.pacer.computed(self.index, time.perf_counter() - self._bound_at)
        self._unbind(module)
        return output

    def detach(self, module: nn.Module) -> nn.Module:
        if self.views:
            self._unbind(module)
        return module
