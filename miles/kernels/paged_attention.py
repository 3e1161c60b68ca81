"""Paged-attention kernels (pure torch; CPU and CUDA).

The cache of one layer is ``k_cache``/``v_cache`` ``[num_blocks, block_size, Hkv, D]``. A token
at slot ``s`` lives at block ``s // block_size``, offset ``s % block_size``. A sequence's keys are
the concatenation of its blocks (its block table), truncated to its length.

Two implementations with the same semantics:

- ``paged_prefix_attention``: the reference. It loops over sequences, gathers each one's blocks
  into a contiguous tensor and calls the reference attention. Simple and exact, not fast.
- ``plan_paged_attention`` + ``batched_paged_attention``: the engine's path. The plan (index
  tensors and masks) is built once per forward from the block tables and lengths and reused by
  every layer. Each layer then does one gather of all sequences' K/V into a padded
  ``[b, Lk, Hkv, D]`` tensor per chunk of similar-length sequences and one
  ``scaled_dot_product_attention`` call with ``enable_gqa`` and a padding/causal mask, instead
  of a Python loop with ``repeat_interleave`` per sequence.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from miles.kernels.attention import prefix_causal_attention
from miles.kernels.triton_loader import triton_module

# With a ratio r > 0 a new chunk starts when a sequence is shorter than r times the chunk's
# longest, trading padding for more (smaller) SDPA calls. On a CPU decode batch of mixed lengths
# the extra calls cost more than the padding they saved (docs/performance.md), so the default is
# one chunk and only ``max_chunk_elements`` splits.
DEFAULT_BUCKET_RATIO = 0.0
# Upper bound on the padded ``b * Lq * Lk`` score elements of one chunk (per head), so a large
# batch of long sequences is split instead of materialising one huge padded tensor.
DEFAULT_MAX_CHUNK_ELEMENTS = 1 << 24


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
    """Causal attention of each sequence's new tokens over its whole cached sequence (reference).

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


@dataclass(frozen=True)
class AttentionChunk:
    """Index tensors for a group of ``b`` sequences attended in one padded SDPA call.

    Queries are padded to ``lq`` and keys to ``lk`` per sequence. Padding positions repeat the
    sequence's last real query/key (never an unwritten slot, whose contents might not be finite:
    a masked ``NaN`` key would still poison the softmax).
    """

    b: int
    lq: int
    lk: int
    # int64 ``[b * lq]``: the row of ``q`` for each padded query; ``None``: ``q`` itself is the
    # padded query tensor (one token per sequence, whole batch, batch order).
    q_index: torch.Tensor | None
    # int64 ``[b, lk]``: the flat cache slot of each padded key.
    kv_slots: torch.Tensor
    # bool ``[b, 1, lq, lk]`` (True = attend), or ``None`` when no key is masked.
    mask: torch.Tensor | None
    # int64 ``[n]``: the padded rows ``[b * lq]`` that are real tokens; ``None``: all of them.
    valid_rows: torch.Tensor | None
    # int64 ``[n]``: the output row of each real token; ``None``: the chunk is the whole output.
    token_index: torch.Tensor | None


@dataclass(frozen=True)
class PagedAttentionPlan:
    """Everything ``batched_paged_attention`` needs beyond ``q`` and the cache, for one forward."""

    num_tokens: int
    chunks: tuple[AttentionChunk, ...]
    # Gather buffers per chunk, allocated by the first layer and reused by the others: a fresh
    # multi-megabyte tensor per layer costs page faults (large allocations are mmapped on CPU)
    # that were as expensive as the copy itself.
    workspace: dict[tuple[int, str], torch.Tensor] = field(default_factory=dict, compare=False)


def _bucket(
    order: list[int], lens: Sequence[int], lq: Sequence[int], ratio: float, max_elements: int
) -> list[list[int]]:
    """Split ``order`` (sorted by decreasing ``lens``) into runs of similar length."""
    groups: list[list[int]] = []
    cur: list[int] = []
    for i in order:
        if cur:
            head = cur[0]
            padded = (len(cur) + 1) * lq[head] * lens[head]
            if lens[i] < ratio * lens[head] or padded > max_elements:
                groups.append(cur)
                cur = []
        cur.append(i)
    if cur:
        groups.append(cur)
    return groups


def plan_paged_attention(
    block_tables: torch.Tensor,
    query_lens: Sequence[int],
    seq_lens: Sequence[int],
    block_size: int,
    *,
    bucket_ratio: float = DEFAULT_BUCKET_RATIO,
    max_chunk_elements: int = DEFAULT_MAX_CHUNK_ELEMENTS,
) -> PagedAttentionPlan:
    """Build the per-forward plan for ``batched_paged_attention``.

    ``block_tables`` int64 ``[B, W]`` on the cache's device: row ``i`` starts with sequence
    ``i``'s blocks (the rest is padding, never read). Sequence ``i`` feeds ``query_lens[i] >= 1``
    new tokens and has ``seq_lens[i] >= query_lens[i]`` tokens in the cache once they are
    stored; the forward's tokens are the sequences' new tokens, in order. ``bucket_ratio`` in
    ``[0, 1]``: 0 puts every sequence in one chunk (unless ``max_chunk_elements`` splits it).
    """
    if not seq_lens:
        raise ValueError("cannot plan attention for an empty batch")
    if len(query_lens) != len(seq_lens) or block_tables.shape[0] != len(seq_lens):
        raise ValueError(
            f"{block_tables.shape[0]} block tables, {len(query_lens)} query_lens, {len(seq_lens)} seq_lens"
        )
    for n, s in zip(query_lens, seq_lens):
        if not 1 <= n <= s or -(-s // block_size) > block_tables.shape[1]:
            raise ValueError(
                f"bad lengths: query_len {n}, seq_len {s}, {block_tables.shape[1]} table columns"
            )
    device = block_tables.device
    num_tokens = sum(query_lens)
    starts = [0] * len(query_lens)
    for i in range(1, len(query_lens)):
        starts[i] = starts[i - 1] + query_lens[i - 1]
    order = sorted(range(len(seq_lens)), key=lambda i: (seq_lens[i], query_lens[i]), reverse=True)
    groups = _bucket(order, seq_lens, query_lens, bucket_ratio, max_chunk_elements)
    if len(groups) == 1:
        groups = [list(range(len(seq_lens)))]  # one chunk: keep batch order, no output scatter
    chunks = []
    for idx in groups:
        ql = [query_lens[i] for i in idx]
        sl = [seq_lens[i] for i in idx]
        st = [starts[i] for i in idx]
        b, lq, lk = len(idx), max(ql), max(sl)
        whole = len(groups) == 1
        # Small index arithmetic runs on the host; the results move to the device once per forward.
        ql_t, sl_t, st_t = (torch.tensor(x, dtype=torch.long) for x in (ql, sl, st))
        ic = torch.minimum(torch.arange(lq)[None, :], ql_t[:, None] - 1)  # [b, lq]
        jc = torch.minimum(torch.arange(lk)[None, :], sl_t[:, None] - 1)  # [b, lk]
        rows = torch.tensor(idx, dtype=torch.long, device=device)
        tables = block_tables.index_select(0, rows)
        jc_dev = jc.to(device)
        kv_slots = tables.gather(1, jc_dev // block_size) * block_size + jc_dev % block_size
        # Key j is visible to padded query i iff j <= seq_len - query_len + i (clamped i).
        last = (sl_t - ql_t)[:, None] + ic  # [b, lq]
        mask: torch.Tensor | None = None
        if not (lq == 1 and all(s == lk for s in sl)):
            mask = (torch.arange(lk)[None, None, :] <= last[:, :, None]).unsqueeze(1).to(device)
        q_index: torch.Tensor | None = None
        if not (whole and lq == 1):
            q_index = (st_t[:, None] + ic).reshape(-1).to(device)
        valid_rows: torch.Tensor | None = None
        if any(n != lq for n in ql):
            valid = torch.arange(lq)[None, :] < ql_t[:, None]
            valid_rows = valid.reshape(-1).nonzero().squeeze(1).to(device)
        token_index: torch.Tensor | None = None
        if not whole:
            token_index = (st_t[:, None] + torch.arange(lq)[None, :])[
                torch.arange(lq)[None, :] < ql_t[:, None]
            ]
            token_index = token_index.to(device)
        chunks.append(AttentionChunk(b, lq, lk, q_index, kv_slots, mask, valid_rows, token_index))
    return PagedAttentionPlan(num_tokens, tuple(chunks))


def batched_paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    plan: PagedAttentionPlan,
    scale: float,
) -> torch.Tensor:
    """``paged_prefix_attention``'s result, computed chunk by chunk from a precomputed plan.

    ``q`` ``[T, Hq, D]`` with ``T == plan.num_tokens``; the new tokens' K/V must already be
    stored. Returns ``[T, Hq, D]``. Equal to the reference up to floating-point summation order.
    """
    t, hq, d = q.shape
    if t != plan.num_tokens:
        raise ValueError(f"q has {t} tokens but the plan has {plan.num_tokens}")
    _, _, hkv, _ = k_cache.shape
    flat_k, flat_v = k_cache.view(-1, hkv, d), v_cache.view(-1, hkv, d)
    out: torch.Tensor | None = None
    for n, c in enumerate(plan.chunks):
        qc = q if c.q_index is None else q.index_select(0, c.q_index)
        qc = qc.view(c.b, c.lq, hq, d).transpose(1, 2)
        slots = c.kv_slots.view(-1)
        kc = _gather(flat_k, slots, plan.workspace, (n, "k")).view(c.b, c.lk, hkv, d).transpose(1, 2)
        vc = _gather(flat_v, slots, plan.workspace, (n, "v")).view(c.b, c.lk, hkv, d).transpose(1, 2)
        kc, vc = kc.to(q.dtype), vc.to(q.dtype)
        oc = F.scaled_dot_product_attention(qc, kc, vc, attn_mask=c.mask, scale=scale, enable_gqa=hq != hkv)
        oc = oc.transpose(1, 2).reshape(c.b * c.lq, hq, d)
        if c.valid_rows is not None:
            oc = oc.index_select(0, c.valid_rows)
        if c.token_index is None:
            return oc
        if out is None:
            out = torch.empty_like(q)
        out.index_copy_(0, c.token_index, oc)
    assert out is not None, "a plan has at least one chunk"
    return out


def _gather(
    flat: torch.Tensor,
    slots: torch.Tensor,
    workspace: dict[tuple[int, str], torch.Tensor],
    key: tuple[int, str],
) -> torch.Tensor:
    """``flat[slots]`` written into the plan's reusable buffer for ``key``."""
    buf = workspace.get(key)
    shape = (slots.shape[0], *flat.shape[1:])
    if buf is None or buf.shape != shape or buf.dtype != flat.dtype or buf.device != flat.device:
        buf = torch.empty(shape, dtype=flat.dtype, device=flat.device)
        workspace[key] = buf
    return torch.index_select(flat, 0, slots, out=buf)


def paged_decode_reference(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """One new token per sequence over its paged cache, from device tensors only (no host sync:
    capturable in a CUDA graph). ``q`` ``[B, Hq, D]``; ``block_tables`` int ``[B, W]``;
    ``seq_lens`` int ``[B]`` (>= 1, counting the new token, whose K/V are stored) -> ``[B, Hq, D]``.
    Gathers all ``W`` blocks of every row and masks past ``seq_lens``: the reference (and the
    fallback without Triton), not the fast path."""
    b, hq, d = q.shape
    _, page, hkv, _ = k_cache.shape
    width = block_tables.shape[1] * page
    k = k_cache[block_tables.long()].reshape(b, width, hkv, d).transpose(1, 2).to(q.dtype)
    v = v_cache[block_tables.long()].reshape(b, width, hkv, d).transpose(1, 2).to(q.dtype)
    mask = (torch.arange(width, device=q.device)[None, :] < seq_lens[:, None].long())[:, None, None, :]
    out = F.scaled_dot_product_attention(
        q[:, :, None, :], k, v, attn_mask=mask, scale=scale, enable_gqa=hq != hkv
    )
    return out[:, :, 0, :]


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """:func:`paged_decode_reference`'s result; on CUDA with Triton, the kernel of
    ``miles.kernels.triton.paged_decode`` that reads the pages in place (flash-decoding splits)."""
    kernels = triton_module("paged_decode", "MILES_DECODE_KERNEL") if q.is_cuda else None
    if kernels is not None:
        out: torch.Tensor = kernels.paged_decode_attention(q, k_cache, v_cache, block_tables, seq_lens, scale)
        return out
    return paged_decode_reference(q, k_cache, v_cache, block_tables, seq_lens, scale)
