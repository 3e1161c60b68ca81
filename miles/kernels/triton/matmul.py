"""Batch-invariant persistent matmul (Triton, CUDA): ``y = x @ w.T (+ b)``, fp32 accumulation.

Invariance: every output tile is computed by one program with ONE fixed tile configuration per
dtype (:data:`CONFIGS`) and no split-K, its K loop running ``0, BLOCK_K, 2 BLOCK_K...`` in
order with the same tensor-core instruction. So ``y[i, j]`` is a function of ``x[i, :]`` and
``w[j, :]`` alone: the number of rows ``M`` only changes how many tiles there are and which
program computes which tile (the grid is ``min(#SMs, #tiles)``, persistent), never a tile's
arithmetic. ``M`` is excluded from Triton's argument specialisation (``do_not_specialize``), so
``M == 1`` or ``M % 16 == 0`` compile to the same kernel as any other ``M``.

Two kernels share the tile loop: one loads tiles through the Hopper bulk tensor-copy engine (TMA
descriptors; used when the shapes allow it, which depends on ``N``, ``K`` and the dtype, never on
``M``), the other through plain pointer loads (any shape). Which one runs is a function of the
weight, so a given layer always runs the same one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl


@dataclass(frozen=True)
class TileConfig:
    """One launch configuration: tile ``block_m x block_n x block_k``, ``group_m`` tiles of M per
    L2 group, ``num_warps`` warps and ``num_stages`` pipeline stages; ``tma`` picks the kernel."""

    block_m: int
    block_n: int
    block_k: int
    group_m: int = 8
    num_warps: int = 8
    num_stages: int = 3
    tma: bool = True


# One configuration per dtype: the dtype of a layer never changes with the batch. bf16/fp16 tuned
# on an H100 (benchmarks/invariant_matmul_tune.py); fp32 runs IEEE fp32 FMA dots (torch's default
# for fp32 matmuls is no TF32), where small tiles fit shared memory.
CONFIGS: dict[torch.dtype, TileConfig] = {
    torch.bfloat16: TileConfig(128, 256, 64, 8, 8, 3, True),
    torch.float16: TileConfig(128, 256, 64, 8, 8, 3, True),
    torch.float32: TileConfig(64, 64, 32, 8, 4, 3, False),
}

_TL_DTYPE = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}


@triton.jit
def _tile_coords(tile_id, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    # Grouped ordering: GROUP_M tiles of M share each strip of N, for L2 reuse of the weight.
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = tile_id // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + (tile_id % group_size_m)
    pid_n = (tile_id % num_pid_in_group) // group_size_m
    return pid_m, pid_n


@triton.jit(do_not_specialize=["M"])
def _matmul_ptr_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr, M, N, K,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_ym, stride_yn,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, NUM_SMS: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    start_pid = tl.program_id(axis=0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    k_tiles = tl.cdiv(K, BLOCK_K)
    num_tiles = num_pid_m * num_pid_n
    offs_k0 = tl.arange(0, BLOCK_K)
    for tile_id in tl.range(start_pid, num_tiles, NUM_SMS, flatten=True):
        pid_m, pid_n = _tile_coords(tile_id, num_pid_m, num_pid_n, GROUP_M)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        # Rows/columns past the edge re-read valid ones (modulo) and are never stored.
        rows = offs_m % M
        cols = offs_n % N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for ki in range(k_tiles):
            offs_k = ki * BLOCK_K + offs_k0
            kmask = offs_k < K
            a = tl.load(x_ptr + rows[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                        mask=kmask[None, :], other=0.0)  # fmt: skip
            b = tl.load(w_ptr + cols[None, :] * stride_wn + offs_k[:, None] * stride_wk,
                        mask=kmask[:, None], other=0.0)  # fmt: skip
            acc = tl.dot(a, b, acc, input_precision=PRECISION)
        if HAS_BIAS:
            acc += tl.load(b_ptr + cols).to(tl.float32)[None, :]
        y = acc.to(y_ptr.dtype.element_ty)
        mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
        tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn, y, mask=mask)


@triton.jit(do_not_specialize=["M"])
def _matmul_tma_kernel(
    x_desc, w_desc, y_desc, b_ptr, M, N, K,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, NUM_SMS: tl.constexpr, OUT_DTYPE: tl.constexpr,
):  # fmt: skip
    start_pid = tl.program_id(axis=0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    k_tiles = tl.cdiv(K, BLOCK_K)
    num_tiles = num_pid_m * num_pid_n
    # The epilogue recomputes the tile from its own counter (pipelining the loop over tiles
    # needs the prologue's and the epilogue's values kept apart, as in Triton's tutorial).
    tile_id_c = start_pid - NUM_SMS
    for tile_id in tl.range(start_pid, num_tiles, NUM_SMS, flatten=True):
        pid_m, pid_n = _tile_coords(tile_id, num_pid_m, num_pid_n, GROUP_M)
        off_m = pid_m * BLOCK_M
        off_n = pid_n * BLOCK_N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for ki in range(k_tiles):
            off_k = ki * BLOCK_K  # the copy engine zero-fills past K (and past M, N)
            a = x_desc.load([off_m, off_k])
            b = w_desc.load([off_n, off_k])
            acc = tl.dot(a, b.T, acc)
        tile_id_c += NUM_SMS
        pid_m, pid_n = _tile_coords(tile_id_c, num_pid_m, num_pid_n, GROUP_M)
        off_m = pid_m * BLOCK_M
        off_n = pid_n * BLOCK_N
        if HAS_BIAS:
            offs_n = off_n + tl.arange(0, BLOCK_N)
            acc += tl.load(b_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
        y_desc.store([off_m, off_n], acc.to(OUT_DTYPE))  # clipped to [M, N] by the copy engine


_NUM_SMS: dict[int, int] = {}


def _num_sms(device: torch.device) -> int:
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _NUM_SMS:
        _NUM_SMS[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _NUM_SMS[index]


def tma_eligible(n: int, k: int, dtype: torch.dtype) -> bool:
    """Whether the TMA kernel can run ``[*, k] x [n, k]^T`` (row strides 16-byte aligned; a
    function of ``n``, ``k`` and the dtype only, so never of the batch)."""
    size = dtype.itemsize
    return dtype in (torch.bfloat16, torch.float16) and (k * size) % 16 == 0 and (n * size) % 16 == 0


def matmul(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, config: TileConfig | None = None
) -> torch.Tensor:
    """``x [M, K] @ weight[N, K].T (+ bias [N])`` -> ``[M, N]`` in ``x``'s dtype; row ``i`` of the
    result depends only on ``x[i]`` (see the module docstring). ``config`` overrides the per-dtype
    configuration (tuning only: a different configuration gives different bits)."""
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(
            f"matmul needs x [M, K] and weight [N, K], got {tuple(x.shape)} and {tuple(weight.shape)}"
        )
    if x.dtype != weight.dtype or x.dtype not in CONFIGS:
        raise ValueError(
            f"matmul needs x and weight of one dtype in {list(CONFIGS)}, got {x.dtype}, {weight.dtype}"
        )
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"bias must be [{weight.shape[0]}], got {tuple(bias.shape)}")
    cfg = config or CONFIGS[x.dtype]
    m, k = x.shape
    n = weight.shape[0]
    y = torch.empty(m, n, device=x.device, dtype=x.dtype)
    if m == 0 or n == 0:
        return y
    # Contiguous, 16-byte-aligned operands: the kernel (and its TMA eligibility) never depends on
    # where a slice of the batch starts.
    x = _aligned(x)
    weight = _aligned(weight)
    b = _aligned(bias.to(x.dtype)) if bias is not None else x  # x: a dummy pointer, never read
    num_sms = _num_sms(x.device)
    tiles = triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n)
    grid = (min(num_sms, tiles),)
    if cfg.tma and tma_eligible(n, k, x.dtype):
        from triton.tools.tensor_descriptor import TensorDescriptor

        x_desc = TensorDescriptor.from_tensor(x, [cfg.block_m, cfg.block_k])
        w_desc = TensorDescriptor.from_tensor(weight, [cfg.block_n, cfg.block_k])
        y_desc = TensorDescriptor.from_tensor(y, [cfg.block_m, cfg.block_n])
        _matmul_tma_kernel[grid](
            x_desc, w_desc, y_desc, b, m, n, k,
            HAS_BIAS=bias is not None, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
            GROUP_M=cfg.group_m, NUM_SMS=num_sms, OUT_DTYPE=_TL_DTYPE[x.dtype],
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )  # fmt: skip
    else:
        _matmul_ptr_kernel[grid](
            x, weight, b, y, m, n, k,
            x.stride(0), x.stride(1), weight.stride(0), weight.stride(1), y.stride(0), y.stride(1),
            HAS_BIAS=bias is not None, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
            GROUP_M=cfg.group_m, NUM_SMS=num_sms, PRECISION="ieee" if x.dtype == torch.float32 else None,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )  # fmt: skip
    return y


class _Linear(torch.autograd.Function):
    """Forward through :func:`matmul` (invariant); backward through cuBLAS (exact gradients,
    invariance is only promised forward)."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return matmul(x, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        gx = grad @ weight if ctx.needs_input_grad[0] else None
        gw = grad.t() @ x if ctx.needs_input_grad[1] else None
        gb = grad.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return gx, gw, gb


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Differentiable ``F.linear`` for ``x [M, K]`` whose forward is :func:`matmul`."""
    if not torch.is_grad_enabled() or not (
        x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)
    ):  # the engine: skip autograd's bookkeeping (same kernel, same bits)
        return matmul(x, weight, bias)
    out: torch.Tensor = _Linear.apply(x, weight, bias)
    return out


def _aligned(t: torch.Tensor) -> torch.Tensor:
    """``t`` with row-major strides and a 16-byte-aligned start (copied if not)."""
    if t.is_contiguous() and (t.dim() < 2 or t.stride(0) == t.shape[1]) and t.data_ptr() % 16 == 0:
        return t
    return torch.empty(t.shape, dtype=t.dtype, device=t.device).copy_(t)


__all__ = ["CONFIGS", "TileConfig", "linear", "matmul", "tma_eligible"]
