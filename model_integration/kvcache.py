"""``TierdKVCache``: a transformers (5.x) KV cache that keeps a window of the newest tokens per layer in the
process and offloads older blocks to tierd.

Layout. Per attention layer the newest ``window`` tokens' K and V stay in the process (on the model's
device). When more than ``window`` tokens are resident, the oldest full block of ``block`` tokens is put to
tierd as one entry ``kv/<uuid>/<layer>/<block>`` holding ``stack([K, V])`` of shape
``(2, batch, kv_heads, block, head_dim)``, tagged ``kv``, ``scope="client"`` (the daemon deletes it when this
client disconnects, crash included), not durable. Blocks are offloaded oldest first, so the offloaded part
is always a prefix of the sequence. When a put raises ``TierFull`` the block stays resident (the window
grows past its bound until a later put succeeds) and ``put_failures`` counts it. Held blocks (below) are
merged, two equal entries at a time, into entries ``kv/<uuid>/<layer>/<first>-<last>`` of 2, 4, 8, ...
blocks (at most ``merge_bytes``: a quarter of the hold budget, 16 MiB at most).

Attention. Each ``update`` (one per layer per forward step) copies the new tokens into the layer's resident
buffer (room for ``window + block`` tokens, re-made only when a block leaves for tierd, so a decoding step
copies one token there) and returns [offloaded blocks ; resident tokens] as one K and one V, as
``DynamicCache`` does: one ``torch.cat`` per step, as ``DynamicCache``'s own. The offloaded blocks are read
in place, from the daemon's RAM tier mapped in this process:

- held blocks (``hold_bytes``, default 512 MiB, never more than half the RAM tier): a block's view is
  leased once, right after its put, and kept across steps, so a step needs no round trip for it. Held
  blocks are always the oldest of a layer (a prefix), first come first served across layers. Merged
  as above, they are a few pieces for ``torch.cat``, whose cost grows with the number of pieces.
- the other blocks: fetched in one ``get_many`` per layer per step and released after the
  concatenation; when they are more than ``fetch_bytes`` (a quarter of the RAM tier) they are read in
  groups of that size into a K and V allocated whole (blocks spilled to the disk tier come back
  through the RAM tier, which need not hold a layer's whole context).

A ``TierFull`` on a put or a fetch releases every held view (the daemon may then demote those blocks)
and the cache holds nothing more. Measured by ``bench/bench_kvcache.py`` (docs/benchmarks.md, 2026-12-02):
decode at a 4,096-token prompt at 0.97x DynamicCache's speed (window 1024) with every block held, 0.77x
when every step fetches every block (2 round trips per layer per token).

Trade-off. Memory: the process holds ``window`` tokens per layer (in a buffer of ``window + block``) plus,
transiently, one layer's full K/V
(the concatenation handed to attention, freed after that layer's attention); a ``DynamicCache`` holds every
layer's full K/V all the time. So resident KV drops from ``layers * seq`` to about ``layers * window +
seq`` tokens; the rest lives in the daemon's RAM tier (shared memory, under its budget and eviction
policy; held blocks are mapped here but are the daemon's pages, not a copy, and cannot be demoted while
held). Latency: per step the copy of the offloaded blocks into the concatenation (``DynamicCache`` also
copies its whole K/V per step in ``torch.cat``), one round trip per layer when some blocks are not held
(~60 us here, much more on a loaded machine), and the puts: one block copy and 3 round trips per layer
every ``block`` steps. On a GPU the offloaded part also crosses PCIe each step, which dominates for long
contexts. Small blocks mean more entries, more pieces to concatenate and bigger ``get_many`` frames;
``block`` of 64-256 tokens keeps them few.

Editing. ``crop`` (assisted decoding) brings back the offloaded blocks the cut reaches and deletes
their entries; beam search's ``reorder_cache`` and the batch re-indexing calls rewrite every offloaded
block (a get and a put each: fine for the occasional call, costly per step for long beams). Not
supported: sliding-window / linear-attention layers (every layer is treated as full attention);
``torch.compile``.
"""

from __future__ import annotations

import contextlib
import uuid
from typing import Any

import torch
import transformers
from packaging.version import Version
from transformers.cache_utils import Cache, DynamicLayer

from tierd_client import DaemonUnavailable, NotFound, NotLeased, TierFull


class TierdKVLayer(DynamicLayer):
    """One layer: resident ``keys`` / ``values`` (the newest tokens) plus offloaded blocks in tierd."""

    is_croppable = True

    def __init__(self, cache: TierdKVCache, layer_idx: int) -> None:
        super().__init__()
        self.cache = cache
        self.layer_idx = layer_idx
        #: the offloaded entries, oldest first; entry i holds seg_blocks[i] blocks (1, or more once merged)
        self.block_keys: list[str] = []
        self.seg_blocks: list[int] = []
        #: the resident tokens' K and V buffers (room for window + block tokens); keys / values view them
        self._buf: tuple[torch.Tensor, torch.Tensor] | None = None
        self._views: tuple[torch.Tensor | None, torch.Tensor | None] = (None, None)
        #: views of the first len(held) offloaded blocks, leased across steps (see TierdKVCache.hold_bytes)
        self.held: list[torch.Tensor] = []
        self._held_k: list[torch.Tensor] = []
        self._held_v: list[torch.Tensor] = []
        #: bytes of one offloaded block of this layer (K and V), known after its first put
        self.block_nbytes = 0

    def _kv(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The resident keys and values (set once the layer has taken its first tokens)."""
        assert self.keys is not None and self.values is not None
        return self.keys, self.values

    def _resident_len(self) -> int:
        if not self.is_initialized or self.keys is None or self.keys.numel() == 0:
            return 0
        return int(self.keys.shape[-2])

    @property
    def offloaded_len(self) -> int:
        return sum(self.seg_blocks) * self.cache.block

    @property
    def held_blocks(self) -> int:
        return sum(self.seg_blocks[: len(self.held)])

    def _entry_nbytes(self, i: int) -> int:
        return self.seg_blocks[i] * self.block_nbytes

    def get_seq_length(self) -> int:
        return self.offloaded_len + self._resident_len()

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self._append(key_states, value_states)
        k, v = self._kv()
        full_k, full_v = self._with_offloaded(k, v) if self.block_keys else (k, v)
        self._offload()
        return full_k, full_v

    def _append(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """The new tokens go into a buffer with room for ``window + block`` tokens, copied in place
        (a decoding step copies one token, not the window); ``keys`` / ``values`` are views of its
        filled part. A buffer replaced from outside (crop, beam reordering) is taken over again."""
        n, have = int(key_states.shape[-2]), self._resident_len()
        if self._buf is None or self.keys is not self._views[0] or have + n > self._buf[0].shape[-2]:
            self._rebuffer(key_states, value_states, n)
        assert self._buf is not None
        bk, bv = self._buf
        bk[..., have : have + n, :].copy_(key_states)
        bv[..., have : have + n, :].copy_(value_states)
        self.keys, self.values = bk[..., : have + n, :], bv[..., : have + n, :]
        self._views = (self.keys, self.values)

    def _rebuffer(self, like_k: torch.Tensor, like_v: torch.Tensor, extra: int) -> None:
        """A new buffer holding the resident tokens, with room for ``extra`` more (and at least
        ``window + block`` in all)."""
        have = self._resident_len()
        cap = max(self.cache.window + self.cache.block, have + extra)
        new = []
        for like, old in ((like_k, self.keys), (like_v, self.values)):
            t = torch.empty((*like.shape[:-2], cap, like.shape[-1]), dtype=like.dtype, device=like.device)
            if have:
                assert old is not None
                t[..., :have, :].copy_(old)
            new.append(t)
        self._buf = (new[0], new[1])
        self.keys, self.values = new[0][..., :have, :], new[1][..., :have, :]
        self._views = (self.keys, self.values)

    def _with_offloaded(self, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[held blocks ; the other blocks ; resident tokens] as one K and one V. The held blocks need no
        round trip; the others come in one ``get_many`` when they fit in the cache's ``fetch_bytes``
        (one ``torch.cat`` then, as ``DynamicCache``'s), else :meth:`_gathered` reads them in groups."""
        c = self.cache
        rest = self.block_keys[len(self.held) :]
        views: list[torch.Tensor] = []
        if rest:
            if sum(self.seg_blocks[len(self.held) :]) * self.block_nbytes > c.fetch_bytes:
                return self._gathered(keys, values)
            try:
                views = c.fetch(rest)
            except TierFull:  # no room to bring them all back at once
                return self._gathered(keys, values)
        try:
            dev = keys.device
            hk, hv = self._held_k, self._held_v
            if hk and hk[0].device != dev:
                hk, hv = [k.to(dev) for k in hk], [v.to(dev) for v in hv]
            full_k = torch.cat([*hk, *(v[0].to(dev) for v in views), keys], dim=-2)
            full_v = torch.cat([*hv, *(v[1].to(dev) for v in views), values], dim=-2)
        finally:
            if views:
                c.client.release(views)
        return full_k, full_v

    def _gathered(self, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The slow path, for offloaded blocks that do not fit in the RAM tier at once: K and V are
        allocated whole, the held blocks copied in, then the others fetched ``fetch_bytes`` at a time
        (each group released before the next is asked for). A group that finds the RAM tier full
        sheds the cache's held views (already copied) and is asked for again."""
        c = self.cache
        total = self.offloaded_len + int(keys.shape[-2])
        out_k = keys.new_empty((*keys.shape[:-2], total, keys.shape[-1]))
        out_v = values.new_empty((*values.shape[:-2], total, values.shape[-1]))
        pos = 0

        def place(k: torch.Tensor, v: torch.Tensor) -> None:
            nonlocal pos
            n = int(k.shape[-2])
            out_k[..., pos : pos + n, :].copy_(k)
            out_v[..., pos : pos + n, :].copy_(v)
            pos += n

        for k, v in zip(self._held_k, self._held_v, strict=True):
            place(k, v)
        groups: list[list[str]] = []
        size = 0
        for i in range(len(self.held), len(self.block_keys)):
            if not groups or size + self._entry_nbytes(i) > c.fetch_bytes:
                groups.append([])
                size = 0
            groups[-1].append(self.block_keys[i])
            size += self._entry_nbytes(i)
        for group in groups:
            try:
                views = c.fetch(group)
            except TierFull:
                if not c.shed():
                    raise
                views = c.fetch(group)
            try:
                for view in views:
                    place(view[0], view[1])
            finally:
                c.client.release(views)
        place(keys, values)
        return out_k, out_v

    def hold_more(self) -> None:
        """Lease the next offloaded blocks (after the held ones) while the cache's budget has room,
        in one ``get_many``; held blocks are always a prefix of the offloaded ones."""
        c = self.cache
        if not self.block_nbytes:
            return
        keys: list[str] = []
        room = c.hold_limit - c.held_bytes
        for i in range(len(self.held), len(self.block_keys)):
            if self._entry_nbytes(i) > room:
                break
            keys.append(self.block_keys[i])
            room -= self._entry_nbytes(i)
        if not keys:
            return
        try:
            views = c.fetch(keys)
        except TierFull:  # promoted back from disk into a full RAM tier: streamed instead
            return
        for view in views:  # one at a time, merging as they come: entries of 2^k blocks, largest first
            self.held.append(view)
            self._held_k.append(view[0])
            self._held_v.append(view[1])
            c.held_bytes += view.numel() * view.element_size()
            self._merge_held()

    def _merge_held(self) -> None:
        """While the last two held entries have as many blocks each and together fit in the cache's
        ``merge_bytes``, put them as one entry (held in their place; the two are released and deleted):
        a layer's held blocks become a few entries of 1, 2, 4, ... blocks, so the concatenation of a step
        has few pieces (``torch.cat`` of 25 pieces took ~2x as long as of 2, at 4,096 tokens), and each
        block is copied about log2(entries) times in all. A TierFull stops merging for the cache."""
        c = self.cache
        while (
            len(self.held) >= 2
            and self.seg_blocks[len(self.held) - 1] == self.seg_blocks[len(self.held) - 2]
            and 2 * self._entry_nbytes(len(self.held) - 1) <= c.merge_bytes
        ):
            i = len(self.held) - 2
            first = sum(self.seg_blocks[:i])
            n = 2 * self.seg_blocks[i]
            key = f"{c.prefix}/{self.layer_idx}/{first}-{first + n - 1}"
            kv = torch.cat([self.held[i], self.held[i + 1]], dim=3)  # (2, batch, heads, tokens, head_dim)
            try:
                c.client.put(key, kv, tags=["kv"], scope="client", durable=False)
            except TierFull:
                c.merge_bytes = 0
                return
            try:
                (view,) = c.fetch([key])
            except TierFull:
                c.client.delete(key)
                c.merge_bytes = 0
                return
            old, old_keys = self.held[i:], self.block_keys[i : i + 2]
            self.held[i:], self._held_k[i:], self._held_v[i:] = [view], [view[0]], [view[1]]
            self.block_keys[i : i + 2], self.seg_blocks[i : i + 2] = [key], [n]
            c.client.release(old)
            for k in old_keys:
                with contextlib.suppress(NotFound):
                    c.client.delete(k)
            c.merges += 1

    def unhold(self, first: int = 0) -> None:
        """Release the held views of blocks ``first`` and later (one frame)."""
        gone = self.held[first:]
        if not gone:
            return
        del self.held[first:], self._held_k[first:], self._held_v[first:]
        self.cache.held_bytes -= sum(v.numel() * v.element_size() for v in gone)
        with contextlib.suppress(NotLeased, DaemonUnavailable):
            self.cache.client.release(gone)

    def _offload(self) -> None:
        before = len(self.block_keys)
        self._offload_blocks()
        if len(self.block_keys) != before:
            # a new buffer for what stays, so the offloaded bytes go with the old one (the K/V this
            # step returns may be a view of it: it is not shifted in place)
            self._rebuffer(*self._kv(), 0)
            self.hold_more()

    def _offload_blocks(self) -> None:
        c = self.cache
        while self._resident_len() > c.window:
            keys, values = self._kv()
            k, v = keys[..., : c.block, :], values[..., : c.block, :]
            key = f"{c.prefix}/{self.layer_idx}/{sum(self.seg_blocks)}"
            kv = torch.stack([k, v])
            try:
                c.client.put(key, kv, tags=["kv"], scope="client", durable=False)
            except TierFull:
                if not c.shed():  # the held views may be what fills the RAM tier: let them go, once
                    c.put_failures += 1
                    return
                try:
                    c.client.put(key, kv, tags=["kv"], scope="client", durable=False)
                except TierFull:
                    c.put_failures += 1
                    return
            self.block_nbytes = kv.numel() * kv.element_size()
            self.block_keys.append(key)
            self.seg_blocks.append(1)
            c.offloaded_blocks += 1
            self.keys = keys[..., c.block :, :]
            self.values = values[..., c.block :, :]

    def drop_offloaded(self) -> None:
        """Delete this layer's entries in tierd (a missing one is fine: it may have been evicted)."""
        self.unhold()
        client = self.cache.client
        for key in self.block_keys:
            with contextlib.suppress(NotFound):
                client.delete(key)
        self.block_keys, self.seg_blocks = [], []

    def reset(self) -> None:
        self.drop_offloaded()
        self._buf, self._views = None, (None, None)
        super().reset()

    # -- editing the cache (assisted decoding, beam search): offloaded blocks are edited too -------
    def crop(self, tokens_to_remove: int) -> None:
        """Remove the last ``-tokens_to_remove`` tokens (transformers' convention: a negative count).

        A cut inside the resident window is the plain one. A cut reaching offloaded blocks brings the
        blocks it touches back (one get_many), deletes their entries, and keeps their head resident.
        """
        if tokens_to_remove > 0:
            raise ValueError(f"crop takes a negative number of tokens to remove, got {tokens_to_remove}")
        n = -tokens_to_remove
        if n == 0 or not self.is_initialized:
            return
        if n <= self._resident_len() or not self.block_keys:
            super().crop(tokens_to_remove)
            return
        c = self.cache
        keep = max(0, self.get_seq_length() - n)
        first, start = 0, 0  # the first entry the cut reaches, and its first token
        while start + self.seg_blocks[first] * c.block <= keep:
            start += self.seg_blocks[first] * c.block
            first += 1
        back = self.block_keys[first:]
        self.unhold(first)
        views = c.client.get_many(back)
        c.round_trips += 1
        try:
            dev = self._kv()[0].device
            k = torch.cat([v[0] for v in views], dim=-2)[..., : keep - start, :].to(dev, copy=True)
            vv = torch.cat([v[1] for v in views], dim=-2)[..., : keep - start, :].to(dev, copy=True)
        finally:
            c.client.release(views)
        for key in back:
            with contextlib.suppress(NotFound):
                c.client.delete(key)
        self.block_keys, self.seg_blocks = self.block_keys[:first], self.seg_blocks[:first]
        self.keys, self.values = k, vv

    def _rewrite_offloaded(self, fn: Any) -> None:
        """Apply ``fn`` to the batch dimension of every offloaded block (put back under its key, a new
        version: the held views of the old ones are released and the new ones held)."""
        c = self.cache
        self.unhold()
        for key, blocks in zip(self.block_keys, self.seg_blocks, strict=True):
            view = c.client.get(key)
            try:
                kv = fn(view)  # (2, batch, heads, tokens, head_dim): dim 1 is the batch
            finally:
                c.client.release(view)
            kv = kv.contiguous()
            c.client.put(key, kv, tags=["kv"], scope="client", durable=False)
            self.block_nbytes = kv.numel() * kv.element_size() // blocks
        self.hold_more()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        idx = beam_idx.to("cpu")
        self._rewrite_offloaded(lambda t: t.index_select(1, idx))
        super().reorder_cache(beam_idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._rewrite_offloaded(lambda t: t.repeat_interleave(repeats, dim=1))
        super().batch_repeat_interleave(repeats)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        idx = indices.to("cpu")
        self._rewrite_offloaded(lambda t: t[:, idx])
        super().batch_select_indices(indices)


# transformers 5.24 renamed generate()'s cache argument from ``past_key_values`` to ``cache`` and warns
# (FutureWarning) on the old name; releases before it know only the old name.
_RENAMED_IN = Version("5.24.0.dev0")
GENERATE_CACHE_ARG = "cache" if Version(transformers.__version__) >= _RENAMED_IN else "past_key_values"


def cache_kwargs(cache: Cache) -> dict[str, Cache]:
    """``model.generate(**inputs, **cache_kwargs(cache))`` under the name the installed transformers takes:
    ``cache=`` from 5.24 on, ``past_key_values=`` before it. Works for any ``Cache``, ``TierdKVCache`` or not.
    """
    return {GENERATE_CACHE_ARG: cache}


class TierdKVCache(Cache):
    """A ``Cache`` for generate's ``cache=`` (``past_key_values=`` before transformers 5.24; see
    :func:`cache_kwargs`): ``window`` newest tokens per layer in the process, older
    blocks of ``block`` tokens in tierd under ``kv/<uuid>/<layer>/<block>`` (see the module docstring for
    the memory / latency trade-off).

    ``client`` is a ``tierd_client.Client`` that outlives the cache. ``close()`` (or ``with``) deletes the
    entries; ``reset()`` deletes them and empties the cache for reuse.

    ``hold_bytes``: at most this many bytes of offloaded blocks stay leased across steps (zero-copy views
    of the daemon's RAM tier: no copy in this process, but the daemon cannot demote them while held),
    never more than half the RAM tier (read once, here); the other blocks are fetched and released at
    every step. 0: every step fetches every block. A ``TierFull`` on a put or a fetch releases every held
    view and the cache streams from then on (``hold_limit`` drops to 0; ``hold_sheds`` counts it).

    Counters: ``offloaded_blocks``, ``fetched_blocks``, ``round_trips``, ``put_failures``,
    ``held_bytes`` (now), ``held_peak``, ``hold_sheds``.
    """

    def __init__(
        self,
        client: Any,
        *,
        window: int = 1024,
        block: int = 128,
        hold_bytes: int = 512 << 20,
        namespace: str = "kv",
    ) -> None:
        if block < 1 or window < block:
            raise ValueError(f"need 1 <= block <= window, got block={block}, window={window}")
        if hold_bytes < 0:
            raise ValueError(f"hold_bytes must be >= 0, got {hold_bytes}")
        super().__init__(layers=[])
        self.client = client
        self.window = window
        self.block = block
        self.uuid = uuid.uuid4().hex
        self.prefix = f"{namespace.rstrip('/')}/{self.uuid}"
        self.offloaded_blocks = 0
        self.fetched_blocks = 0
        self.round_trips = 0
        self.put_failures = 0
        ram = _ram_tier_bytes(client)
        self.hold_bytes = hold_bytes
        self.hold_limit = min(hold_bytes, ram // 2)
        #: the most bytes of blocks one fetch asks for (a quarter of the RAM tier)
        self.fetch_bytes = ram // 4
        #: the largest entry held blocks are merged into (a quarter of the hold budget, at most 16 MiB)
        self.merge_bytes = min(self.hold_limit // 4, 16 << 20)
        self.merges = 0
        self._held_bytes = 0
        self.held_peak = 0
        self.hold_sheds = 0
        self.closed = False

    @property
    def held_bytes(self) -> int:
        """Bytes of offloaded blocks this cache holds leased now (at most ``hold_limit``)."""
        return self._held_bytes

    @held_bytes.setter
    def held_bytes(self, n: int) -> None:
        self._held_bytes = n
        self.held_peak = max(self.held_peak, n)

    def fetch(self, keys: list[str]) -> list[torch.Tensor]:
        """Views of these blocks in one round trip (leased: the caller releases or holds them)."""
        views = self.client.get_many(keys)
        self.round_trips += 1
        self.fetched_blocks += len(views)
        return views

    def shed(self) -> bool:
        """Release every held view and hold no more (the RAM tier is full); whether any was held."""
        had = self.held_bytes > 0
        for layer in self.layers:
            if isinstance(layer, TierdKVLayer):
                layer.unhold()
        self.hold_limit = 0
        self.hold_sheds += had
        return had

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.closed:
            raise RuntimeError("TierdKVCache is closed")
        while len(self.layers) <= layer_idx:
            self.layers.append(TierdKVLayer(self, len(self.layers)))
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    def offloaded_keys(self) -> list[str]:
        return [k for layer in self.layers if isinstance(layer, TierdKVLayer) for k in layer.block_keys]

    def close(self) -> None:
        """Delete every entry of this cache in tierd and drop the resident tensors; idempotent."""
        if self.closed:
            return
        self.reset()
        self.closed = True

    def __enter__(self) -> TierdKVCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _ram_tier_bytes(client: Any) -> int:
    """The capacity of the daemon's RAM tier (0 if it reports none)."""
    for tier in client.stats().get("tiers", []):
        if tier.get("name") == "ram":
            return int(tier.get("capacity_bytes", 0))
    return 0
