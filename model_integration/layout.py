"""How a streaming model is laid out in the RAM tier, and the least RAM that layout needs.

Pure computation over the model's module tree and its tensors' stored sizes: which blocks stream
(vision blocks and mergers, decoder layers), which first decoder layers stay resident, and the
minimum (``StreamingLayout.minimum_bytes``) below which ``from_pretrained`` refuses with
:class:`RamTierTooSmall` before reading anything.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from tierd.alloc import ALIGN
from tierd_client import TierFull


def _blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The streamed blocks in forward order: the vision tower's blocks with its deepstack mergers
    after the blocks they read, its merger, then the decoder layers.

    The vision modules run only in prefill; streaming them (rather than keeping them resident)
    leaves their RAM to the decoder layers, which every generated token reads.
    """
    names = {id(m): n for n, m in model.named_modules()}
    inner: Any = getattr(model, "model", model)
    out: list[nn.Module] = []
    visual = getattr(inner, "visual", None)
    if visual is not None:
        deep = list(getattr(visual, "deepstack_merger_list", []))
        deep_at = list(getattr(visual, "deepstack_visual_indexes", []))[: len(deep)]
        for i, blk in enumerate(visual.blocks):
            out.append(blk)
            if i in deep_at:
                out.append(deep[deep_at.index(i)])
        if getattr(visual, "merger", None) is not None:
            out.append(visual.merger)
    out += list(inner.language_model.layers)
    return [(names[id(m)], m) for m in out]


class RamTierTooSmall(TierFull):
    """The RAM tier (or ``ram_budget``) is smaller than the least a streaming model needs at one moment:
    the tensors that stay resident plus a window of ``prefetch_depth + 1`` of its largest blocks.
    Raised by ``from_pretrained`` / ``offload_model`` before any weight is fetched. ``details``: tier,
    requested_bytes (that minimum), capacity_bytes, resident_bytes, window_bytes, largest_block,
    prefetch_depth. Recoverable: start tierd with a larger ``--ram-bytes``, lower ``prefetch_depth``,
    or give a larger ``ram_budget``; nothing was put or leased.
    """


@dataclass
class StreamingLayout:
    """Where each tensor of a streaming model lives, and the least RAM that layout needs.

    ``blocks``: the streamed blocks in forward order, each ``(prefix, module, names relative to it)``;
    ``kept``: how many first decoder layers stay resident (leased for good) instead. ``resident_bytes``
    are the tensors outside every block (embeddings, norms, an untied output head, the vision patch
    embedding) plus the kept layers; ``window_bytes`` is ``prefetch_depth + 1`` times the largest
    block: the one running and the ones hinted ahead of it, all in RAM at once at worst.
    """

    blocks: list[tuple[str, nn.Module, list[str]]]
    kept: int
    outside_bytes: int
    kept_bytes: int
    window_bytes: int
    largest_block: str

    @property
    def minimum_bytes(self) -> int:
        """The smallest room this model streams in: what must be resident plus the window, with no
        decoder layer kept."""
        return self.outside_bytes + self.window_bytes


def streaming_layout(
    model: nn.Module, names: list[str], size_of: dict[str, int], *, room: int | None, prefetch_depth: int
) -> StreamingLayout:
    """Lay out ``model`` for streaming in ``room`` bytes (None: keep no layer resident).

    What the resident tensors and the window leave of ``room`` keeps the first decoder layers resident
    for good (leased, so never demoted): decoding reads the layers in a cycle, and a cycle longer than
    the cache is exactly what LRU eviction handles worst, so a fixed resident part is never read from
    disk and only the rest streams.
    """
    order = []
    for prefix, module in _blocks(model):
        rel = [n[len(prefix) + 1 :] for n in names if n.startswith(prefix + ".")]
        order.append((prefix, module, rel))
    taken = {n: -(-size_of[n] // ALIGN) * ALIGN for n in names}  # what the RAM tier's allocator takes
    sizes = [sum(taken[f"{p}.{r}"] for r in rel) for p, _, rel in order]
    in_blocks = {f"{p}.{r}" for p, _, rel in order for r in rel}
    outside = sum(taken[n] for n in names if n not in in_blocks)
    if not order:
        return StreamingLayout([], 0, outside, 0, 0, "")
    big = max(range(len(order)), key=sizes.__getitem__)
    window = (prefetch_depth + 1) * sizes[big]
    kept: list[int] = []
    if room is not None:
        left = room - outside - window
        for i, (p, _, _) in enumerate(order):
            if ".language_model." in f".{p}." and sizes[i] <= left:
                kept.append(i)
                left -= sizes[i]
            elif kept:
                break
    streamed = [b for i, b in enumerate(order) if i not in set(kept)]
    return StreamingLayout(streamed, len(kept), outside, sum(sizes[i] for i in kept), window, order[big][0])


def check_room(layout: StreamingLayout, room: int, prefetch_depth: int, what: str) -> None:
    need = layout.minimum_bytes
    if room >= need:
        return
    mib = 2**20
    raise RamTierTooSmall(
        f"{what} needs a RAM tier of at least {need / mib:.1f} MiB to stream "
        f"({layout.outside_bytes / mib:.1f} MiB resident + {prefetch_depth + 1} x "
        f"{layout.window_bytes / (prefetch_depth + 1) / mib:.1f} MiB "
        f"for the largest block, {layout.largest_block}), and has {room / mib:.1f} MiB: start tierd with a "
        f"larger --ram-bytes, lower prefetch_depth (now {prefetch_depth}), or give a larger ram_budget",
        tier="ram", requested_bytes=need, capacity_bytes=room, resident_bytes=layout.outside_bytes,
        window_bytes=layout.window_bytes, largest_block=layout.largest_block, prefetch_depth=prefetch_depth,
    )  # fmt: skip
