"""Block allocator: reference counts, chained prefix hashes, pending prefixes, LRU eviction."""

from __future__ import annotations

import pytest
import torch

from miles.engine.kv_cache import AllocStatus, BlockAllocator, KVCache, block_hash
from miles.engine.request import Request
from miles.kernels.attention import prefix_causal_attention
from miles.kernels.paged_attention import paged_prefix_attention, store_kv
from miles.types import SamplingParams


def _req(rid: str, ids: list[int]) -> Request:
    return Request(rid, list(ids), SamplingParams())


def _compute_all(alloc: BlockAllocator, req: Request) -> None:
    req.num_computed_tokens = req.num_tokens
    alloc.mark_computed(req)


def test_chained_hash_depends_on_the_whole_prefix():
    assert block_hash(None, [1, 2]) == block_hash(None, [1, 2])
    assert block_hash(None, [1, 2]) != block_hash(block_hash(None, [3, 4]), [1, 2])


def test_shared_prefix_is_reused_and_refcounted():
    alloc = BlockAllocator(num_blocks=16, block_size=4)
    prompt = list(range(10))  # 2 full blocks + 2 tokens
    a = _req("a", prompt)
    assert alloc.allocate(a) == AllocStatus.OK
    assert (a.cached_tokens, len(a.block_table)) == (0, 3)
    b = _req("b", prompt)
    # a's full blocks are registered but not computed yet: b waits instead of recomputing them.
    assert alloc.allocate(b) == AllocStatus.WAIT_FOR_PREFIX
    _compute_all(alloc, a)
    assert alloc.allocate(b) == AllocStatus.OK
    assert b.cached_tokens == 8 and b.num_computed_tokens == 8
    assert b.block_table[:2] == a.block_table[:2] and b.block_table[2] != a.block_table[2]
    assert alloc.num_used_blocks == 4
    assert [alloc.blocks[i].ref_count for i in a.block_table[:2]] == [2, 2]
    alloc.free(a)
    alloc.free(b)
    assert alloc.num_free_blocks == 16 and alloc.num_used_blocks == 0


def test_last_token_block_is_never_taken_from_the_cache():
    alloc = BlockAllocator(num_blocks=8, block_size=4)
    a = _req("a", list(range(8)))  # exactly two full blocks
    alloc.allocate(a)
    _compute_all(alloc, a)
    b = _req("b", list(range(8)))
    alloc.allocate(b)
    assert b.cached_tokens == 4 and b.num_remaining == 4


def test_freed_cached_blocks_are_reused_then_evicted_lru():
    alloc = BlockAllocator(num_blocks=6, block_size=2)
    a = _req("a", [1, 2, 3, 4, 5])
    alloc.allocate(a)
    _compute_all(alloc, a)
    alloc.free(a)
    assert alloc.num_free_blocks == 6 and alloc.num_cached_blocks == 2
    again = _req("again", [1, 2, 3, 4, 9])
    alloc.allocate(again)
    assert again.cached_tokens == 4
    alloc.free(again)
    # A different prompt needing every block evicts the cached ones.
    big = _req("big", list(range(50, 61)))
    assert alloc.allocate(big) == AllocStatus.OK
    assert alloc.num_free_blocks == 0
    assert alloc.allocate(_req("c", [1, 2, 3, 4, 5])) == AllocStatus.NO_SPACE
    alloc.free(big)
    c = _req("c", [1, 2, 3, 4, 5])
    alloc.allocate(c)
    assert c.cached_tokens == 0


def test_decode_blocks_are_registered_when_full():
    alloc = BlockAllocator(num_blocks=8, block_size=2)
    a = _req("a", [1, 2, 3])
    alloc.allocate(a)
    _compute_all(alloc, a)
    a.output_ids.append(4)
    assert alloc.append_slot(a) and len(a.block_table) == 2
    _compute_all(alloc, a)
    b = _req("b", [1, 2, 3, 4, 5])
    alloc.allocate(b)
    assert b.cached_tokens == 4


def test_reset_prefix_cache_forgets_everything():
    alloc = BlockAllocator(num_blocks=4, block_size=2)
    a = _req("a", [1, 2, 3])
    alloc.allocate(a)
    _compute_all(alloc, a)
    alloc.free(a)
    alloc.reset_prefix_cache()
    assert alloc.num_cached_blocks == 0
    b = _req("b", [1, 2, 3])
    alloc.allocate(b)
    assert b.cached_tokens == 0


def test_paged_attention_equals_contiguous_attention():
    gen = torch.Generator().manual_seed(0)
    cache = KVCache(num_layers=1, num_blocks=10, block_size=3, num_kv_heads=2, head_dim=8)
    lens, news = [7, 4], [3, 4]  # sequence 0 has 4 cached tokens and 3 new ones
    tables = [torch.tensor([5, 1, 8]), torch.tensor([2, 9])]
    ks = [torch.randn(n, 2, 8, generator=gen) for n in lens]
    vs = [torch.randn(n, 2, 8, generator=gen) for n in lens]
    slots = [t[torch.arange(n) // 3] * 3 + torch.arange(n) % 3 for t, n in zip(tables, lens)]
    store_kv(cache.k[0], cache.v[0], ks[0][:4], vs[0][:4], slots[0][:4])
    new_k = torch.cat([ks[0][4:], ks[1]])
    new_v = torch.cat([vs[0][4:], vs[1]])
    store_kv(cache.k[0], cache.v[0], new_k, new_v, torch.cat([slots[0][4:], slots[1]]))
    q = torch.randn(sum(news), 4, 8, generator=gen)
    out = paged_prefix_attention(q, cache.k[0], cache.v[0], tables, news, lens, 0.3)
    ref = torch.cat(
        [prefix_causal_attention(q[:3], ks[0], vs[0], 0.3), prefix_causal_attention(q[3:], ks[1], vs[1], 0.3)]
    )
    assert torch.equal(out, ref)


def test_kv_capacity_fits_the_rollout_within_the_memory_budget():
    from miles.engine.kv_cache import kv_bytes_per_token, kv_capacity_tokens

    # SmolLM2-135M: 30 layers, 3 KV heads of 64 -> 46,080 bytes per token in fp32
    per_token = kv_bytes_per_token(30, 3, 64, torch.float32)
    assert per_token == 46_080
    plenty = kv_capacity_tokens(
        bytes_per_token=per_token, sequences=32, seq_len=200, available_bytes=20 * 2**30, mem_fraction=0.4
    )
    assert plenty == 32 * 200  # the whole rollout at once, not the 8192-token context x 64 (24 GB)
    tight = kv_capacity_tokens(
        bytes_per_token=per_token, sequences=32, seq_len=200, available_bytes=2**26, mem_fraction=0.5
    )
    assert tight == 2**25 // per_token  # fewer slots: the scheduler preempts instead
    with pytest.raises(MemoryError, match="lower --rollout-max-response-len"):
        kv_capacity_tokens(
            bytes_per_token=per_token, sequences=1, seq_len=8192, available_bytes=2**26, mem_fraction=0.5
        )


def test_available_memory_is_positive_on_this_host():
    from miles.engine.kv_cache import available_memory_bytes

    assert available_memory_bytes(torch.device("cpu")) > 2**20
