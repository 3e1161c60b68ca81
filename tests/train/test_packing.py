"""Packing: every sequence exactly once, token budgets, data-parallel balance, sliced tensors."""

from __future__ import annotations

import random

import pytest
import torch

from miles.train.packing import (
    balanced_partition,
    fixed_size_bins,
    host_bounds,
    select_sequences,
    select_tokens,
    sequence_lengths,
    shard_for_rank,
    split_micro_batches,
    token_budget_bins,
)
from tests.train.helpers import make_batch


def _flat(bins: list[list[int]]) -> list[int]:
    return sorted(i for b in bins for i in b)


def test_fixed_size_bins() -> None:
    assert fixed_size_bins(7, 3) == [[0, 1, 2], [3, 4, 5], [6]]
    assert fixed_size_bins(0, 2) == []
    with pytest.raises(ValueError):
        fixed_size_bins(3, 0)


@pytest.mark.parametrize("seed", range(20))
def test_token_budget_bins_cover_once_and_respect_budget(seed: int) -> None:
    rng = random.Random(seed)
    lengths = [rng.randint(1, 60) for _ in range(rng.randint(1, 40))]
    budget = 64
    bins = token_budget_bins(lengths, budget)
    assert _flat(bins) == list(range(len(lengths)))
    for b in bins:
        assert b == sorted(b)
        assert sum(lengths[i] for i in b) <= budget
    # First-fit-decreasing is within 11/9 OPT + 1 bins; OPT >= total / budget.
    assert len(bins) <= 11 / 9 * sum(lengths) / budget + 2


def test_token_budget_long_sequence_gets_own_bin() -> None:
    bins = token_budget_bins([5, 100, 3], 10)
    assert [1] in bins
    assert _flat(bins) == [0, 1, 2]
    assert len(bins) == 2


def test_token_budget_min_bins() -> None:
    lengths = [4, 4, 4, 4, 30]
    bins = token_budget_bins(lengths, 64, min_bins=3)
    assert len(bins) == 3 and _flat(bins) == list(range(5))
    # More bins than sequences: the rest stay empty (padding micro-batches).
    bins = token_budget_bins([3, 3], 64, min_bins=4)
    assert len(bins) == 4 and _flat(bins) == [0, 1] and bins.count([]) == 2


@pytest.mark.parametrize("seed", range(20))
def test_balanced_partition_quality(seed: int) -> None:
    rng = random.Random(seed)
    lengths = [rng.randint(1, 500) for _ in range(rng.randint(8, 64))]
    parts = balanced_partition(lengths, 4)
    assert _flat(parts) == list(range(len(lengths)))
    loads = [sum(lengths[i] for i in p) for p in parts]
    assert all(p for p in parts)
    # LPT bound: max load <= 4/3 OPT, and OPT >= max(mean load, longest sequence).
    opt_lower = max(sum(lengths) / 4, max(lengths))
    assert max(loads) <= 4 / 3 * opt_lower + 1e-9
    # Greedy: the heaviest part minus its last-added item is no heavier than the lightest part.
    assert max(loads) - min(loads) <= max(lengths)


def test_select_sequences_reorders_whole_rows() -> None:
    batch = make_batch()
    sub = select_sequences(batch, [3, 0])
    sub.check()
    assert sub.cu_seqlens.dtype == torch.int32
    assert sub.cu_seqlens.tolist() == [0, 9, 16]
    cu = batch.cu_seqlens.tolist()
    want = torch.cat([batch.input_ids[cu[3] : cu[4]], batch.input_ids[cu[0] : cu[1]]])
    assert torch.equal(sub.input_ids, want)
    assert torch.equal(sub.positions[:9], torch.arange(9))
    assert sub.sample_indices == (3, 0)
    assert torch.equal(sub.rewards, batch.rewards[[3, 0]])


def test_split_micro_batches_and_shards_cover_batch() -> None:
    batch = make_batch()
    for kw in (dict(micro_batch_size=4), dict(max_tokens=15)):
        mbs = split_micro_batches(batch, **kw)  # type: ignore[arg-type]
        assert sorted(i for mb in mbs for i in mb.sample_indices) == list(range(batch.num_sequences))
        assert sum(mb.num_tokens for mb in mbs) == batch.num_tokens
        if "max_tokens" in kw:
            assert all(mb.num_tokens <= 15 for mb in mbs)
    shards = [shard_for_rank(batch, r, 2) for r in range(2)]
    assert sorted(i for s in shards for i in s.sample_indices) == list(range(batch.num_sequences))
    tokens = [s.num_tokens for s in shards]
    assert abs(tokens[0] - tokens[1]) <= max(sequence_lengths(batch))
    with pytest.raises(ValueError):
        shard_for_rank(batch, 2, 2)


def test_select_tokens_is_the_concatenation_of_the_chosen_rows() -> None:
    bounds = [0, 3, 3, 7, 8, 12]  # an empty sequence in the middle
    cu = torch.tensor(bounds, dtype=torch.int32)
    values = torch.arange(12 * 2).reshape(12, 2)
    for idx in ([4, 0, 2], [1], [1, 3], [2, 2, 0], list(range(5))):
        want = torch.cat([values[bounds[i] : bounds[i + 1]] for i in idx])
        assert torch.equal(select_tokens(values, cu, idx), want)
    assert select_tokens(values, cu, []).shape == (0, 2)


def test_host_bounds_reads_a_tensor_once_and_again_after_it_changes() -> None:
    cu = torch.tensor([0, 2, 5], dtype=torch.int32)
    first = host_bounds(cu)
    assert first == [0, 2, 5] and host_bounds(cu) is first  # cached: no second device read
    cu[2] = 6  # an in-place change bumps the tensor's version
    assert host_bounds(cu) == [0, 2, 6]
    other = torch.tensor([0, 2, 5], dtype=torch.int32)
    assert host_bounds(other) == [0, 2, 5] and host_bounds(other) is not first
