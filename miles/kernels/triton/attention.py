"""Batch-invariant causal attention (Triton, CUDA) with a fixed key/value split size.

One kernel serves the trainer's packed forward, the engine's prefill, chunked prefill and
decode (one sequence at a time or straight from the paged cache). A program takes one tile of
:data:`BLOCK_Q` queries of one sequence and one head, and visits that sequence's keys in chunks
of :data:`BLOCK_KV` aligned to absolute positions ``0, C, 2C...``, always from chunk 0, with an
fp32 online softmax. A query's bits therefore depend only on its own row, its position and the
keys up to it: the chunks past its position that its tile still visits are exact no-ops for it
(every score ``-inf``: ``alpha = 1``, ``p = 0``), and the dot products are one fixed
tensor-core shape whatever the tile holds. Keys are addressed through a slot table (row ``j``
of sequence ``s`` of the flat K/V is ``slots[s, j]``), so a contiguous sequence and a paged cache
run the same arithmetic.

The backward (trainer only) recomputes through the reference kernels of
``miles.kernels.attention`` (exact gradients; only the forward is promised invariant).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from miles.kernels.attention import varlen_causal_attention as reference_varlen

BLOCK_Q = 64
BLOCK_KV = 64  # the fixed key/value split size


@triton.jit(do_not_specialize=["stride_slot"])
def _attention_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, pos_ptr, slot_ptr, tile_seq_ptr, tile_q0_ptr, tile_q1_ptr, scale,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh, stride_slot,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_KV: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    tile = tl.program_id(0)
    h = tl.program_id(1)
    kvh = h // GROUP
    seq = tl.load(tile_seq_ptr + tile)
    q0 = tl.load(tile_q0_ptr + tile)
    q1 = tl.load(tile_q1_ptr + tile)
    rows = q0 + tl.arange(0, BLOCK_Q)
    rmask = rows < q1
    d = tl.arange(0, BLOCK_D)
    dmask = d < HEAD_DIM
    # Rows past the tile sit at position 0 (they see key 0 only) and are never stored.
    pos = tl.load(pos_ptr + rows, mask=rmask, other=0)
    q = tl.load(q_ptr + rows[:, None] * stride_qt + h * stride_qh + d[None, :],
                mask=rmask[:, None] & dmask[None, :], other=0.0)  # fmt: skip
    max_pos = tl.max(pos, axis=0)
    m_i = tl.full([BLOCK_Q], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_Q], tl.float32)
    acc = tl.zeros([BLOCK_Q, BLOCK_D], tl.float32)
    for c in range(0, max_pos // BLOCK_KV + 1):
        kpos = c * BLOCK_KV + tl.arange(0, BLOCK_KV)
        kvalid = kpos <= max_pos
        slot = tl.load(slot_ptr + seq * stride_slot + kpos, mask=kvalid, other=0).to(tl.int64)
        kvmask = kvalid[:, None] & dmask[None, :]
        k = tl.load(k_ptr + slot[:, None] * stride_kt + kvh * stride_kh + d[None, :], mask=kvmask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
        s = tl.where(kpos[None, :] <= pos[:, None], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_ptr + slot[:, None] * stride_vt + kvh * stride_vh + d[None, :], mask=kvmask, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    out = acc / l_i[:, None]
    tl.store(o_ptr + rows[:, None] * stride_ot + h * stride_oh + d[None, :], out.to(o_ptr.dtype.element_ty),
             mask=rmask[:, None] & dmask[None, :])  # fmt: skip


def _launch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    positions: torch.Tensor,
    slots: torch.Tensor,
    tiles: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """``q [T, Hq, D]``; flat ``k``/``v`` ``[S, Hkv, D]``; ``positions`` int64 ``[T]``; ``slots``
    int ``[B, L]``; ``tiles`` int64 ``[3, n]`` (sequence, first row, end row) -> ``[T, Hq, D]``."""
    t, hq, d = q.shape
    hkv = k.shape[1]
    if hq % hkv:
        raise ValueError(f"query heads ({hq}) must be a multiple of key/value heads ({hkv})")
    if q.stride(2) != 1 or k.stride(2) != 1 or v.stride(2) != 1:
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    out = torch.empty_like(q)
    n_tiles = tiles.shape[1]
    if t == 0 or n_tiles == 0:
        return out
    _attention_kernel[(n_tiles, hq)](
        q, k, v, out, positions, slots, tiles[0], tiles[1], tiles[2], scale,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        out.stride(0), out.stride(1), slots.stride(0),
        GROUP=hq // hkv, HEAD_DIM=d, BLOCK_D=max(16, triton.next_power_of_2(d)),
        BLOCK_Q=BLOCK_Q, BLOCK_KV=BLOCK_KV, PRECISION="ieee" if q.dtype == torch.float32 else None,
        num_warps=4, num_stages=2,
    )  # fmt: skip
    return out


def _tiles(query_lens: Sequence[int], device: torch.device) -> tuple[torch.Tensor, list[int]]:
    """Tiles of at most ``BLOCK_Q`` rows that never straddle two sequences: int64 ``[3, n]``."""
    seq, first, end = [], [], []
    start = 0
    for i, n in enumerate(query_lens):
        for r in range(start, start + n, BLOCK_Q):
            seq.append(i)
            first.append(r)
            end.append(start + n)
        start += n
    return torch.tensor([seq, first, end], dtype=torch.int64).to(device, non_blocking=True), first


def _reference_masked(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, scale: float
) -> torch.Tensor:
    """Differentiable attention of ``q`` at ``positions`` over keys ``0..Tk-1`` (SDPA)."""
    hq, hkv = q.shape[1], k.shape[1]
    if hq != hkv:
        k = k.repeat_interleave(hq // hkv, dim=1)
        v = v.repeat_interleave(hq // hkv, dim=1)
    mask = torch.arange(k.shape[0], device=q.device)[None, :] <= positions[:, None]
    out = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                         attn_mask=mask, scale=scale)  # fmt: skip
    return out.transpose(0, 1)


class _Attention(torch.autograd.Function):
    """Forward: the invariant kernel. Backward: autograd through ``reference(q, k, v)``."""

    @staticmethod
    def forward(ctx, q, k, v, forward_fn, reference_fn):
        ctx.save_for_backward(q, k, v)
        ctx.reference_fn = reference_fn
        return forward_fn(q, k, v)

    @staticmethod
    def backward(ctx, grad):
        q, k, v = (t.detach().requires_grad_(True) for t in ctx.saved_tensors)
        with torch.enable_grad():
            out = ctx.reference_fn(q, k, v)
        gq, gk, gv = torch.autograd.grad(out, (q, k, v), grad)
        return gq, gk, gv, None, None


_Fn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def _apply(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, forward_fn: _Fn, reference_fn: _Fn
) -> torch.Tensor:
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        out: torch.Tensor = _Attention.apply(q, k, v, forward_fn, reference_fn)
        return out
    return forward_fn(q, k, v)


def causal_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_positions: torch.Tensor, scale: float
) -> torch.Tensor:
    """Same contract as :func:`miles.kernels.batch_invariant.causal_attention` (one sequence:
    ``q [Tq, Hq, D]`` at ``q_positions`` over ``k``/``v`` ``[Tk, Hkv, D]``)."""
    tq, tk = q.shape[0], k.shape[0]
    positions = q_positions.to(device=q.device, dtype=torch.int64)
    first = torch.arange(0, tq, BLOCK_Q, device=q.device)
    tiles = torch.stack([torch.zeros_like(first), first, torch.full_like(first, tq)])
    slots = torch.arange(tk, device=q.device, dtype=torch.int32)[None]
    return _apply(q, k, v, lambda q_, k_, v_: _launch(q_, k_, v_, positions, slots, tiles, scale),
                  lambda q_, k_, v_: _reference_masked(q_, k_, v_, positions, scale))  # fmt: skip


def varlen_causal_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, scale: float
) -> torch.Tensor:
    """The trainer's packed causal attention in one launch (shapes of
    :func:`miles.kernels.attention.varlen_causal_attention`)."""
    bounds = [int(b) for b in cu_seqlens.tolist()]
    lens = [e - s for s, e in itertools.pairwise(bounds)]
    tiles, _ = _tiles(lens, q.device)
    positions = torch.cat([torch.arange(n, dtype=torch.int64) for n in lens]).to(q.device, non_blocking=True)
    cu = cu_seqlens.to(device=q.device, dtype=torch.int32)
    slots = cu[:-1, None] + torch.arange(max(lens, default=0), device=q.device, dtype=torch.int32)[None]
    return _apply(q, k, v, lambda q_, k_, v_: _launch(q_, k_, v_, positions, slots, tiles, scale),
                  lambda q_, k_, v_: reference_varlen(q_, k_, v_, cu_seqlens, scale))  # fmt: skip


@torch.no_grad()
def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_lens: Sequence[int],
    seq_lens: Sequence[int],
    scale: float,
) -> torch.Tensor:
    """The engine's attention straight from the paged cache, all sequences in one launch.

    ``q [T, Hq, D]`` holds, in order, the ``query_lens[i]`` new tokens of sequence ``i`` (already
    stored); ``k_cache``/``v_cache`` ``[num_blocks, block_size, Hkv, D]``; ``block_tables`` int
    ``[B, W]``; sequence ``i`` has ``seq_lens[i]`` cached tokens, the new ones last. Bitwise equal
    to :func:`causal_attention` over each sequence's gathered keys.
    """
    _, bs, hkv, d = k_cache.shape
    tiles, _ = _tiles(query_lens, q.device)
    positions = torch.cat([torch.arange(s - n, s, dtype=torch.int64) for n, s in zip(query_lens, seq_lens)])
    positions = positions.to(q.device, non_blocking=True)
    tables = block_tables.to(device=q.device, dtype=torch.int32)
    slots = (tables[:, :, None] * bs + torch.arange(bs, device=q.device, dtype=torch.int32)).reshape(
        tables.shape[0], -1
    )
    return _launch(q, k_cache.view(-1, hkv, d), v_cache.view(-1, hkv, d), positions, slots, tiles, scale)


__all__ = ["BLOCK_KV", "BLOCK_Q", "causal_attention", "paged_attention", "varlen_causal_attention"]
