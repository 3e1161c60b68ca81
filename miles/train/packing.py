"""Split a packed :class:`~miles.types.TrainBatch` into data-parallel shards and micro-batches.

Every split is a list of *sequence index lists* (whole sequences, never cut), turned into new
packed batches by :func:`select_sequences`. Three splitters:

- :func:`fixed_size_bins`: ``micro_batch_size`` consecutive sequences per micro-batch
  (``--micro-batch-size``);
- :func:`token_budget_bins`: first-fit-decreasing bins of at most ``max_tokens`` tokens
  (``--use-dynamic-batch-size --max-tokens-per-gpu``); a sequence longer than the budget gets a
  bin of its own;
- :func:`balanced_partition`: sequences spread over ``dp_size`` data-parallel ranks so that each
  rank gets a similar number of tokens (longest-processing-time greedy).

Within a bin the sequences keep their original relative order, so the packed tensors of a
micro-batch are a reordering of whole rows of the original batch and nothing else.
"""

from __future__ import annotations

import dataclasses
import heapq
import itertools
import weakref
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from miles.types import TrainBatch
from miles.utils.transfer import to_device


def sequence_lengths(batch: TrainBatch) -> list[int]:
    """Number of tokens of each sequence, ``[B]`` as a Python list."""
    bounds = host_bounds(batch.cu_seqlens)
    return [b - a for a, b in itertools.pairwise(bounds)]


def fixed_size_bins(num_sequences: int, micro_batch_size: int) -> list[list[int]]:
    """Consecutive groups of ``micro_batch_size`` sequences (the last one may be smaller)."""
    if micro_batch_size < 1:
        raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
    return [
        list(range(s, min(s + micro_batch_size, num_sequences)))
        for s in range(0, num_sequences, micro_batch_size)
    ]


def token_budget_bins(lengths: Sequence[int], max_tokens: int, min_bins: int = 1) -> list[list[int]]:
    """First-fit-decreasing bins of sequence indices holding at most ``max_tokens`` tokens each.

    A sequence longer than ``max_tokens`` gets a bin of its own (the budget is then exceeded by
    that bin only). ``min_bins`` forces at least that many bins (data-parallel ranks must run the
    same number of micro-batches): the fullest splittable bin is halved until there are enough;
    when no bin holds two sequences any more, the missing bins stay empty. Indices inside a bin
    are sorted.
    """
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    loads: list[int] = []
    for i in order:
        for b, load in enumerate(loads):
            if load + lengths[i] <= max_tokens:
                bins[b].append(i)
                loads[b] += lengths[i]
                break
        else:
            bins.append([i])
            loads.append(lengths[i])
    while len(bins) < min_bins:
        splittable = [b for b in range(len(bins)) if len(bins[b]) > 1]
        if not splittable:
            bins.extend([] for _ in range(min_bins - len(bins)))
            break
        b = max(splittable, key=lambda k: loads[k])
        halves = balanced_partition([lengths[i] for i in bins[b]], 2)
        members = bins[b]
        bins[b] = [members[j] for j in halves[0]]
        bins.append([members[j] for j in halves[1]])
        loads[b] = sum(lengths[i] for i in bins[b])
        loads.append(sum(lengths[i] for i in bins[-1]))
    return [sorted(b) for b in bins]


def balanced_partition(lengths: Sequence[int], num_parts: int) -> list[list[int]]:
    """Spread sequence indices over ``num_parts`` parts with similar token totals.

    Longest-processing-time greedy: longest sequence first, each to the currently lightest part
    (ties to the part with fewer sequences, then the lowest index), which is within 4/3 of the optimal maximum load. Every index
    appears exactly once; with at least ``num_parts`` sequences no part is empty. Indices inside a
    part are sorted.
    """
    if num_parts < 1:
        raise ValueError(f"num_parts must be >= 1, got {num_parts}")
    heap = [(0, 0, p) for p in range(num_parts)]  # (tokens, sequences, part)
    parts: list[list[int]] = [[] for _ in range(num_parts)]
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        tokens, count, p = heapq.heappop(heap)
        parts[p].append(i)
        heapq.heappush(heap, (tokens + lengths[i], count + 1, p))
    return [sorted(p) for p in parts]


_bounds_cache: dict[int, tuple[weakref.ref[Tensor], int, list[int]]] = {}


def host_bounds(cu_seqlens: Tensor) -> list[int]:
    """``cu_seqlens`` as a host list, read from the device once per tensor: a training step
    selects its micro-batches' rows from the same boundaries many times, and every read of a
    CUDA tensor is a device sync that drains the queue of launched kernels."""
    hit = _bounds_cache.get(id(cu_seqlens))
    if hit is not None and hit[0]() is cu_seqlens and hit[1] == cu_seqlens._version:
        return hit[2]
    bounds: list[int] = cu_seqlens.tolist()
    if len(_bounds_cache) >= 64:  # dead or old entries: a step only needs its latest few
        _bounds_cache.clear()
    _bounds_cache[id(cu_seqlens)] = (weakref.ref(cu_seqlens), cu_seqlens._version, bounds)
    return bounds


def sequence_rows(bounds: Sequence[int], seq_indices: Sequence[int]) -> Tensor:
    """Host long ``[T']``: the packed rows of the chosen sequences, concatenated in order."""
    starts = torch.tensor([bounds[i] for i in seq_indices], dtype=torch.long)
    lens = torch.tensor([bounds[i + 1] - bounds[i] for i in seq_indices], dtype=torch.long)
    total = int(lens.sum())
    # Row j of the output is starts[s] + (j - first output row of s), for s the sequence of j.
    shift = torch.repeat_interleave(starts - (torch.cumsum(lens, 0) - lens), lens, output_size=total)
    return shift + torch.arange(total)


def select_tokens(values: Tensor, cu_seqlens: Tensor, seq_indices: Sequence[int]) -> Tensor:
    """The token rows ``[T']`` (or ``[T', ...]``) of the chosen sequences of a packed tensor,
    concatenated: one gather, its index built on the host and sent without a device sync."""
    if not seq_indices:
        return values[:0]
    rows = sequence_rows(host_bounds(cu_seqlens), seq_indices)
    return values.index_select(0, to_device(rows, values.device))


def select_sequences(batch: TrainBatch, seq_indices: Sequence[int]) -> TrainBatch:
    """A new packed :class:`TrainBatch` holding the chosen sequences, in the given order.

    Token tensors are gathered as :func:`select_tokens` does, with one index for all of them;
    per-sequence tensors are indexed and ``cu_seqlens`` (int32) rebuilt from the chosen lengths.
    ``weight_versions`` (a per-batch record, not per-sequence) is kept as is. Reads the device
    once per ``batch`` (its bounds).
    """
    idx = list(seq_indices)
    bounds = host_bounds(batch.cu_seqlens)
    lengths = [bounds[i + 1] - bounds[i] for i in idx]
    cu = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32)
    cu = to_device(cu, batch.cu_seqlens.device)
    seq_index = torch.tensor(idx, dtype=torch.long)
    rows = sequence_rows(bounds, idx)
    rows_on: dict[torch.device, Tensor] = {}  # the one gather index, sent once per device

    def tok(x: Tensor) -> Tensor:
        if x.device not in rows_on:
            rows_on[x.device] = to_device(rows, x.device)
        return x.index_select(0, rows_on[x.device])

    def opt(x: Tensor | None) -> Tensor | None:
        return None if x is None else tok(x)

    return TrainBatch(
        input_ids=tok(batch.input_ids),
        positions=tok(batch.positions),
        cu_seqlens=cu,
        loss_mask=tok(batch.loss_mask),
        rollout_logprobs=tok(batch.rollout_logprobs),
        advantages=tok(batch.advantages),
        rewards=batch.rewards[to_device(seq_index, batch.rewards.device)],
        response_lens=batch.response_lens[to_device(seq_index, batch.response_lens.device)],
        sample_indices=tuple(batch.sample_indices[i] for i in idx),
        returns=opt(batch.returns),
        routed_experts=opt(batch.routed_experts),
        weight_versions=tuple(batch.weight_versions[i] for i in idx) if batch.weight_versions else (),
        rollout_versions=opt(batch.rollout_versions),
    )


def shard_for_rank(batch: TrainBatch, rank: int, dp_size: int) -> TrainBatch:
    """This data-parallel rank's share of a global batch (token-balanced, :func:`balanced_partition`).

    Every rank calls it with the same global batch; together the shards hold every sequence once.
    """
    if not 0 <= rank < dp_size:
        raise ValueError(f"rank must be in [0, {dp_size}), got {rank}")
    return select_sequences(batch, balanced_partition(sequence_lengths(batch), dp_size)[rank])


def micro_batch_bins(
    batch: TrainBatch,
    *,
    micro_batch_size: int | None = None,
    max_tokens: int | None = None,
    min_bins: int = 1,
) -> list[list[int]]:
    """Sequence index lists of the micro-batches: token budget if ``max_tokens`` is set, else fixed size.

    ``min_bins`` (token-budget mode only) pads the split as :func:`token_budget_bins` does; the
    trainer also pads fixed-size splits, with empty bins, to the data-parallel maximum.
    """
    if max_tokens is not None:
        return token_budget_bins(sequence_lengths(batch), max_tokens, min_bins)
    if micro_batch_size is None:
        raise ValueError("set either micro_batch_size or max_tokens")
    return fixed_size_bins(batch.num_sequences, micro_batch_size)


def split_micro_batches(
    batch: TrainBatch, *, micro_batch_size: int | None = None, max_tokens: int | None = None
) -> list[TrainBatch]:
    """The micro-batches of ``batch`` as packed batches (see :func:`micro_batch_bins`)."""
    bins = micro_batch_bins(batch, micro_batch_size=micro_batch_size, max_tokens=max_tokens)
    return [select_sequences(batch, b) for b in bins if b]


def batch_to(batch: TrainBatch, device: torch.device) -> TrainBatch:
    """``batch`` with every tensor moved to ``device``."""
    moved: dict[str, Any] = {
        f.name: to_device(v, device)
        for f in dataclasses.fields(batch)
        if isinstance(v := getattr(batch, f.name), Tensor)
    }
    return dataclasses.replace(batch, **moved)
