"""Paged decode attention (Triton, CUDA): one new token per sequence, keys read in place.

The engine's default (non-invariant) decode path. The cache of one layer is
``[num_blocks, page, Hkv, D]``; sequence ``b`` has ``seq_lens[b]`` tokens, its token ``j`` at block
``block_tables[b, j // page]``, offset ``j % page``. Nothing is gathered: a program reads its
sequence's keys and values straight from their pages.

A program handles one sequence, one key/value head and one *split* of the sequence: the
:data:`GROUP` query heads that share the key/value head are one ``[GROUP_PAD, D]`` tile (a
tensor-core dot even under GQA), and the keys are visited in chunks of ``BLOCK_N`` with an fp32
online softmax. With few sequences (batch-1 decode) one program per head would leave most SMs
idle, so the keys are cut into ``splits`` ranges computed in parallel and merged by
:func:`paged_decode_attention` (flash-decoding). Lengths are read from ``seq_lens`` on the device
and the grid depends only on the batch size, so a CUDA graph captured once per batch size
serves every step.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

BLOCK_N = 64


@triton.jit(do_not_specialize=["stride_tb"])
def _paged_decode_kernel(
    q_ptr, k_ptr, v_ptr, table_ptr, seqlen_ptr, m_ptr, l_ptr, acc_ptr, scale,
    stride_qb, stride_qh, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh, stride_tb,
    HQ: tl.constexpr, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr, PAGE: tl.constexpr, BLOCK_N: tl.constexpr, SPLITS: tl.constexpr,
    PRECISION: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seqlen_ptr + b)
    per_split = tl.cdiv(tl.cdiv(seq_len, SPLITS), BLOCK_N) * BLOCK_N
    start = split * per_split
    end = tl.minimum(start + per_split, seq_len)
    g = tl.arange(0, GROUP_PAD)
    gmask = g < GROUP
    d = tl.arange(0, BLOCK_D)
    dmask = d < HEAD_DIM
    heads = kvh * GROUP + g
    q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + d[None, :],
                mask=gmask[:, None] & dmask[None, :], other=0.0)  # fmt: skip
    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, BLOCK_D], tl.float32)
    for s in range(start, end, BLOCK_N):
        j = s + tl.arange(0, BLOCK_N)
        jmask = j < end
        page = tl.load(table_ptr + b * stride_tb + j // PAGE, mask=jmask, other=0).to(tl.int64)
        off = j % PAGE
        kvmask = jmask[:, None] & dmask[None, :]
        k = tl.load(k_ptr + page[:, None] * stride_kb + off[:, None] * stride_kt + kvh * stride_kh + d[None, :],
                    mask=kvmask, other=0.0).to(q.dtype)  # fmt: skip
        sc = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
        sc = tl.where(jmask[None, :], sc, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(sc, axis=1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(sc - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_ptr + page[:, None] * stride_vb + off[:, None] * stride_vt + kvh * stride_vh + d[None, :],
                    mask=kvmask, other=0.0).to(q.dtype)  # fmt: skip
        acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v, input_precision=PRECISION)
        m_i = m_new
    # Partials [B, SPLITS, HQ] (m, l) and [B, SPLITS, HQ, D] (acc); an empty split keeps
    # m = -inf, l = 0, acc = 0 and weighs nothing in the merge.
    row = (b * SPLITS + split) * HQ + heads
    tl.store(m_ptr + row, m_i, mask=gmask)
    tl.store(l_ptr + row, l_i, mask=gmask)
    tl.store(acc_ptr + row[:, None] * HEAD_DIM + d[None, :], acc, mask=gmask[:, None] & dmask[None, :])


@functools.cache
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def num_splits(batch: int, kv_heads: int, device: torch.device) -> int:
    """Key splits per sequence so that ``batch * kv_heads * splits`` fills the GPU about twice: a
    power of two up to 16 (each value is a separate compilation of the kernel)."""
    want = -(-2 * _sm_count(device) // max(1, batch * kv_heads))
    return min(16, 1 << max(0, want - 1).bit_length())


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    splits: int | None = None,
) -> torch.Tensor:
    """``q`` ``[B, Hq, D]`` (the new token of each sequence, its K/V already stored); caches
    ``[num_blocks, page, Hkv, D]``; ``block_tables`` int ``[B, W]``; ``seq_lens`` int ``[B]`` (>= 1,
    counting the new token) -> ``[B, Hq, D]`` in ``q``'s dtype. Query ``b`` sees all
    ``seq_lens[b]`` cached tokens of its sequence."""
    bsz, hq, d = q.shape
    _, page, hkv, _ = k_cache.shape
    if hq % hkv:
        raise ValueError(f"query heads ({hq}) must be a multiple of key/value heads ({hkv})")
    if block_tables.shape[0] != bsz or seq_lens.shape != (bsz,):
        raise ValueError(
            f"block_tables {tuple(block_tables.shape)} / seq_lens {tuple(seq_lens.shape)} vs {bsz} queries"
        )
    if q.stride(2) != 1:
        q = q.contiguous()
    if block_tables.stride(1) != 1:
        block_tables = block_tables.contiguous()
    splits = splits or num_splits(bsz, hkv, q.device)
    m = torch.empty((bsz, splits, hq), dtype=torch.float32, device=q.device)
    lse = torch.empty_like(m)
    acc = torch.empty((bsz, splits, hq, d), dtype=torch.float32, device=q.device)
    group = hq // hkv
    _paged_decode_kernel[(bsz, hkv, splits)](
        q, k_cache, v_cache, block_tables, seq_lens, m, lse, acc, scale,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), block_tables.stride(0),
        HQ=hq, GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), HEAD_DIM=d,
        BLOCK_D=max(16, triton.next_power_of_2(d)), PAGE=page, BLOCK_N=BLOCK_N, SPLITS=splits,
        PRECISION="ieee" if q.dtype == torch.float32 else None,
        num_warps=4, num_stages=2,
    )  # fmt: skip
    if splits == 1:
        return (acc[:, 0] / lse[:, 0, :, None]).to(q.dtype)
    top = m.amax(dim=1, keepdim=True)
    w = torch.exp(m - top)  # [B, S, Hq]; 0 for empty splits
    out = (acc * w[..., None]).sum(dim=1) / (lse * w).sum(dim=1)[..., None]
    return out.to(q.dtype)
