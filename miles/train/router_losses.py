"""MoE router losses and expert-load metrics in the trainer (see docs/moe.md).

Each training forward of an MoE model runs inside a :class:`~miles.models.moe.RouterStats`
collection: the blocks hand it their router logits/probabilities and the expert ids they used
(the replayed ones under routing replay); :class:`RouterLossTracker` turns one forward's record into

- the loss term ``w * (aux_coef * aux + z_coef * z)``, where ``aux`` / ``z`` are the micro-batch's
  load-balancing and z-losses averaged over the MoE layers, and ``w = T_mb / T_global`` is the
  micro-batch's share of the global batch's tokens (all ranks). The z-loss, a token mean, then
  sums over micro-batches to exactly the global token mean, whatever the micro-batching; the
  load-balancing loss, a product of two micro-batch means, is per micro-batch by definition
  (as in Switch / Megatron), weighted by token share. Only computed with a coefficient > 0.
- per-layer expert loads (used (token, slot) assignments per expert) summed over the step's
  micro-batches and ranks: ``expert_load_max_over_mean/layer_{i}`` (max / mean load) and
  ``expert_load_cv/layer_{i}`` (std / mean), plus their averages over the MoE layers. Counting
  ids is the only work done when both coefficients are 0, and it changes no numerics.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import Tensor

from miles.config import TrainConfig
from miles.models import CausalLM
from miles.models.moe import RouterStats


class RouterLossTracker:
    """One ``accumulate_gradients`` call's router losses and expert loads (one rank)."""

    def __init__(self, model: CausalLM, aux_coef: float, z_coef: float, total_tokens: float) -> None:
        spec = model.spec
        if aux_coef < 0 or z_coef < 0:
            raise ValueError(f"MoE router loss coefficients must be >= 0, got {aux_coef}, {z_coef}")
        self.layers = tuple(spec.moe_layer_indices)
        self.aux_coef, self.z_coef = aux_coef, z_coef
        self.losses = aux_coef > 0 or z_coef > 0
        self.total_tokens = max(float(total_tokens), 1.0)
        self.counts: Tensor | None = None  # [L, E] summed over the counted forwards
        self.stats: RouterStats | None = None  # the last forward's record
        self._count = True

    @classmethod
    def for_model(
        cls, model: CausalLM, train: TrainConfig, num_tokens: int, all_reduce: Callable[[Tensor], None]
    ) -> RouterLossTracker | None:
        """``None`` for a dense model. The coefficients are ``--moe-aux-loss-coeff`` and
        ``--moe-z-loss-coeff``. ``num_tokens``: this rank's batch; summed over ranks (the global
        batch, a collective) only when a coefficient is > 0."""
        if not model.spec.is_moe:
            return None
        aux, z = train.moe_aux_loss_coeff, train.moe_z_loss_coeff
        total = torch.tensor(float(num_tokens), device=model.lm_head.weight.device)
        if aux > 0 or z > 0:
            all_reduce(total)
        return cls(model, aux, z, float(total))

    @contextlib.contextmanager
    def forward(self, *, count: bool) -> Iterator[None]:
        """Collect the forward run inside; ``count=False`` for padding micro-batches."""
        self._count, self.stats = count, RouterStats(losses=self.losses)
        with self.stats.collect():
            yield

    def finish(
        self, loss: Tensor, num_tokens: int, metrics: dict[str, Tensor]
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Add the last forward's router-loss term to ``loss`` and its metrics (already weighted
        by the token share, so they sum to global means over micro-batches) to ``metrics``."""
        stats = self.stats
        missing = [layer for layer in self.layers if stats is None or layer not in stats.counts]
        if stats is None or missing:
            raise RuntimeError(f"MoE layers {missing} were not observed in the forward")
        if self._count:
            counts = torch.stack([stats.counts[layer] for layer in self.layers])
            self.counts = counts if self.counts is None else self.counts + counts
        if not self.losses:
            return loss, metrics
        w = num_tokens / self.total_tokens
        aux = torch.stack([stats.aux[layer] for layer in self.layers]).mean()
        z = torch.stack([stats.z[layer] for layer in self.layers]).mean()
        terms = [c * v for c, v in ((self.aux_coef, aux), (self.z_coef, z)) if c > 0]
        term = w * sum(terms[1:], terms[0])
        return loss + term, {**metrics, "moe_aux_loss": w * aux.detach(), "moe_z_loss": w * z.detach()}

    def reset(self) -> None:
        self.counts = None

    def load_metrics(self, all_reduce: Callable[[Tensor], None]) -> dict[str, float]:
        """Expert-load metrics over every rank's micro-batches (``all_reduce`` sums in place)."""
        if self.counts is None:
            return {}
        counts = self.counts.clone()
        all_reduce(counts)
        return expert_load_metrics(counts, self.layers)


def expert_load_metrics(counts: Tensor, layers: tuple[int, ...]) -> dict[str, float]:
    """``counts`` ``[L, E]``: assignments per expert of each MoE layer in ``layers``."""
    mean = counts.mean(dim=-1).clamp_min(1e-12)
    max_over_mean = (counts.max(dim=-1).values / mean).tolist()
    cv = (counts.std(dim=-1, unbiased=False) / mean).tolist()
    out: dict[str, float] = {}
    for i, layer in enumerate(layers):
        out[f"expert_load_max_over_mean/layer_{layer}"] = max_over_mean[i]
        out[f"expert_load_cv/layer_{layer}"] = cv[i]
    out["expert_load_max_over_mean"] = sum(max_over_mean) / max(len(layers), 1)
    out["expert_load_cv"] = sum(cv) / max(len(layers), 1)
    return out
