"""The batched paged-attention path equals the per-sequence reference (fp32, CPU)."""

from __future__ import annotations

import pytest
import torch

from miles.kernels.paged_attention import (
    batched_paged_attention,
    paged_prefix_attention,
    plan_paged_attention,
    store_kv,
)

BLOCK = 4


def _setup(
    seq_lens: list[int], query_lens: list[int], hq: int, hkv: int, d: int = 8, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[torch.Tensor], torch.Tensor]:
    """A cache holding every sequence's K/V in shuffled blocks, and queries for the new tokens.

    Unwritten slots hold NaN: a kernel that lets a padding position read one would fail.
    """
    gen = torch.Generator().manual_seed(seed)
    need = [-(-s // BLOCK) for s in seq_lens]
    num_blocks = sum(need) + 3
    k_cache = torch.full((num_blocks, BLOCK, hkv, d), float("nan"))
    v_cache = torch.full((num_blocks, BLOCK, hkv, d), float("nan"))
    perm = torch.randperm(num_blocks, generator=gen)
    tables, used = [], 0
    for n in need:
        tables.append(perm[used : used + n].clone())
        used += n
    for table, s in zip(tables, seq_lens):
        pos = torch.arange(s)
        slots = table[pos // BLOCK] * BLOCK + pos % BLOCK
        store_kv(
            k_cache,
            v_cache,
            torch.randn(s, hkv, d, generator=gen),
            torch.randn(s, hkv, d, generator=gen),
            slots,
        )
    q = torch.randn(sum(query_lens), hq, d, generator=gen)
    width = max(need) + 2  # extra padding columns are never read
    padded = torch.zeros(len(tables), width, dtype=torch.long)
    for i, t in enumerate(tables):
        padded[i, : len(t)] = t
    return k_cache, v_cache, q, tables, padded


def _check(seq_lens: list[int], query_lens: list[int], hq: int, hkv: int, **plan_kw: float) -> None:
    k_cache, v_cache, q, tables, padded = _setup(seq_lens, query_lens, hq, hkv)
    ref = paged_prefix_attention(q, k_cache, v_cache, tables, query_lens, seq_lens, 0.35)
    plan = plan_paged_attention(padded, query_lens, seq_lens, BLOCK, **plan_kw)  # type: ignore[arg-type]
    out = batched_paged_attention(q, k_cache, v_cache, plan, 0.35)
    assert out.shape == ref.shape
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6)


# Lengths straddle block boundaries (multiples of BLOCK, one more, one less) and are ragged.
RAGGED = [1, 3, 4, 5, 8, 9, 15, 16, 17, 31, 2, 12]


@pytest.mark.parametrize(("hq", "hkv"), [(6, 2), (4, 4), (8, 1)])
@pytest.mark.parametrize("bucket_ratio", [0.0, 0.5, 0.95])
def test_decode_equals_reference(hq: int, hkv: int, bucket_ratio: float) -> None:
    _check(RAGGED, [1] * len(RAGGED), hq, hkv, bucket_ratio=bucket_ratio)


def test_decode_equal_lengths_needs_no_mask() -> None:
    k_cache, v_cache, q, tables, padded = _setup([9, 9, 9], [1, 1, 1], 6, 2)
    plan = plan_paged_attention(padded, [1, 1, 1], [9, 9, 9], BLOCK)
    assert len(plan.chunks) == 1 and plan.chunks[0].mask is None
    ref = paged_prefix_attention(q, k_cache, v_cache, tables, [1, 1, 1], [9, 9, 9], 0.35)
    torch.testing.assert_close(
        batched_paged_attention(q, k_cache, v_cache, plan, 0.35), ref, atol=1e-6, rtol=1e-6
    )


@pytest.mark.parametrize("bucket_ratio", [0.0, 0.5, 0.95])
def test_prefill_mixing_prefix_cached_fresh_and_decode(bucket_ratio: float) -> None:
    # fresh prompts (query == seq), prompts with a cached prefix, chunked continuations and
    # single decode tokens, in one forward.
    seq_lens = [7, 16, 13, 4, 21, 9, 5, 17]
    query_lens = [7, 16, 5, 1, 8, 1, 2, 17]
    _check(seq_lens, query_lens, 6, 2, bucket_ratio=bucket_ratio)


def test_tiny_chunk_budget_splits_but_keeps_results() -> None:
    seq_lens = [7, 16, 13, 4, 21, 9]
    query_lens = [7, 3, 13, 1, 21, 2]
    k_cache, v_cache, q, tables, padded = _setup(seq_lens, query_lens, 6, 2)
    plan = plan_paged_attention(padded, query_lens, seq_lens, BLOCK, max_chunk_elements=1)
    assert len(plan.chunks) == len(seq_lens)
    ref = paged_prefix_attention(q, k_cache, v_cache, tables, query_lens, seq_lens, 0.35)
    torch.testing.assert_close(
        batched_paged_attention(q, k_cache, v_cache, plan, 0.35), ref, atol=1e-6, rtol=1e-6
    )


def test_single_chunk_keeps_batch_order_without_scatter() -> None:
    plan = plan_paged_attention(
        torch.zeros(3, 4, dtype=torch.long), [1, 1, 1], [5, 9, 7], BLOCK, bucket_ratio=0.0
    )
    (chunk,) = plan.chunks
    assert chunk.q_index is None and chunk.token_index is None and chunk.valid_rows is None
    assert chunk.kv_slots.shape == (3, 9)


@pytest.mark.parametrize(
    ("query_lens", "seq_lens", "width"),
    [([0], [3], 1), ([4], [3], 1), ([1], [9], 2), ([1, 1], [3], 1)],
)
def test_plan_rejects_bad_lengths(query_lens: list[int], seq_lens: list[int], width: int) -> None:
    with pytest.raises(ValueError):
        plan_paged_attention(torch.zeros(len(seq_lens), width, dtype=torch.long), query_lens, seq_lens, BLOCK)


def test_plan_rejects_empty_batch_and_wrong_token_count() -> None:
    with pytest.raises(ValueError):
        plan_paged_attention(torch.zeros(0, 1, dtype=torch.long), [], [], BLOCK)
    k_cache, v_cache, q, _, padded = _setup([5], [2], 2, 2)
    plan = plan_paged_attention(padded, [2], [5], BLOCK)
    with pytest.raises(ValueError):
        batched_paged_attention(q[:1], k_cache, v_cache, plan, 0.35)
