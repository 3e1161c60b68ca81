"""Reference attention kernels (pure torch; run anywhere, used as the ground truth).

Fast CUDA kernels and batch-invariant variants live beside this file and keep the same
signatures, so the model code never changes when the kernel does.
"""

from __future__ import annotations

import functools
import itertools

import torch
import torch.nn.functional as F


def varlen_causal_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, scale: float
) -> torch.Tensor:
    """Causal self-attention over packed sequences.

    Shapes: ``q`` ``[T, Hq, D]``, ``k``/``v`` ``[T, Hkv, D]`` with ``Hq % Hkv == 0`` (GQA);
    ``cu_seqlens`` int ``[B + 1]``. Tokens attend only within their own sequence. Returns
    ``[T, Hq, D]``.
    """
    out = torch.empty_like(q)
    bounds = cu_seqlens.tolist()
    for start, end in itertools.pairwise(bounds):
        if end > start:
            out[start:end] = _causal_block(q[start:end], k[start:end], v[start:end], scale, causal_offset=0)
    return out


def padded_varlen_plan(bounds: list[int], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Index tensors of :func:`padded_varlen_causal_attention` for sequence ``bounds`` (the host
    copy of ``cu_seqlens``): ``gather`` int64 ``[B, L]`` (the packed row of each padded position;
    a sequence's padding repeats its last token) and ``valid`` int64 ``[T]`` (the padded row of
    each packed token, in order). Built once per forward, shared by every layer."""
    spans = [(a, b - a) for a, b in itertools.pairwise(bounds) if b > a]  # empty sequences: no row
    starts = torch.tensor([a for a, _ in spans] or [0], dtype=torch.long)
    lens = torch.tensor([n for _, n in spans] or [0], dtype=torch.long)
    width = max(1, int(lens.max()))
    col = torch.arange(width)[None, :]
    gather = starts[:, None] + torch.minimum(col, (lens[:, None] - 1).clamp(min=0))
    valid = (torch.arange(len(lens))[:, None] * width + col)[col < lens[:, None]]
    return gather.to(device), valid.to(device)


def padded_varlen_causal_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    plan: tuple[torch.Tensor, torch.Tensor],
    scale: float,
) -> torch.Tensor:
    """:func:`varlen_causal_attention` as one causal SDPA call over the sequences padded to the
    longest (the flash kernel on CUDA, with GQA). Padding sits after each sequence's tokens, so
    causality keeps it out of every real query's view; padded rows are dropped. Differentiable
    (gathers and SDPA). ``plan`` from :func:`padded_varlen_plan`. Equal to the reference up to
    summation order."""
    gather, valid = plan
    b, width = gather.shape
    hq, hkv, d = q.shape[1], k.shape[1], q.shape[2]
    qp = q[gather].transpose(1, 2)  # [B, Hq, L, D]
    kp = k[gather].transpose(1, 2)
    vp = v[gather].transpose(1, 2)
    out = F.scaled_dot_product_attention(qp, kp, vp, is_causal=True, scale=scale, enable_gqa=hq != hkv)
    return out.transpose(1, 2).reshape(b * width, hq, d)[valid]


_flash_failed: list[str] = []  # why the varlen flash kernel was given up (empty: in use)


def flash_varlen_supported(q: torch.Tensor, k: torch.Tensor) -> bool:
    """Whether :func:`flash_varlen_causal_attention` takes these inputs (``q`` ``[T, Hq, D]``,
    ``k`` ``[T, Hkv, D]``): see :func:`flash_varlen_supports`."""
    return flash_varlen_supports(q.device, q.dtype, q.shape[1], k.shape[1], q.shape[-1])


def flash_varlen_supports(
    device: torch.device, dtype: torch.dtype, num_heads: int, num_kv_heads: int, head_dim: int
) -> bool:
    """CUDA on an Ampere or newer GPU, fp16/bf16, a head size that is a multiple of 8 up to 256,
    query heads a multiple of the key heads, and the kernel not given up after an error."""
    return (
        device.type == "cuda"
        and dtype in (torch.float16, torch.bfloat16)
        and head_dim % 8 == 0
        and head_dim <= 256
        and num_heads % num_kv_heads == 0
        and not _flash_failed
        and _capability(device.index)[0] >= 8
    )


@functools.cache
def _capability(index: int | None) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def disable_flash_varlen(reason: str) -> None:
    """Stop using the varlen flash kernel in this process (it raised: ``reason``)."""
    _flash_failed.append(reason)


def flash_varlen_causal_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, max_len: int, scale: float
) -> torch.Tensor:
    """:func:`varlen_causal_attention` by torch's bundled FlashAttention-2 varlen kernel (the op
    behind nested-tensor SDPA, with its backward): the packed tokens as they are, GQA natively,
    no padding, no gathers, and nothing built per shape (the padded SDPA call went to cuDNN,
    which built a costly plan for every new ``[B, L]``, and an RL step's micro-batches are all
    new shapes; the cost: docs/performance.md, "Trainer"). ``max_len``: the longest sequence (a
    host int). Check :func:`flash_varlen_supported` first. Equal to the reference up to summation order."""
    cu = cu_seqlens.to(device=q.device, dtype=torch.int32)
    out = torch.ops.aten._flash_attention_forward(
        q.contiguous(),
        k.contiguous(),
        v.contiguous(),
        cu,
        cu,
        max_len,
        max_len,
        0.0,
        True,
        False,
        scale=scale,
    )[0]
    return out


def prefix_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Attention of ``Tq`` new tokens over ``Tk >= Tq`` keys whose last ``Tq`` are the new ones.

    The cached-decode case: ``q`` ``[Tq, Hq, D]``, ``k``/``v`` ``[Tk, Hkv, D]`` for one sequence;
    query ``i`` sees keys ``[0, Tk - Tq + i]``.
    """
    return _causal_block(q, k, v, scale, causal_offset=k.shape[0] - q.shape[0])


def _causal_block(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, causal_offset: int
) -> torch.Tensor:
    tq, hq, _ = q.shape
    tk, hkv, _ = k.shape
    if hq != hkv:
        k = k.repeat_interleave(hq // hkv, dim=1)
        v = v.repeat_interleave(hq // hkv, dim=1)
    qh, kh, vh = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)
    if causal_offset == 0 and tq == tk:
        out = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=scale)
    else:
        rows = torch.arange(tq, device=q.device)[:, None] + causal_offset
        mask = torch.arange(tk, device=q.device)[None, :] <= rows
        out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=scale)
    return out.transpose(0, 1)
