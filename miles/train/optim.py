"""AdamW and the learning-rate schedule (linear warm-up, then constant / cosine / linear decay).

The schedule is a pure function of the optimizer step (:meth:`LRSchedule.lr_at`), wrapped in a
``LambdaLR`` so that its position is saved and restored with ``state_dict``. Step ``s`` is the
number of optimizer steps already taken; the LR used by step ``s + 1`` is ``lr_at(s)``:

- warm-up, ``s < warmup_steps``: ``lr * (s + 1) / warmup_steps`` (the first step is not wasted
  at LR 0; step ``warmup_steps - 1`` runs at the full ``lr``);
- decay over the next ``decay_steps`` steps, progress ``p = (s - warmup_steps) / decay_steps``:
  ``constant`` -> ``lr``; ``linear`` -> ``lr - (lr - min_lr) p``;
  ``cosine`` -> ``min_lr + (lr - min_lr) (1 + cos(pi p)) / 2``;
- after the decay: ``min_lr`` (``constant``: ``lr``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

DECAY_STYLES = ("constant", "linear", "cosine")


@dataclass(frozen=True)
class LRSchedule:
    """Learning rate as a function of the optimizer step (module docstring gives the formulas)."""

    lr: float
    min_lr: float = 0.0
    warmup_steps: int = 0
    decay_style: str = "constant"
    decay_steps: int | None = None

    def __post_init__(self) -> None:
        if self.decay_style not in DECAY_STYLES:
            raise ValueError(
                f"lr decay style must be one of {', '.join(DECAY_STYLES)}, got {self.decay_style!r}"
            )
        if self.lr < 0 or self.min_lr < 0 or self.min_lr > self.lr:
            raise ValueError(f"need 0 <= min_lr <= lr, got lr={self.lr}, min_lr={self.min_lr}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.decay_style != "constant" and (self.decay_steps is None or self.decay_steps < 1):
            raise ValueError(
                f"decay style {self.decay_style!r} needs decay_steps >= 1, got {self.decay_steps}"
            )

    def lr_at(self, step: int) -> float:
        """LR of the optimizer step that follows ``step`` completed steps."""
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        if self.decay_style == "constant":
            return self.lr
        assert self.decay_steps is not None  # checked in __post_init__
        progress = min((step - self.warmup_steps) / self.decay_steps, 1.0)
        if self.decay_style == "linear":
            return self.lr - (self.lr - self.min_lr) * progress
        return self.min_lr + (self.lr - self.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))

    def __call__(self, step: int) -> float:
        # LambdaLR multiplies the optimizer's base LR (== self.lr) by this factor.
        return self.lr_at(step) / self.lr if self.lr > 0 else 0.0


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, object]]:
    """Two AdamW groups: weight decay on matrices, none on 1-D tensors (norm scales, biases).

    Shared (tied) parameters appear once: ``named_parameters`` deduplicates them.
    """
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 else no_decay).append(p)
    groups: list[dict[str, object]] = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def build_optimizer(
    params: Iterable[torch.Tensor] | list[dict[str, object]],
    *,
    lr: float,
    weight_decay: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    device: torch.device | str = "cpu",
) -> torch.optim.AdamW:
    """AdamW; on CUDA the fused kernel (one launch for all parameters)."""
    fused = torch.device(device).type == "cuda"
    return torch.optim.AdamW(
        params,
        lr=lr,
        betas=betas,
        eps=eps,
        weight_decay=weight_decay,
        fused=fused or None,
    )


def build_scheduler(optimizer: torch.optim.Optimizer, schedule: LRSchedule) -> LambdaLR:
    """A ``LambdaLR`` following ``schedule``; every group's initial LR must equal ``schedule.lr``."""
    for group in optimizer.param_groups:
        group["lr"] = schedule.lr
        group["initial_lr"] = schedule.lr
    return LambdaLR(optimizer, schedule)
