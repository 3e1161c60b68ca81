"""Softmax statistics of a block of LM-head logits in one read (Triton, CUDA).

The trainer's chunked log-probs need, per row of ``x = z / temperature`` (``z`` a ``[C, V]``
block of logits): ``max m``, ``sum exp(x - m)`` and ``sum exp(x - m) * x`` (the entropy). As one
compiled reduction per row, inductor gave each row one program walking the whole vocabulary,
a large part of a Qwen3-0.6B step on an H100 (docs/performance.md, "Trainer"). Here
every row is split over column blocks, each program keeps an online (rescaled) max and sums over
its block, and a few ``[C, blocks]`` torch ops merge the partials: one read of ``z``, the whole GPU busy.

The values equal :func:`miles.algo.logprobs.slice_stats`'s up to summation order (``x`` is
computed the same way: the logit upcast to fp32, then divided by the temperature).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_BLOCK = 2048  # columns per inner iteration
_ITERS = 4  # inner iterations per program: a program covers _BLOCK * _ITERS columns


@triton.jit
def _partials_kernel(
    z_ptr, stride_z, m_ptr, s_ptr, sx_ptr, n_cols, n_blocks, temperature,
    BLOCK: tl.constexpr, ITERS: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    blk = tl.program_id(1)
    offs = tl.arange(0, BLOCK)
    m = tl.full((BLOCK,), float("-inf"), tl.float32)
    s = tl.zeros((BLOCK,), tl.float32)
    sx = tl.zeros((BLOCK,), tl.float32)
    start = blk * BLOCK * ITERS
    for i in range(ITERS):
        cols = start + i * BLOCK + offs
        mask = cols < n_cols
        x = tl.load(z_ptr + row * stride_z + cols, mask=mask, other=float("-inf")).to(tl.float32)
        x = x / temperature
        m_new = tl.maximum(m, x)
        # Lanes that have seen only padding keep m = -inf: scale them by 0, not exp(nan).
        scale = tl.where(m_new == float("-inf"), 0.0, tl.exp(m - m_new))
        e = tl.where(mask, tl.exp(x - m_new), 0.0)
        s = s * scale + e
        sx = sx * scale + tl.where(mask, e * x, 0.0)
        m = m_new
    bm = tl.max(m, axis=0)
    w = tl.where(m == float("-inf"), 0.0, tl.exp(m - bm))
    out = row * n_blocks + blk
    tl.store(m_ptr + out, bm)
    tl.store(s_ptr + out, tl.sum(s * w, axis=0))
    tl.store(sx_ptr + out, tl.sum(sx * w, axis=0))


def softmax_stats(z: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per row of ``x = z.float() / temperature`` (``z`` ``[C, V]``, fp16/bf16/fp32, rows
    contiguous): ``(max m, sum exp(x - m), sum exp(x - m) * x)``, each fp32 ``[C]``."""
    if z.dim() != 2 or z.stride(1) != 1:
        z = z.reshape(-1, z.shape[-1]).contiguous()
    rows, cols = z.shape
    n_blocks = triton.cdiv(cols, _BLOCK * _ITERS)
    m = torch.empty((rows, n_blocks), dtype=torch.float32, device=z.device)
    s, sx = torch.empty_like(m), torch.empty_like(m)
    if rows and cols:
        _partials_kernel[(rows, n_blocks)](
            z, z.stride(0), m, s, sx, cols, n_blocks, float(temperature), BLOCK=_BLOCK, ITERS=_ITERS, num_warps=8
        )  # fmt: skip
    top = m.amax(dim=1)
    w = torch.exp(m - top[:, None])
    return top, (s * w).sum(dim=1), (sx * w).sum(dim=1)
