"""Dispatch to the fused inference kernels of ``miles.kernels.triton.fused`` (RMSNorm, rotary).

Only the engine's model asks for them (``miles.models.layers.use_inference_kernels``), and only
its no-grad CUDA forwards in the default (not deterministic) mode get them: the trainer keeps
the torch ops its gradients and its bit-exactness promises are tested with. Triton is imported
lazily, on first use on CUDA; ``MILES_FUSED_KERNELS=torch`` turns the kernels off.
"""

from __future__ import annotations

from types import ModuleType

import torch

from miles.kernels import batch_invariant
from miles.kernels.triton_loader import triton_module


def kernels_for(x: torch.Tensor) -> ModuleType | None:
    """The fused-kernel module when ``x`` may use it now (CUDA, no autograd, default mode)."""
    if not x.is_cuda or torch.is_grad_enabled() or batch_invariant.enabled():
        return None
    return triton_module("fused", "MILES_FUSED_KERNELS")
