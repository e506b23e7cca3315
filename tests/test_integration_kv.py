"""TierdKVCache on a tiny random Qwen3-VL (built from a config: no downloads), against a real daemon."""

from __future__ import annotations

import itertools

import pytest
import torch
from transformers import DynamicCache

from tests.conftest import wait_until
from tests.test_integration_vision import build_tiny_qwen3vl, image_inputs
from tierd_client import Client
from tierd_integration.kvcache import TierdKVCache, cache_kwargs

GEN = dict(max_new_tokens=24, do_sample=False)
N_LAYERS = 2


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return build_tiny_qwen3vl()


def _text(n: int = 12, seed: int = 2) -> dict:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 200, (1, n), generator=gen)
    return dict(input_ids=ids, attention_mask=torch.ones_like(ids))


@torch.no_grad()
def test_greedy_tokens_equal_dynamic_cache_and_blocks_are_offloaded(daemon, model) -> None:
    inputs = _text(12)
    ref = model.generate(**inputs, **cache_kwargs(DynamicCache()), **GEN)
    with Client(daemon.socket) as c:
        kv = TierdKVCache(c, window=8, block=4, hold_bytes=0)  # nothing held: one entry per block
        out = model.generate(**inputs, **cache_kwargs(kv), **GEN)
        total = 12 + GEN["max_new_tokens"] - 1  # the last token's K/V is never computed
        assert kv.get_seq_length() == total
        for layer in kv.layers:
            assert layer._resident_len() <= 8
            assert layer.offloaded_len + layer._resident_len() == total
        expected_blocks = (total - 8 + 3) // 4
        assert kv.offloaded_blocks == N_LAYERS * expected_blocks
        assert kv.round_trips > 0 and kv.put_failures == 0
        entries = c.ls(f"kv/{kv.uuid}/")
        assert sorted(e["key"] for e in entries) == sorted(kv.offloaded_keys())
        assert all("kv" in e["tags"] for e in entries)
        layer0 = c.get(f"kv/{kv.uuid}/0/0")
        assert tuple(layer0.shape) == (2, 1, 2, 4, 16)  # K/V, batch, kv heads, block, head_dim
        c.release(layer0)
        kv.close()
        assert c.ls("kv/") == []
        assert kv.offloaded_keys() == []
        kv.close()  # idempotent
        with pytest.raises(RuntimeError):
            kv.update(torch.zeros(1, 2, 1, 16), torch.zeros(1, 2, 1, 16), 0)
    assert torch.equal(out, ref)


@torch.no_grad()
def test_entries_exist_during_generation(daemon, model) -> None:
    seen: list[int] = []
    with Client(daemon.socket) as c, Client(daemon.socket) as observer:
        kv = TierdKVCache(c, window=8, block=4)

        def look(*_: object) -> None:
            seen.append(len([e for e in observer.ls("kv/") if "kv" in e["tags"]]))

        hook = model.model.language_model.layers[0].register_forward_pre_hook(look)
        try:
            model.generate(**_text(10), **cache_kwargs(kv), max_new_tokens=10, do_sample=False)
        finally:
            hook.remove()
            kv.close()
        assert seen[0] == 0 and max(seen) > 0
        assert observer.ls("kv/") == []


@torch.no_grad()
def test_image_prompt_equal_dynamic_cache(daemon, model) -> None:
    inputs = image_inputs(seed=7)
    ref = model.generate(**inputs, **cache_kwargs(DynamicCache()), max_new_tokens=12, do_sample=False)
    with Client(daemon.socket) as c, TierdKVCache(c, window=8, block=4) as kv:
        out = model.generate(**inputs, **cache_kwargs(kv), max_new_tokens=12, do_sample=False)
        assert kv.offloaded_blocks > 0
    assert torch.equal(out, ref)


@torch.no_grad()
def test_a_closed_clients_entries_are_gone(daemon, model) -> None:
    with Client(daemon.socket) as observer:
        c = Client(daemon.socket)
        kv = TierdKVCache(c, window=8, block=4)
        model.generate(**_text(16), **cache_kwargs(kv), max_new_tokens=4, do_sample=False)
        # 19 tokens: 3 blocks per layer out, held and merged into entries of 2 and 1
        assert [layer.seg_blocks for layer in kv.layers] == [[2, 1]] * N_LAYERS
        assert len(observer.ls(f"kv/{kv.uuid}/")) == N_LAYERS * 2
        c.close()  # no kv.close(): scope="client" entries go with the connection
        wait_until(lambda: observer.ls("kv/") == [], what="client-scope kv entries to go")


@torch.no_grad()
def test_reset_deletes_and_the_cache_is_reusable(daemon, model) -> None:
    inputs = _text(12, seed=5)
    ref = model.generate(**inputs, **cache_kwargs(DynamicCache()), max_new_tokens=8, do_sample=False)
    with Client(daemon.socket) as c, TierdKVCache(c, window=4, block=4) as kv:
        model.generate(**inputs, **cache_kwargs(kv), max_new_tokens=8, do_sample=False)
        assert c.ls("kv/")
        kv.reset()
        assert c.ls("kv/") == [] and kv.get_seq_length() == 0
        out = model.generate(**inputs, **cache_kwargs(kv), max_new_tokens=8, do_sample=False)
    assert torch.equal(out, ref)


def test_bad_sizes_are_refused(daemon) -> None:
    with Client(daemon.socket) as c:
        with pytest.raises(ValueError):
            TierdKVCache(c, window=2, block=4)
        with pytest.raises(ValueError):
            TierdKVCache(c, window=8, block=0)
        with pytest.raises(ValueError, match="hold_bytes"):
            TierdKVCache(c, window=8, block=4, hold_bytes=-1)


@torch.no_grad()
def test_beam_search_equal_dynamic_cache_with_blocks_offloaded(daemon, model) -> None:
    # beam search reorders the cache every step: the offloaded blocks are reordered too
    inputs = _text(12)
    gen = dict(max_new_tokens=16, do_sample=False, num_beams=3, num_return_sequences=2)
    ref = model.generate(**inputs, **cache_kwargs(DynamicCache()), **gen)
    with Client(daemon.socket) as c:
        kv = TierdKVCache(c, window=8, block=4)
        out = model.generate(**inputs, **cache_kwargs(kv), **gen)
        assert kv.offloaded_blocks > 0
        kv.close()
    assert torch.equal(out, ref)


@torch.no_grad()
def test_prompt_lookup_decoding_crops_into_offloaded_blocks(daemon, model) -> None:
    # candidate tokens that are rejected are cropped away, also when the cut reaches offloaded blocks
    ids = torch.arange(1, 9).repeat(3).unsqueeze(0)  # repetitive: prompt lookup proposes candidates
    inputs = dict(input_ids=ids, attention_mask=torch.ones_like(ids))
    gen = dict(max_new_tokens=20, do_sample=False, prompt_lookup_num_tokens=6)
    ref = model.generate(**inputs, **cache_kwargs(DynamicCache()), **gen)
    with Client(daemon.socket) as c:
        kv = TierdKVCache(c, window=4, block=2)
        out = model.generate(**inputs, **cache_kwargs(kv), **gen)
        kv.close()
    assert torch.equal(out, ref)


def test_crop_into_offloaded_blocks_matches_a_dynamic_cache(daemon) -> None:
    gen = torch.Generator().manual_seed(0)
    steps = [torch.randn(1, 2, n, 16, generator=gen) for n in (10, 1, 1, 1, 1, 1, 1, 1)]
    with Client(daemon.socket) as c:
        kv, ref = TierdKVCache(c, window=4, block=2), DynamicCache()
        for s in steps:
            kv.update(s, -s, 0)
            ref.update(s, -s, 0)
        layer = kv.layers[0]
        assert layer.offloaded_len == 14 and kv.get_seq_length() == ref.get_seq_length() == 17
        kv.crop(-1)  # inside the resident window
        ref.crop(-1)
        kv.crop(-7)  # reaches three offloaded blocks (one of them in part)
        ref.crop(-7)
        assert kv.get_seq_length() == ref.get_seq_length() == 9
        # 7 blocks of 2 were held and merged into entries of 4, 2 and 1 blocks: the cut (9 tokens
        # kept) reaches the second, so the first stays and one token of the second comes back
        assert layer.offloaded_len == 8 and layer.seg_blocks == [4] and len(c.ls(f"kv/{kv.uuid}/")) == 1
        nxt = torch.randn(1, 2, 1, 16, generator=gen)
        k1, v1 = kv.update(nxt, -nxt, 0)
        k2, v2 = ref.update(nxt, -nxt, 0)
        assert torch.equal(k1, k2) and torch.equal(v1, v2)
        kv.crop(-10)  # everything
        assert kv.get_seq_length() == 0 and c.ls(f"kv/{kv.uuid}/") == []
        with pytest.raises(ValueError, match="negative"):
            kv.crop(3)
        kv.close()


@torch.no_grad()
def test_long_context_with_a_small_window_equals_dynamic_cache(daemon, model) -> None:
    # 1,500 prompt tokens against a window of 128: 43 blocks of 32 per layer live in tierd, and with
    # nothing held each step reads them all back; the resident part is a buffer of window + block
    # tokens appended in place, re-made only when a block leaves
    inputs = _text(1500, seed=5)
    gen = dict(max_new_tokens=16, do_sample=False)
    ref = model.generate(**inputs, **cache_kwargs(DynamicCache()), **gen)
    with Client(daemon.socket) as c:
        with TierdKVCache(c, window=128, block=32, hold_bytes=0) as kv:
            out = model.generate(**inputs, **cache_kwargs(kv), **gen)
            total = 1500 + 16 - 1
            for layer in kv.layers:
                assert layer._resident_len() <= 128
                assert layer.offloaded_len == (total - 128 + 31) // 32 * 32
                assert layer._buf is not None and layer._buf[0].shape[-2] == 128 + 32
            assert kv.put_failures == 0 and kv.round_trips >= N_LAYERS * 15
        assert c.ls("kv/") == []
    assert torch.equal(out, ref)


# -- held blocks: offloaded blocks leased across steps under a byte budget ----------------------------
BLOCK_BYTES_TINY = 2 * 2 * 4 * 16 * 4  # K and V, 2 KV heads, block of 4, head_dim 16, float32


@pytest.mark.parametrize(
    ("window", "block", "hold_blocks"),
    [(8, 4, 0), (8, 4, 3), (8, 4, 10_000), (16, 8, 5), (4, 4, 1)],
)
@torch.no_grad()
def test_tokens_equal_dynamic_cache_at_every_hold_budget(daemon, model, window, block, hold_blocks) -> None:
    # hold_blocks 0: every step fetches every block; 10,000: capped at half the 64 MiB RAM tier, so
    # every block is held; in between some are held, the rest fetched each step
    block_bytes = BLOCK_BYTES_TINY * block // 4
    inputs = _text(40, seed=3)
    gen = dict(max_new_tokens=20, do_sample=False)
    ref = model.generate(**inputs, **cache_kwargs(DynamicCache()), **gen)
    with Client(daemon.socket) as c:
        kv = TierdKVCache(c, window=window, block=block, hold_bytes=hold_blocks * block_bytes)
        assert kv.hold_limit == min(hold_blocks * block_bytes, 32 << 20)
        out = model.generate(**inputs, **cache_kwargs(kv), **gen)
        blocks = [layer.offloaded_len // block for layer in kv.layers]
        held = [layer.held_blocks for layer in kv.layers]
        assert sum(blocks) == kv.offloaded_blocks > 0
        assert sum(held) == min(hold_blocks, sum(blocks))
        assert kv.held_bytes == sum(held) * block_bytes <= kv.hold_limit
        assert kv.held_peak <= kv.hold_limit
        # the blocks fetched for a step were released after it: one lease per held entry
        assert c.lease_count == sum(len(layer.held) for layer in kv.layers)
        for layer in kv.layers:  # held entries merged two equal ones at a time: 2^k blocks, largest first
            merged = layer.seg_blocks[: len(layer.held)]
            assert merged == sorted(merged, reverse=True) and all(n & (n - 1) == 0 for n in merged)
            # two neighbours of a size only where merging them would pass merge_bytes
            assert all(a != b or 2 * a * block_bytes > kv.merge_bytes for a, b in itertools.pairwise(merged))
            assert all(n == 1 for n in layer.seg_blocks[len(layer.held) :])
        assert (kv.merges > 0) == (hold_blocks >= 2 and kv.merge_bytes >= 2 * block_bytes)
        entries = c.ls(f"kv/{kv.uuid}/")
        assert sorted(e["key"] for e in entries) == sorted(kv.offloaded_keys())
        kv.close()
        assert kv.held_bytes == 0 and c.lease_count == 0 and c.ls("kv/") == []
    assert torch.equal(out, ref)


def test_held_blocks_need_no_round_trip_and_the_rest_are_released_each_step(daemon) -> None:
    gen = torch.Generator().manual_seed(4)

    def step(n: int) -> None:
        s = torch.randn(1, 2, n, 16, generator=gen)
        k1, v1 = kv.update(s, -s, 0)
        k2, v2 = ref.update(s, -s, 0)
        assert torch.equal(k1, k2) and torch.equal(v1, v2)

    with Client(daemon.socket) as c:
        # blocks of 2 x 1 x 2 x 4 x 16 float32 = 1 KiB: room for 3
        kv, ref = TierdKVCache(c, window=8, block=4, hold_bytes=3 * 1024), DynamicCache()
        step(18)  # 3 blocks leave the window of 8, 6 tokens stay
        layer = kv.layers[0]
        assert len(layer.block_keys) == 3 and len(layer.held) == 3 and c.lease_count == 3
        before = kv.round_trips
        step(1)
        step(1)
        assert kv.round_trips == before  # every block held: a step is no round trip
        step(1)  # a 4th block leaves: the budget is spent, it is not held
        assert len(layer.block_keys) == 4 and len(layer.held) == 3 and kv.held_bytes == 3 * 1024
        for _ in range(3):  # one round trip per step for the 4th, released again
            before = kv.round_trips
            step(1)
            assert kv.round_trips == before + 1 and c.lease_count == 3
        kv.crop(-13)  # reaches into the held blocks: their views are released with their entries
        ref.crop(-13)
        assert kv.get_seq_length() == ref.get_seq_length() == 11
        assert len(layer.held) == len(layer.block_keys) == 2 and kv.held_bytes == 2 * 1024
        assert c.lease_count == 2 and len(c.ls(f"kv/{kv.uuid}/")) == 2
        step(1)
        assert kv.held_peak == 3 * 1024
        kv.reset()
        assert c.lease_count == 0 and kv.held_bytes == 0 and c.ls("kv/") == []
        kv.close()


def test_a_full_ram_tier_sheds_the_held_blocks(start_daemon) -> None:
    # an 8 MiB RAM tier over a disk tier: this cache may hold 4 MiB (half the tier), another client
    # holds 3.5 MiB leased; the 5th block of 1 MiB finds no room (every block held, nothing to demote),
    # so the cache releases its held views, the daemon demotes them and the put succeeds; from then on
    # the blocks are fetched (from disk) at each step, at most 2 MiB (a quarter of the tier) per
    # get_many, and the K/V stay those of a DynamicCache
    d = start_daemon(ram_bytes="8MiB", disk_bytes="64MiB")
    gen = torch.Generator().manual_seed(5)
    with Client(d.socket) as c, Client(d.socket) as other:
        other.put("other/big", torch.zeros(7 << 18, dtype=torch.uint8))  # 1.75 MiB
        other.put("other/big2", torch.zeros(7 << 18, dtype=torch.uint8))
        leased = other.get_many(["other/big", "other/big2"])
        kv, ref = TierdKVCache(c, window=64, block=64, hold_bytes=64 << 20), DynamicCache()
        assert kv.hold_limit == 4 << 20 and kv.fetch_bytes == 2 << 20
        for i in range(8):  # 64 tokens of 16 heads x 128 float32: from the 2nd on, one 1 MiB block leaves
            s = torch.randn(1, 16, 64, 128, generator=gen)
            before = kv.round_trips
            k1, v1 = kv.update(s, -s, 0)
            k2, v2 = ref.update(s, -s, 0)
            assert torch.equal(k1, k2) and torch.equal(v1, v2), i
            if i <= 4:
                assert kv.held_bytes == i << 20 and kv.hold_sheds == 0
        assert kv.round_trips - before == 3  # the last step read 6 MiB of blocks in 3 gets of 2
        assert kv.hold_sheds == 1 and kv.hold_limit == 0 and kv.held_bytes == 0
        assert kv.held_peak == 4 << 20 and kv.put_failures == 0
        assert len(kv.layers[0].block_keys) == 7 and c.lease_count == 0
        other.release(leased)
        kv.close()
