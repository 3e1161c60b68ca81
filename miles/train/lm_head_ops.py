"""The chunked LM head's per-slice work, fused, for the trainer on CUDA.

:data:`FUSED` runs :class:`miles.algo.logprobs.SliceOps`' two functions fused: the
softmax statistics by a Triton kernel (``miles.kernels.triton.lm_head``: every row split over
column blocks, one read of the logits), the gradient by ``torch.compile`` (one read of the logits,
one write of the gradient). Either falls back: without Triton (or ``MILES_LM_HEAD_KERNEL=torch``)
the statistics are compiled too, and so they are after the kernel raises once (logged); if
compiling fails, ``miles.kernels.compiled`` runs them eagerly.
"""

from __future__ import annotations

import functools
import logging

import torch
from torch import Tensor

from miles.algo.logprobs import SliceOps, slice_grad, slice_stats
from miles.kernels import compiled
from miles.kernels.triton_loader import triton_module

log = logging.getLogger(__name__)
_failed: list[str] = []  # why the Triton statistics kernel was given up (empty: in use)


def fused_stats(
    z: Tensor, local: Tensor, inside: Tensor, temperature: float
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """:func:`miles.algo.logprobs.slice_stats` by the Triton kernel (the compiled function when
    there is no kernel, or after it raised once)."""
    kernels = triton_module("lm_head", "MILES_LM_HEAD_KERNEL") if z.is_cuda and not _failed else None
    if kernels is None:
        return compiled.call(slice_stats, z, local, inside, temperature)
    try:
        m, s, sx = kernels.softmax_stats(z, temperature)
    except Exception as e:  # a Triton or driver problem: train on with the compiled statistics
        _failed.append(f"{type(e).__name__}: {e}")
        log.warning("the LM-head softmax kernel failed (%s); compiling the statistics instead", e)
        return compiled.call(slice_stats, z, local, inside, temperature)
    x = z.gather(1, local[:, None]).squeeze(1).float()  # the target logits, as slice_stats
    x = x / temperature if temperature != 1.0 else x
    return m, s, sx, torch.where(inside, x, 0.0)


FUSED = SliceOps(stats=fused_stats, grad=functools.partial(compiled.call, slice_grad))


def slice_ops_for(hidden: Tensor) -> SliceOps | None:
    """:data:`FUSED` where the trainer may fuse (``miles.kernels.compiled.fusable``), else None."""
    return FUSED if compiled.fusable(hidden) else None
