"""Fused inference kernels (Triton, CUDA): RMSNorm, rotary embedding and SwiGLU's
``silu(gate) * up`` in one launch each.

A decode step of a 0.6B model ran dozens of small kernels per layer (docs/performance.md), each
a few microseconds on a batch of a few hundred tokens even inside a CUDA graph; RMSNorm alone
was seven (upcast, square, mean, add, rsqrt, multiply, downcast, weight) and the rotary
embedding five per tensor. These two kernels do the same arithmetic in one pass each:

- :func:`rms_norm` computes in fp32 and rounds as ``miles.models.layers.RMSNorm`` does (the
  normalised row to the input dtype, then the weight product in that dtype). Its sum of squares
  is one tree reduction, so it may differ from torch's in the last bit.
- :func:`rotary` rounds every product and the sum to the input dtype as
  ``miles.models.rope.apply_rotary``'s tensor ops do; some bf16 elements may still differ from
  theirs in the last bit (``tests/kernels/test_fused.py``).

Forward only: the engine's model uses them (``miles.models.layers.use_inference_kernels``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(x_ptr, w_ptr, y_ptr, stride_xt, stride_xh, heads, stride_y, n, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n
    x_row = x_ptr + (row // heads) * stride_xt + (row % heads) * stride_xh
    x = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
    h = x * tl.rsqrt(tl.sum(x * x, axis=0) / n + eps)
    h = h.to(y_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * stride_y + cols, (w * h).to(y_ptr.dtype.element_ty), mask=mask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``weight * (x / sqrt(mean(x^2) + eps))`` over the last dimension; ``x`` ``[..., n]``.

    A 3-D ``x`` ``[T, H, n]`` is read through its strides (the q/k heads of a packed q/k/v
    projection are a strided view: no copy); the output is contiguous."""
    n = x.shape[-1]
    if x.dim() == 3 and x.stride(-1) == 1:
        src, heads, s_t, s_h = x, x.shape[1], x.stride(0), x.stride(1)
    else:
        src = x.reshape(-1, n)
        if src.stride(-1) != 1:
            src = src.contiguous()
        heads, s_t, s_h = 1, src.stride(0), 0
    rows = x.numel() // n if n else 0
    out = torch.empty((rows, n), dtype=x.dtype, device=x.device)
    if rows:
        block = triton.next_power_of_2(n)
        _rms_norm_kernel[(rows,)](
            src, weight, out, s_t, s_h, heads, out.stride(0), n, eps, BLOCK=block, num_warps=min(16, max(1, block // 256))
        )  # fmt: skip
    return out.view(x.shape)


@triton.jit
def _silu_mul_kernel(x_ptr, y_ptr, stride_x, stride_y, n, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n
    a = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(x_ptr + row * stride_x + n + cols, mask=mask, other=0.0).to(tl.float32)
    # As F.silu(a) * b in the input dtype: silu rounded to it, then the product.
    s = (a / (1.0 + tl.exp(-a))).to(y_ptr.dtype.element_ty).to(tl.float32)
    tl.store(y_ptr + row * stride_y + cols, (s * b).to(y_ptr.dtype.element_ty), mask=mask)


def silu_mul(x: torch.Tensor) -> torch.Tensor:
    """``silu(x[:, :n]) * x[:, n:]`` for ``x`` ``[T, 2n]`` (a packed gate/up projection's output)."""
    if x.dim() != 2 or x.shape[1] % 2:
        raise ValueError(f"silu_mul needs [T, 2n], got {tuple(x.shape)}")
    if x.stride(-1) != 1:
        x = x.contiguous()
    t, n = x.shape[0], x.shape[1] // 2
    out = torch.empty((t, n), dtype=x.dtype, device=x.device)
    if t and n:
        block = min(1024, triton.next_power_of_2(n))
        _silu_mul_kernel[(t, triton.cdiv(n, block))](x, out, x.stride(0), out.stride(0), n, BLOCK=block)
    return out


@triton.jit
def _rotary_kernel(
    x_ptr, cos_ptr, sin_ptr, y_ptr, stride_xt, stride_xh, stride_yt, stride_yh, stride_c, heads, half,
    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_D)
    mask = (h < heads)[:, None] & (d < half)[None, :]
    dt = y_ptr.dtype.element_ty
    xp = x_ptr + t * stride_xt + h[:, None] * stride_xh + d[None, :]
    x1 = tl.load(xp, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(xp + half, mask=mask, other=0.0).to(tl.float32)
    cmask = d < half
    c1 = tl.load(cos_ptr + t * stride_c + d, mask=cmask, other=0.0).to(tl.float32)[None, :]
    c2 = tl.load(cos_ptr + t * stride_c + half + d, mask=cmask, other=0.0).to(tl.float32)[None, :]
    s1 = tl.load(sin_ptr + t * stride_c + d, mask=cmask, other=0.0).to(tl.float32)[None, :]
    s2 = tl.load(sin_ptr + t * stride_c + half + d, mask=cmask, other=0.0).to(tl.float32)[None, :]
    # apply_rotary: x * cos + cat(-x2, x1) * sin, each product and the sum rounded to the dtype.
    y1 = (x1 * c1).to(dt).to(tl.float32) + (-x2 * s1).to(dt).to(tl.float32)
    y2 = (x2 * c2).to(dt).to(tl.float32) + (x1 * s2).to(dt).to(tl.float32)
    yp = y_ptr + t * stride_yt + h[:, None] * stride_yh + d[None, :]
    tl.store(yp, y1.to(dt), mask=mask)
    tl.store(yp + half, y2.to(dt), mask=mask)


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x`` ``[T, heads, D]`` rotated by ``cos``/``sin`` ``[T, D]`` (half-split layout); ``cos``
    and ``sin`` in ``x``'s dtype, as the model passes them."""
    t, heads, dim = x.shape
    if x.stride(-1) != 1:
        x = x.contiguous()
    cos, sin = cos.contiguous(), sin.contiguous()
    out = torch.empty((t, heads, dim), dtype=x.dtype, device=x.device)
    if t:
        half = dim // 2
        block_h = min(16, triton.next_power_of_2(heads))
        _rotary_kernel[(t, triton.cdiv(heads, block_h))](
            x, cos, sin, out, x.stride(0), x.stride(1), out.stride(0), out.stride(1), cos.stride(0), heads, half,
            BLOCK_H=block_h, BLOCK_D=triton.next_power_of_2(half), num_warps=2,
        )  # fmt: skip
    return out
