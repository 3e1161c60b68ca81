"""Move-based offload of training state between the device and CPU memory (colocated mode).

While the inference engine owns the GPU, the trainer's parameters, gradients and optimizer state
wait in (pinned) CPU memory; :meth:`miles.train.trainer.Trainer.sleep` / ``wake_up`` call these
helpers. Moves keep the Python identity of every parameter (``Module._apply`` assigns ``.data``
or swaps tensors in place), so the optimizer's state, keyed by parameter, stays valid. FSDP2
modules re-register their sharded parameters after ``_apply`` (``FSDPModule._apply``), so the
same call works on sharded models.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from miles.train.optim import CpuOffloadedOptimizer


def _move(t: Tensor, device: torch.device, pin_memory: bool) -> Tensor:
    if t.device == device:
        return t
    if device.type == "cpu":
        # Pinned host memory makes the copy back a fast DMA. DTensors (FSDP2 shards) are moved
        # as they are: FSDP re-creates their local shard itself.
        if pin_memory and not hasattr(t, "to_local"):
            out = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=True)
            out.copy_(t.detach(), non_blocking=True)  # the caller synchronises once for all
            return out
        return t.to(device)  # blocking: a non-blocking copy into pageable memory is unsafe
    return t.to(device, non_blocking=True)


def move_module(module: nn.Module, device: torch.device, pin_memory: bool = False) -> None:
    """Move ``module``'s parameters, their gradients and buffers to ``device`` in place.

    ``pin_memory``: page-locked CPU destination (only meaningful when leaving a CUDA device).
    """
    module._apply(lambda t: _move(t, device, pin_memory))


def move_optimizer_state(
    optimizer: torch.optim.Optimizer, device: torch.device, pin_memory: bool = False
) -> None:
    """Move every tensor of ``optimizer.state`` (Adam moments, step counters) to ``device``.

    The parameters themselves belong to the model: move them with :func:`move_module`. Step
    counters go with the moments only for fused/capturable optimizers; the others read them on
    CPU (where torch keeps them), so there they stay. A :class:`CpuOffloadedOptimizer` keeps
    its state in CPU memory for good: nothing to move.
    """
    if isinstance(optimizer, CpuOffloadedOptimizer):
        return
    on_device_step = {
        id(p): bool(g.get("fused") or g.get("capturable"))
        for g in optimizer.param_groups
        for p in g["params"]
    }
    for param, state in optimizer.state.items():
        moved: dict[str, Any] = {}
        for key, value in state.items():
            if not isinstance(value, Tensor) or (key == "step" and not on_device_step.get(id(param), False)):
                moved[key] = value
            else:
                moved[key] = _move(value, device, pin_memory)
        optimizer.state[param] = moved
