"""Reference paged-attention kernels (pure torch; CPU and CUDA).

The cache of one layer is ``k_cache``/``v_cache`` ``[num_blocks, block_size, Hkv, D]``. A token
at slot ``s`` lives at block ``s // block_size``, offset ``s % block_size``. A sequence's keys are
the concatenation of its blocks (its block table), truncated to its length.

These loop over sequences and gather each one's blocks into a contiguous tensor before calling
the reference attention: simple and exact, not fast. A fused kernel keeps the same signatures.
"""

from __future__ import annotations

import torch

from miles.kernels.attention import prefix_causal_attention


def store_kv(
    k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Write ``k``/``v`` ``[T, Hkv, D]`` into the flat slots ``slot_mapping`` (int64 ``[T]``)."""
    if slot_mapping.shape != (k.shape[0],):
        raise ValueError(f"slot_mapping must be [{k.shape[0]}], got {tuple(slot_mapping.shape)}")
    _, _, hkv, d = k_cache.shape
    k_cache.view(-1, hkv, d).index_copy_(0, slot_mapping, k.to(k_cache.dtype))
    v_cache.view(-1, hkv, d).index_copy_(0, slot_mapping, v.to(v_cache.dtype))


def gather_kv(cache: torch.Tensor, block_table: torch.Tensor, seq_len: int) -> torch.Tensor:
    """The first ``seq_len`` cached vectors ``[seq_len, Hkv, D]`` of one sequence."""
    _, block_size, hkv, d = cache.shape
    num_blocks = -(-seq_len // block_size)
    return cache[block_table[:num_blocks]].reshape(-1, hkv, d)[:seq_len]


def paged_prefix_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: list[torch.Tensor],
    query_lens: list[int],
    seq_lens: list[int],
    scale: float,
) -> torch.Tensor:
    """Causal attention of each sequence's new tokens over its whole cached sequence.

    ``q`` ``[T, Hq, D]`` holds, in order, the ``query_lens[i]`` new tokens of sequence ``i``;
    their K/V must already be stored. Sequence ``i`` has ``seq_lens[i] >= query_lens[i]`` tokens
    in the cache, the new ones last; its block table is ``block_tables[i]`` (int64). New token
    ``j`` of sequence ``i`` sees cached tokens ``[0, seq_lens[i] - query_lens[i] + j]``.
    Returns ``[T, Hq, D]``.
    """
    if sum(query_lens) != q.shape[0]:
        raise ValueError(f"query_lens sum to {sum(query_lens)} but q has {q.shape[0]} tokens")
    out = torch.empty_like(q)
    start = 0
    for table, n, seq_len in zip(block_tables, query_lens, seq_lens):
        if n == 0:
            continue
        ks = gather_kv(k_cache, table, seq_len).to(q.dtype)
        vs = gather_kv(v_cache, table, seq_len).to(q.dtype)
        out[start : start + n] = prefix_causal_attention(q[start : start + n], ks, vs, scale)
        start += n
    return out
