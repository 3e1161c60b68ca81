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

:class:`CpuOffloadedOptimizer` (``--optimizer-cpu-offload``) is the same AdamW with its state and
fp32 master weights in CPU memory; :func:`build_optimizer` returns it with ``cpu_offload=True``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor
from torch.optim.lr_scheduler import LambdaLR

from miles.config import TrainConfig

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
    params: Iterable[torch.Tensor] | list[dict[str, Any]],
    *,
    lr: float,
    weight_decay: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    device: torch.device | str = "cpu",
    cpu_offload: bool = False,
) -> torch.optim.Optimizer:
    """AdamW; on CUDA the fused kernel (one launch for all parameters).

    ``cpu_offload``: a :class:`CpuOffloadedOptimizer` (state and fp32 master weights in CPU
    memory, stepped there), whatever ``device`` is.
    """
    hyper: dict[str, Any] = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    if cpu_offload:
        return CpuOffloadedOptimizer(params, **hyper)
    fused = torch.device(device).type == "cuda"
    return torch.optim.AdamW(params, **hyper, fused=fused or None)


def policy_lr_schedule(train: TrainConfig) -> LRSchedule:
    """The policy's schedule: ``--lr``, ``--min-lr``, ``--lr-warmup-iters``, ``--lr-decay-style``,
    ``--lr-decay-iters``."""
    return LRSchedule(
        train.lr, train.min_lr, train.lr_warmup_iters, train.lr_decay_style, train.lr_decay_iters
    )


def critic_lr_schedule(train: TrainConfig) -> LRSchedule:
    """The critic's schedule: ``--critic-lr`` (default ``--lr``; ``--min-lr`` capped at it) and
    ``--critic-lr-warmup-iters``, then the policy's decay."""
    lr = train.critic_lr if train.critic_lr is not None else train.lr
    return LRSchedule(
        lr, min(train.min_lr, lr), train.critic_lr_warmup_iters, train.lr_decay_style, train.lr_decay_iters
    )


def build_training_optimizer(
    model: nn.Module, train: TrainConfig, schedule: LRSchedule, device: torch.device
) -> tuple[torch.optim.Optimizer, LambdaLR]:
    """AdamW over ``model`` (no weight decay on norms and biases; ``--weight-decay``,
    ``--adam-beta1/2``, ``--adam-eps``, ``--optimizer-cpu-offload``) following ``schedule``."""
    optimizer = build_optimizer(
        param_groups(model, train.weight_decay),
        lr=schedule.lr,
        weight_decay=train.weight_decay,
        betas=(train.adam_beta1, train.adam_beta2),
        eps=train.adam_eps,
        device=device,
        cpu_offload=train.optimizer_cpu_offload,
    )
    return optimizer, build_scheduler(optimizer, schedule)


def build_scheduler(optimizer: torch.optim.Optimizer, schedule: LRSchedule) -> LambdaLR:
    """A ``LambdaLR`` following ``schedule``; every group's initial LR must equal ``schedule.lr``."""
    for group in optimizer.param_groups:
        group["lr"] = schedule.lr
        group["initial_lr"] = schedule.lr
    return LambdaLR(optimizer, schedule)


# Implementation flags of the CPU AdamW. Single-tensor: bitwise the plain AdamW of a CPU model
# (the default there), which the tests rely on. On the CPU fused is the fastest of the three and
# foreach the slowest (the CPU has no foreach kernels); fused also wins a whole offloaded step
# (timings: docs/performance.md). So a model on CUDA (the real offload, where the plain path is fused CUDA
# AdamW and never bitwise anyway) steps with the fused CPU kernel; a CPU model keeps the
# single-tensor bitwise match.
_CPU_ADAMW: dict[str, Any] = dict(foreach=False, fused=False)
_CPU_ADAMW_FOR_CUDA_MODEL: dict[str, Any] = dict(foreach=False, fused=True)
# Per-run implementation choices, never taken from a loaded state dict.
IMPL_FLAGS = ("foreach", "fused", "capturable", "differentiable")


def _local(t: Tensor) -> Tensor:
    """The rank's local shard of an FSDP2 DTensor; a plain tensor as it is."""
    return t.to_local() if isinstance(t, DTensor) else t


@dataclass
class _Slot:
    """One model parameter and its CPU side."""

    param: Tensor  # the model's parameter (on the device; a DTensor shard under FSDP2)
    master: Tensor  # fp32 CPU copy of the local shard: what the CPU AdamW steps
    buf: Tensor  # CPU, the parameter's dtype: gradients come down into it, low-precision
    # parameters go back up through it (pinned when the parameter is on CUDA: async DMA)
    master_grad: Tensor  # fp32 gradient the CPU AdamW reads (``buf`` itself for fp32 params)


class CpuOffloadedOptimizer(torch.optim.Optimizer):
    """AdamW whose state lives in CPU memory (``--optimizer-cpu-offload``, as DeepSpeed/verl).

    Contract:

    - ``param_groups`` hold the model's parameters (on the device; DTensor shards under FSDP2),
      grouped as for the plain AdamW, and their hyperparameters (``lr``, ...) are read at every
      step: an LR scheduler, gradient clipping and ``zero_grad`` work unchanged.
    - :meth:`step` copies each parameter's local gradient to CPU (non-blocking into pinned
      memory, then one synchronisation), steps a CPU AdamW over fp32 master copies of the local
      shards (each rank steps its own shard), and copies the masters back into the parameters
      (non-blocking from pinned memory: ordered on the current stream before later kernels).
      Parameters without a gradient are left alone, as AdamW leaves them.
    - ``state`` / :meth:`state_dict` are keyed by the model's parameters with the keys, dtypes
      (fp32) and global shapes of a plain AdamW over the model (DTensors wrapping the CPU shards
      under FSDP2), so DCP checkpoints of either optimizer load into the other. The tensors share
      storage with the CPU state: DCP's in-place load writes the real state.
    - The master copies equal the parameters when these are fp32; otherwise they are extra state
      (:meth:`master_state_dict`). Whoever writes the parameters other than through :meth:`step`
      (loading a checkpoint) must then call :meth:`load_masters_from_params` or restore them.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | list[dict[str, Any]],
        *,
        lr: float,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ) -> None:
        items: list[Any] = list(params)  # parameters, or groups of them as torch.optim takes
        is_groups = bool(items) and isinstance(items[0], dict)
        groups: list[dict[str, Any]] = [dict(g) for g in items] if is_groups else [{"params": items}]
        self._slots: dict[Tensor, _Slot] = {}
        inner_groups = []
        for g in groups:
            g["params"] = list(g["params"])
            inner_groups.append({**g, "params": [self._add_slot(p).master for p in g["params"]]})
        hyper: dict[str, Any] = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        cuda_model = any(_local(p).is_cuda for g in groups for p in g["params"])
        impl = _CPU_ADAMW_FOR_CUDA_MODEL if cuda_model else _CPU_ADAMW
        self.inner = torch.optim.AdamW(inner_groups, **hyper, **impl)
        super().__init__(groups, dict(self.inner.defaults))
        self._cuda = next((s.param.device for s in self._slots.values() if s.param.is_cuda), None)

    def _add_slot(self, param: Tensor) -> _Slot:
        if param in self._slots:
            raise ValueError("a parameter appears twice in the optimizer's groups")
        local = _local(param).detach()
        pin = local.is_cuda  # page-locked: the per-step copies are asynchronous DMA
        master = torch.empty(local.shape, dtype=torch.float32, pin_memory=pin)
        master.copy_(local)  # blocking: the constructor runs once
        if local.dtype == torch.float32:  # the gradient lands where AdamW reads it
            buf = master_grad = torch.empty(local.shape, dtype=torch.float32, pin_memory=pin)
        else:  # transfers in the parameter's dtype, casts on the CPU
            buf = torch.empty(local.shape, dtype=local.dtype, pin_memory=pin)
            master_grad = torch.empty(local.shape, dtype=torch.float32)
        slot = _Slot(param=param, master=master, buf=buf, master_grad=master_grad)
        self._slots[param] = slot
        return slot

    def _synchronize(self) -> None:
        if self._cuda is not None:
            torch.cuda.current_stream(self._cuda).synchronize()

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """One AdamW step on CPU over the parameters that have a gradient (contract above)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        live = [s for s in self._slots.values() if s.param.grad is not None]
        for s in self._slots.values():
            s.master.grad = None  # AdamW skips what has no gradient, as the plain one would
        for s in live:
            assert s.param.grad is not None
            s.buf.copy_(_local(s.param.grad), non_blocking=True)
        self._synchronize()  # every gradient is in CPU memory (and the last step's copies done)
        for s in live:
            if s.master_grad is not s.buf:
                s.master_grad.copy_(s.buf)
            s.master.grad = s.master_grad
        for group, inner in zip(self.param_groups, self.inner.param_groups):
            inner.update({k: v for k, v in group.items() if k != "params" and k not in IMPL_FLAGS})
        self.inner.step()
        for s in live:
            s.master.grad = None
            src = s.master if s.buf is s.master_grad else s.buf.copy_(s.master)
            _local(s.param).copy_(src, non_blocking=True)
        self._refresh_state()
        return loss

    def _refresh_state(self) -> None:
        """Point ``self.state`` at the CPU state (views, shaped as the parameters)."""
        for param, s in self._slots.items():
            inner = self.inner.state.get(s.master)
            if not inner:
                continue
            view = self.state.get(param)
            if view is not None and all(view.get(k) is not None for k in inner):
                continue
            self.state[param] = {k: _like(v, param) if k != "step" else v for k, v in inner.items()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict of this optimizer or of a plain AdamW over the same parameters.

        State tensors are copied into fp32 CPU memory (from any device, DTensors by their local
        shard); group hyperparameters are taken, implementation flags kept (:data:`IMPL_FLAGS`).
        """
        saved_groups = state_dict["param_groups"]
        if [len(g["params"]) for g in saved_groups] != [len(g["params"]) for g in self.param_groups]:
            raise ValueError("loaded state dict's parameter groups do not match the optimizer's")
        id_map = {
            key: param
            for saved, group in zip(saved_groups, self.param_groups)
            for key, param in zip(saved["params"], group["params"])
        }
        for saved, group in zip(saved_groups, self.param_groups):
            group.update({k: v for k, v in saved.items() if k != "params" and k not in IMPL_FLAGS})
        self._synchronize()  # no copy from the CPU state may still be in flight
        for key, saved_state in state_dict["state"].items():
            s = self._slots[id_map[key]]
            inner = self.inner.state[s.master]
            for k, v in saved_state.items():
                if not isinstance(v, Tensor):
                    inner[k] = v
                    continue
                src = _local(v).detach()
                dst = inner.get(k)
                if k == "step":  # a CPU float scalar (saved from CUDA by a fused AdamW, maybe)
                    if v is not dst:  # DCP may have loaded into ours already
                        dst = src.to("cpu", torch.float32, copy=True)
                else:
                    if dst is None or dst.shape != src.shape:
                        dst = torch.empty(
                            s.master.shape, dtype=torch.float32, pin_memory=s.master.is_pinned()
                        )
                    if dst.data_ptr() != src.data_ptr():  # DCP may have loaded into it already
                        dst.copy_(src)
                inner[k] = dst
        self.state.clear()
        self._refresh_state()

    @property
    def has_separate_masters(self) -> bool:
        """Whether the fp32 masters carry information the parameters do not (low-precision params)."""
        return any(s.buf is not s.master_grad for s in self._slots.values())

    def master_state_dict(self, model: nn.Module) -> dict[str, Tensor]:
        """The fp32 masters by ``model``'s parameter names, shaped as the parameters (DTensors under
        FSDP2) and sharing storage with them: load into them in place, or copy them out."""
        names: dict[Tensor, str] = {p: n for n, p in model.named_parameters()}
        return {names[p]: _like(s.master, p) for p, s in self._slots.items() if p in names}

    @torch.no_grad()
    def load_masters_from_params(self) -> None:
        """Re-copy every master from its parameter (after the parameters were written directly)."""
        self._synchronize()
        for s in self._slots.values():
            s.master.copy_(_local(s.param))


def _like(cpu: Tensor, param: Tensor) -> Tensor:
    """``cpu`` (a local shard's CPU tensor) as ``param`` is laid out: a DTensor over the same mesh
    and placements when ``param`` is one (sharing ``cpu``'s storage), else ``cpu`` itself."""
    if not isinstance(param, DTensor):
        return cpu
    return DTensor.from_local(
        cpu, param.device_mesh, param.placements, run_check=False, shape=param.shape, stride=param.stride()
    )
