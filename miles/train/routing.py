"""Rollout routing replay (R3) in the trainer: a ``RoutingHook`` over ``TrainBatch.routed_experts``.

Row ``t`` of ``routed_experts`` ``[T, num_moe_layers, top_k]`` holds the experts the engine used
for token ``t`` (negative ids: no record, e.g. the last token of each sequence, which the engine
never fed). With ``replay`` the hook returns those ids to the MoE block, which still weighs them
with *this* forward's router probabilities (so the router keeps its gradient); rows without a
record keep the router's own choice (they only feed positions that carry no loss). Either way it
counts the (token, layer) pairs whose top-k *set* differs from the record: the natural routing
mismatch between engine and trainer, before any replacement (``train/routing_mismatch_frac``).

One hook serves one forward of one micro-batch. Every MoE layer must be routed exactly once in
the forward; after :meth:`ReplayHook.end_forward`, activation-checkpoint recomputation (in the
backward) may route each layer once more and gets the same ids.
"""

from __future__ import annotations

import torch
from torch import Tensor

from miles.models import CausalLM
from miles.types import TrainBatch


class ReplayHook:
    def __init__(self, record: Tensor, moe_layers: tuple[int, ...], *, replay: bool) -> None:
        if record.dim() != 3 or record.shape[1] != len(moe_layers):
            raise ValueError(
                f"routed_experts has shape {tuple(record.shape)}; expected [T, {len(moe_layers)}, top_k] "
                f"for the model's {len(moe_layers)} MoE layers"
            )
        self.record = record.long()
        self.has_record = record[:, 0, 0] >= 0  # [T]: rows without a record are all negative
        self.layer_pos = {layer: i for i, layer in enumerate(moe_layers)}
        self.replay = replay
        self.routed = [0] * len(moe_layers)  # calls in the forward
        self.recomputed = [0] * len(moe_layers)  # calls in activation-checkpoint recomputation
        self.in_forward = True
        self.mismatched = torch.zeros((), dtype=torch.long, device=record.device)
        self.compared = torch.zeros((), dtype=torch.long, device=record.device)

    @classmethod
    def for_batch(cls, model: CausalLM, mb: TrainBatch, *, replay: bool) -> ReplayHook | None:
        """The hook for ``mb``'s forward, or ``None`` when it carries no routing record."""
        if mb.routed_experts is None:
            return None
        spec = model.spec
        if not spec.is_moe:
            raise ValueError("the batch has routed_experts but the model has no MoE layer")
        record = mb.routed_experts.to(mb.input_ids.device)
        if record.shape[0] != mb.num_tokens or record.shape[-1] != spec.num_experts_per_tok:
            raise ValueError(
                f"routed_experts has shape {tuple(record.shape)}; expected [{mb.num_tokens}, layers, "
                f"{spec.num_experts_per_tok}]"
            )
        return cls(record, spec.moe_layer_indices, replay=replay)

    def route(self, layer_idx: int, router_logits: Tensor, topk_ids: Tensor) -> Tensor:
        pos = self.layer_pos.get(layer_idx)
        if pos is None:
            raise RuntimeError(f"layer {layer_idx} is not an MoE layer of the record")
        record = self.record[:, pos]
        if self.in_forward:
            if self.routed[pos]:
                raise RuntimeError(f"MoE layer {layer_idx} was routed twice in one forward")
            self.routed[pos] += 1
            own = topk_ids.sort(dim=-1).values
            differs = (own != record.sort(dim=-1).values).any(dim=-1) & self.has_record
            self.mismatched += differs.sum()
            self.compared += self.has_record.sum()
        else:
            if self.recomputed[pos]:
                raise RuntimeError(f"MoE layer {layer_idx} was recomputed twice after its forward")
            self.recomputed[pos] += 1
        if not self.replay:
            return topk_ids
        return torch.where(self.has_record[:, None], record, topk_ids)

    def end_forward(self) -> None:
        """Check that every recorded layer was consumed exactly once; later calls are recomputation."""
        wrong = [layer for layer, pos in self.layer_pos.items() if self.routed[pos] != 1]
        if wrong:
            raise RuntimeError(f"MoE layers {wrong} were not routed exactly once in the forward")
        self.in_forward = False

    def counts(self) -> Tensor:
        """``[mismatched, compared]`` (token, layer) pairs of the forward, as a float tensor."""
        return torch.stack([self.mismatched, self.compared]).float()
