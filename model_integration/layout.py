"""How a streaming model is laid out in the RAM tier, and the least RAM that layout needs.

Pure computation over the model's module tree and its tensors' stored sizes: which blocks stream
(vision blocks and mergers, decoder layers), which first decoder layers stay resident, and the
minimum (``StreamingLayout.minimum_bytes``) below which ``from_pretrained`` refuses with
:class:`RamTierTooSmall` before reading anything.
"""

from __future__ import annotations

from dataclasses import dataclass, field
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
    the tensors that stay resident plus the largest window of ``prefetch_depth + 1`` consecutive
    blocks. Raised by ``from_pretrained`` / ``offload_model`` before any weight is fetched.
    ``details``: tier, requested_bytes (that minimum), capacity_bytes, resident_bytes, window_bytes,
    largest_block, prefetch_depth. Recoverable: start tierd with a larger ``--ram-bytes``, lower
    ``prefetch_depth``, or give a larger ``ram_budget``; nothing was put or leased.
    """


#: one streamed block: (prefix, module, tensor names relative to the module, the checkpoint names
#: they are read from: ``prefix.rel`` except for a tied output head, which reads the embedding)
Block = tuple[str, nn.Module, list[str], list[str]]


@dataclass
class StreamingLayout:
    """Where each tensor of a streaming model lives, and the least RAM that layout needs.

    ``blocks``: the streamed blocks in forward order (see :data:`Block`); ``kept``: how many first
    decoder layers stay resident (leased for good) instead. ``resident_bytes`` are the tensors
    outside every block plus the kept layers; ``window_bytes`` is the most the running block and the
    ``prefetch_depth`` blocks hinted after it hold at once (each tensor counted once: a tied head
    and the embedding are one entry). ``edges``: the input embedding and the output head stream
    too (chosen when the RAM is too small to keep them resident).
    """

    blocks: list[Block]
    kept: int
    outside_bytes: int
    kept_bytes: int
    window_bytes: int
    largest_block: str
    edges: bool = False
    #: for each block, the index of the block hinted after it (decoding's order: the embedding is
    #: followed by the first decoder layer, the last block by the first text block)
    after: list[int] = field(default_factory=list)

    @property
    def minimum_bytes(self) -> int:
        """The smallest room this model streams in: what must be resident plus the window, with no
        decoder layer kept."""
        return self.outside_bytes + self.window_bytes


def _edges(model: nn.Module, names: list[str]) -> tuple[Block, Block] | None:
    """The input embedding and the output head as blocks, or None when the model has not both."""
    mods = {id(m): n for n, m in model.named_modules()}
    inner: Any = getattr(model, "model", model)
    embed = getattr(getattr(inner, "language_model", None), "embed_tokens", None)
    head = getattr(model, "lm_head", None)
    if embed is None or head is None or id(embed) not in mods or id(head) not in mods:
        return None
    ep, hp = mods[id(embed)], mods[id(head)]
    erel = [n[len(ep) + 1 :] for n in names if n.startswith(ep + ".")]
    hrel = [n[len(hp) + 1 :] for n in names if n.startswith(hp + ".")]
    if not erel:
        return None
    e_block: Block = (ep, embed, erel, [f"{ep}.{r}" for r in erel])
    if hrel:
        return e_block, (hp, head, hrel, [f"{hp}.{r}" for r in hrel])
    if getattr(head, "weight", None) is not None and head.weight is getattr(embed, "weight", None):
        return e_block, (hp, head, ["weight"], [f"{ep}.weight"])  # tied: the head reads the embedding
    return None


def _loose_blocks(model: nn.Module, loose: list[str]) -> tuple[list[Block], list[Block]]:
    """Blocks for tensors outside every block: one per module that holds them (the shallowest one
    below the model's containers, e.g. ``model.visual.patch_embed``, ``model.language_model.norm``);
    (those under the vision tower, the others)."""
    mods = dict(model.named_modules())
    inner = "model" if "model" in mods else ""
    containers = {"", inner, *(f"{inner}.{c}".lstrip(".") for c in ("visual", "language_model"))}
    groups: dict[str, list[str]] = {}
    for n in loose:
        parts = n.split(".")
        prefix = next(
            (p for k in range(1, len(parts)) if (p := ".".join(parts[:k])) not in containers and p in mods),
            n.rpartition(".")[0],
        )
        groups.setdefault(prefix, []).append(n[len(prefix) + 1 :] if prefix else n)
    vision: list[Block] = []
    other: list[Block] = []
    for prefix in sorted(groups):
        rel = groups[prefix]
        block: Block = (prefix, mods[prefix], rel, [f"{prefix}.{r}" if prefix else r for r in rel])
        (vision if ".visual." in f".{prefix}." else other).append(block)
    return vision, other


def streaming_layout(
    model: nn.Module, names: list[str], size_of: dict[str, int], *, room: int | None, prefetch_depth: int
) -> StreamingLayout:
    """Lay out ``model`` for streaming in ``room`` bytes (None: keep no layer resident).

    The embedding and the output head stay resident when the room allows (every token reads them);
    when it does not, they stream like any other block, which lowers the minimum to the largest set
    needed at one moment. What the resident tensors and the window leave of ``room`` keeps the first
    decoder layers resident for good (leased, so never demoted): decoding reads the layers in a
    cycle, and a cycle longer than the cache is exactly what LRU eviction handles worst, so a fixed
    resident part is never read from disk and only the rest streams.
    """
    plain = _layout(model, names, size_of, room, prefetch_depth, edges=None)
    if room is not None and room >= plain.minimum_bytes:
        return plain
    edges = _edges(model, names)
    if edges is None:
        return plain
    streamed = _layout(model, names, size_of, room, prefetch_depth, edges=edges)
    return streamed if streamed.minimum_bytes < plain.minimum_bytes else plain


def _layout(
    model: nn.Module,
    names: list[str],
    size_of: dict[str, int],
    room: int | None,
    prefetch_depth: int,
    edges: tuple[Block, Block] | None,
) -> StreamingLayout:
    order: list[Block] = []
    for prefix, module in _blocks(model):
        rel = [n[len(prefix) + 1 :] for n in names if n.startswith(prefix + ".")]
        order.append((prefix, module, rel, [f"{prefix}.{r}" for r in rel]))
    text_start = next((i for i, b in enumerate(order) if ".language_model." in f".{b[0]}."), 0)
    if edges is not None:
        # Everything streams: the small tensors outside the blocks too, each under the module that
        # uses it (vision ones before the vision blocks, the rest before the head). No lease then
        # outlives its block's forward, so no long-lived region splits the little RAM there is.
        taken_names = {s for b in order for s in b[3]} | set(edges[0][3]) | set(edges[1][3])
        vision, other = _loose_blocks(model, [n for n in names if n not in taken_names])
        order = [edges[0], *vision, *order, *other, edges[1]]
        text_start += 1 + len(vision)
    taken = {n: -(-size_of[n] // ALIGN) * ALIGN for n in names}  # what the RAM tier's allocator takes
    sizes = [sum(taken[s] for s in b[3]) for b in order]
    in_blocks = {s for b in order for s in b[3]}
    outside = sum(taken[n] for n in names if n not in in_blocks)
    if not order:
        return StreamingLayout([], 0, outside, 0, 0, "")
    # the block hinted after each: the next in forward order; after the embedding the first decoder
    # layer (decoding skips the vision tower), after the last block the first of the next step
    after = [i + 1 for i in range(len(order))]
    after[-1] = 0 if edges is not None else text_start
    if edges is not None:
        after[0] = text_start
    window, big = 0, 0
    for i in range(len(order)):
        run, j = set(order[i][3]), i
        for _ in range(prefetch_depth):
            j = after[j]
            if j == i:
                break
            run.update(order[j][3])
        held = sum(taken[s] for s in run)
        if held > window:
            window, big = held, i
    kept: list[int] = []
    if room is not None and edges is None:
        left = room - outside - window
        for i, b in enumerate(order):
            if edges is not None and i == 0:
                continue
            if ".language_model." in f".{b[0]}." and sizes[i] <= left:
                kept.append(i)
                left -= sizes[i]
            elif kept:
                break
    keep = set(kept)
    streamed = [b for i, b in enumerate(order) if i not in keep]
    index = {id(b[1]): k for k, b in enumerate(streamed)}
    # hints skip the kept layers: they are resident
    hint_after = []
    for i in range(len(order)):
        if i in keep:
            continue
        j, seen = after[i], {i}
        while j in keep and j not in seen:  # a cycle of kept layers only: nothing to hint
            seen.add(j)
            j = after[j]
        hint_after.append(index[id(order[i if j in keep else j][1])])
    return StreamingLayout(
        streamed, len(kept), outside, sum(sizes[i] for i in kept), window, order[big][0],
        edges is not None, hint_after,
    )  # fmt: skip


def layout_sizes(layout: StreamingLayout, size_of: dict[str, int]) -> list[int]:
    """Bytes each streamed block takes of the RAM tier (its tensors as the allocator rounds them)."""
    return [sum(-(-size_of[s] // ALIGN) * ALIGN for s in b[3]) for b in layout.blocks]


def check_room(layout: StreamingLayout, room: int, prefetch_depth: int, what: str) -> None:
    need = layout.minimum_bytes
    if room >= need:
        return
    mib = 2**20
    raise RamTierTooSmall(
        f"{what} needs a RAM tier of at least {need / mib:.1f} MiB to stream "
        f"({layout.outside_bytes / mib:.1f} MiB resident + {layout.window_bytes / mib:.1f} MiB for "
        f"{prefetch_depth + 1} blocks in a row, from {layout.largest_block}), and has {room / mib:.1f} MiB: "
        "start tierd with a "
        f"larger --ram-bytes, lower prefetch_depth (now {prefetch_depth}), or give a larger ram_budget",
        tier="ram", requested_bytes=need, capacity_bytes=room, resident_bytes=layout.outside_bytes,
        window_bytes=layout.window_bytes, largest_block=layout.largest_block, prefetch_depth=prefetch_depth,
    )  # fmt: skip
