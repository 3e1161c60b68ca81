"""Model FLOPs utilisation: the FLOPs a step's tokens need over what the device can do.

``perf/mfu`` = ``6 x active parameters x trained tokens / trainer seconds / peak``, the usual
model-FLOPs convention (forward 2N, backward 4N per token; attention's quadratic term and the
extra forwards — old/reference log-probs, activation recomputation — are not counted, so it is a
lower bound on hardware utilisation). The peak is *measured*: the best of a few square matmuls in
the compute dtype (4096 on CUDA, 1024 on CPU), once per device and dtype per process.
"""

from __future__ import annotations

import time

import torch

from miles.models import CausalLM

_PEAKS: dict[tuple[str, torch.dtype], float] = {}


def active_params(model: CausalLM) -> int:
    """Parameters one token goes through: an MoE layer's experts count ``top_k / num_experts``
    (global sizes under FSDP/EP: a DTensor's ``numel`` is the full tensor's)."""
    spec = model.spec
    frac = spec.num_experts_per_tok / spec.num_experts if spec.is_moe else 1.0
    total = 0.0
    for name, p in model.named_parameters():
        total += p.numel() * (frac if ".experts." in name else 1.0)
    return int(total)


def matmul_peak_flops(
    device: torch.device, dtype: torch.dtype, n: int | None = None, repeats: int = 5
) -> float:
    """Measured FLOP/s of an ``n x n`` matmul in ``dtype`` on ``device`` (best of ``repeats``),
    cached per process for the default ``n``."""
    key = (str(device), dtype)
    if n is None and key in _PEAKS:
        return _PEAKS[key]
    size = n or (4096 if device.type == "cuda" else 1024)
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    torch.matmul(a, b)
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        torch.matmul(a, b)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    peak = 2 * size**3 / best
    if n is None:
        _PEAKS[key] = peak
    return peak


def mfu(active: int, tokens: int, seconds: float, peak: float) -> float:
    """``6 x active x tokens / seconds / peak`` (0 when nothing was timed)."""
    return 6.0 * active * tokens / seconds / peak if seconds > 0 and peak > 0 else 0.0


__all__ = ["active_params", "matmul_peak_flops", "mfu"]
