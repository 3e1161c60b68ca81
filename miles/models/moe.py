"""Sparse mixture-of-experts block: top-k router, experts, optional shared expert.

Routing is observable and replaceable through a ``RoutingHook`` so that the engine can record
the experts it chose and the trainer can replay them (rollout routing replay). Whatever experts
are used, the gate weights come from *this* forward's router probabilities, so the router keeps
receiving gradients under replay.

Parameter names follow the HF checkpoint layout: ``gate.weight``, ``experts.{e}.{gate,up,down}_proj.weight``,
``shared_expert.*`` and ``shared_expert_gate.weight`` (Qwen2-MoE).
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from miles.kernels import batch_invariant
from miles.models.layers import Linear, SwiGLUMLP
from miles.models.spec import ModelSpec


class RoutingHook(Protocol):
    """Sees (and may replace) every MoE layer's expert choice during one forward.

    ``route`` receives the layer index, the router logits ``[T, E]`` and the router's own top-k
    expert ids ``[T, k]``; it returns the ids to use (the same tensor to only observe).
    """

    def route(self, layer_idx: int, router_logits: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor: ...


def select_experts(
    router_logits: torch.Tensor, top_k: int, norm_topk_prob: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax in fp32, then top-k. Returns ``(probs [T, E] fp32, topk_ids [T, k] int64)``."""
    if batch_invariant.enabled():
        probs = batch_invariant.rowwise(lambda r: F.softmax(r, dim=-1, dtype=torch.float32), router_logits)
    else:
        probs = F.softmax(router_logits, dim=-1, dtype=torch.float32)
    _, topk_ids = torch.topk(probs, top_k, dim=-1)
    return probs, topk_ids


def gate_weights(probs: torch.Tensor, topk_ids: torch.Tensor, norm_topk_prob: bool) -> torch.Tensor:
    """Weights ``[T, k]`` fp32 of the chosen experts, renormalised to sum 1 if ``norm_topk_prob``."""
    weights = probs.gather(-1, topk_ids)
    if norm_topk_prob:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights


class SparseMoeBlock(nn.Module):
    """``y = sum_k w_k * expert_{id_k}(x) [+ sigmoid(g(x)) * shared(x)]`` for ``x`` ``[T, hidden]``."""

    def __init__(self, spec: ModelSpec, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_experts = spec.num_experts
        self.top_k = spec.num_experts_per_tok
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(
                f"num_experts_per_tok ({self.top_k}) must be in [1, num_experts={self.num_experts}]"
            )
        self.norm_topk_prob = spec.norm_topk_prob
        self.gate = Linear(spec.hidden_size, spec.num_experts, bias=False)
        self.experts = nn.ModuleList(
            SwiGLUMLP(spec.hidden_size, spec.moe_intermediate_size) for _ in range(spec.num_experts)
        )
        self.shared_expert: SwiGLUMLP | None = None
        self.shared_expert_gate: Linear | None = None
        if spec.shared_expert_intermediate_size:
            self.shared_expert = SwiGLUMLP(spec.hidden_size, spec.shared_expert_intermediate_size)
            self.shared_expert_gate = Linear(spec.hidden_size, 1, bias=False)

    def forward(self, x: torch.Tensor, routing: RoutingHook | None = None) -> torch.Tensor:
        router_logits = self.gate(x)
        probs, topk_ids = select_experts(router_logits, self.top_k, self.norm_topk_prob)
        if routing is not None:
            topk_ids = routing.route(self.layer_idx, router_logits, topk_ids)
            if topk_ids.shape != (x.shape[0], self.top_k):
                raise ValueError(
                    f"layer {self.layer_idx}: routing hook returned ids of shape {tuple(topk_ids.shape)}, "
                    f"expected {(x.shape[0], self.top_k)}"
                )
        weights = gate_weights(probs, topk_ids, self.norm_topk_prob).to(x.dtype)
        out = self._experts_reference(x, topk_ids, weights)
        if self.shared_expert is not None and self.shared_expert_gate is not None:
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return out

    def _experts_reference(
        self, x: torch.Tensor, topk_ids: torch.Tensor, weights: torch.Tensor
    ) -> torch.Tensor:
        """Per-expert loop over the tokens routed to it: the ground truth for faster kernels."""
        out = torch.zeros_like(x)
        # With autograd on, every expert runs (on zero tokens if none were routed to it) so each has
        # a gradient, zero or not: data-parallel ranks must reduce the same set of gradients.
        experts = range(self.num_experts) if torch.is_grad_enabled() else torch.unique(topk_ids).tolist()
        for e in experts:
            token_idx, slot = torch.where(topk_ids == e)
            y = self.experts[e](x[token_idx]) * weights[token_idx, slot, None]
            out.index_add_(0, token_idx, y.to(out.dtype))
        return out
