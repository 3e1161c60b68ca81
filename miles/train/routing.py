"""Routing replay in the trainer: a ``RoutingHook`` over a record of experts per token and layer.

Two records feed it (docs/moe.md):

- R3, rollout routing replay: ``TrainBatch.routed_experts``, the experts the *engine* used;
- R2, routing replay: the experts the trainer's own old-log-prob forward used (its *routing
  record*), captured by that forward (``capture=True``) and replayed in the training forwards of
  the same tokens (:func:`trainer_routing_hook`). With both, R3 wins: R2 adds nothing when the old
  forward already replayed the engine's experts.

Row ``t`` of ``routed_experts`` ``[T, num_moe_layers, top_k]`` holds the experts the engine used
for token ``t`` (negative ids: no record, e.g. the last token of each sequence, which the engine
never fed). With ``replay`` the hook returns those ids to the MoE block, which still weighs them
with *this* forward's router probabilities (so the router keeps its gradient); rows without a
record keep the router's own choice (they only feed positions that carry no loss). Either way it
counts the (token, layer) pairs whose top-k *set* differs from the record: the natural routing
mismatch between engine and trainer, before any replacement (:class:`RoutingMismatch`).

One hook serves one forward of one micro-batch. Every MoE layer must be routed exactly once in
the forward; after :meth:`ReplayHook.end_forward`, activation-checkpoint recomputation (in the
backward) may route each layer once more and gets the same ids.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from miles.models import CausalLM
from miles.types import TrainBatch


class ReplayHook:
    """``then``: a hook applied after this one (it sees the ids this one returns); ``capture``: keep
    the ids finally used in the forward (:meth:`captured`)."""

    def __init__(
        self,
        record: Tensor,
        moe_layers: tuple[int, ...],
        *,
        replay: bool,
        then: ReplayHook | None = None,
        capture: bool = False,
    ) -> None:
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
        self.router_mismatched = torch.zeros((), dtype=torch.long, device=record.device)
        self.compared = torch.zeros((), dtype=torch.long, device=record.device)
        self.then, self.capture = then, capture
        self._captured: list[Tensor | None] = [None] * len(moe_layers)

    @classmethod
    def blank(cls, model: CausalLM, num_tokens: int, device: torch.device, **kwargs: Any) -> ReplayHook:
        """A hook with no record (it changes nothing, counts nothing): for ``then`` / ``capture``."""
        return cls(
            empty_record(model, num_tokens, device), model.spec.moe_layer_indices, replay=False, **kwargs
        )

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
            self.router_mismatched += differs.sum()
            self.compared += self.has_record.sum()
        else:
            if self.recomputed[pos]:
                raise RuntimeError(f"MoE layer {layer_idx} was recomputed twice after its forward")
            self.recomputed[pos] += 1
        if self.replay:
            topk_ids = torch.where(self.has_record[:, None], record, topk_ids)
        if self.then is not None:
            topk_ids = self.then.route(layer_idx, router_logits, topk_ids)
        if self.capture and self.in_forward:
            self._captured[pos] = topk_ids.detach()
        if self.in_forward:  # the experts this forward uses against the engine's: 0 under R3
            used = topk_ids.sort(dim=-1).values
            self.mismatched += ((used != record.sort(dim=-1).values).any(dim=-1) & self.has_record).sum()
        return topk_ids

    def end_forward(self) -> None:
        """Check that every recorded layer was consumed exactly once; later calls are recomputation."""
        wrong = [layer for layer, pos in self.layer_pos.items() if self.routed[pos] != 1]
        if wrong:
            raise RuntimeError(f"MoE layers {wrong} were not routed exactly once in the forward")
        self.in_forward = False
        if self.then is not None:
            self.then.end_forward()

    def captured(self) -> Tensor:
        """int32 ``[T, num_moe_layers, top_k]``: the ids the forward used (needs ``capture``)."""
        if not self.capture or self.in_forward or any(c is None for c in self._captured):
            raise RuntimeError("captured() needs capture=True and a finished forward")
        return torch.stack([c for c in self._captured if c is not None], dim=1).to(torch.int32)

    def counts(self) -> Tensor:
        """``[mismatched, compared, router_mismatched]`` (token, layer) pairs of the forward, as a
        float tensor: ``mismatched`` compares the experts the forward *used* with the engine's (0
        under R3 by construction), ``router_mismatched`` the router's own top-k (what replay
        overrides; equal to ``mismatched`` without replay)."""
        return torch.stack([self.mismatched, self.compared, self.router_mismatched]).float()


@dataclass(frozen=True)
class RoutingMismatch:
    """The engine/trainer routing mismatch of a pass over a batch with ``routed_experts``: fractions
    of every rank's recorded (token, MoE layer) pairs.

    - ``used``: the experts the forwards *used* form another top-k set than the engine's (0 under
      R3, by construction): metric ``train/routing_mismatch_frac``;
    - ``router``: the router's own top-k differs, before any replay replaced it (what R3
      overrides; equal to ``used`` without replay): metric ``train/router_mismatch_frac``.
    """

    used: float
    router: float

    @classmethod
    def from_counts(cls, counts: Tensor) -> RoutingMismatch:
        """From :meth:`ReplayHook.counts` summed over forwards (and ranks)."""
        compared = max(float(counts[1]), 1.0)
        return cls(float(counts[0]) / compared, float(counts[2]) / compared)

    def metrics(self) -> dict[str, float]:
        """The two metrics, without the ``train/`` prefix."""
        return {"routing_mismatch_frac": self.used, "router_mismatch_frac": self.router}


def trainer_routing_hook(
    model: CausalLM,
    mb: TrainBatch,
    *,
    rollout_routing_replay: bool,
    routing_record: Tensor | None = None,
    capture: bool = False,
) -> ReplayHook | None:
    """The routing hook of one trainer forward of micro-batch ``mb`` (``None``: plain routing).

    - ``mb.routed_experts`` (the engine's record): replayed with ``rollout_routing_replay`` (R3),
      else only compared with the router's choice (:class:`RoutingMismatch`); this hook comes
      first, so its counts are the engine/trainer mismatch either way.
    - ``routing_record`` (R2): int32 ``[mb.num_tokens, num_moe_layers, top_k]``, the experts the
      old-log-prob forward used for these tokens; replayed unless R3 already replays (R3 wins).
    - ``capture``: the returned hook keeps the ids the forward finally used
      (:meth:`ReplayHook.captured`): R2's routing record, taken in the old-log-prob forward.
    """
    r3 = ReplayHook.for_batch(model, mb, replay=rollout_routing_replay)
    r2: ReplayHook | None = None
    hook: ReplayHook | None
    if routing_record is not None and not (r3 is not None and rollout_routing_replay):
        check_routing_record(routing_record, mb.num_tokens)
        r2 = ReplayHook(routing_record.to(mb.input_ids.device), model.spec.moe_layer_indices, replay=True)
    if r3 is not None:
        r3.then, hook = r2, r3
    else:
        hook = r2
    if capture and model.spec.is_moe:
        if hook is None:
            hook = ReplayHook.blank(model, mb.num_tokens, mb.input_ids.device)
        hook.capture = True
    return hook


def check_routing_record(record: Tensor, num_tokens: int) -> Tensor:
    """``record`` (R2's routing record), checked to hold one row of valid ids for each of ``num_tokens`` tokens."""
    if record.dim() != 3 or record.shape[0] != num_tokens:
        raise ValueError(
            f"the R2 routing record has shape {tuple(record.shape)} for a batch of {num_tokens} tokens: "
            "pass [tokens, moe_layers, top_k], sliced like the old log-probs"
        )
    if (record < 0).any():
        raise ValueError("the R2 routing record has negative ids: every token needs its experts")
    return record


def empty_record(model: CausalLM, num_tokens: int, device: torch.device) -> Tensor:
    """int32 ``[num_tokens, moe_layers, top_k]`` of -1 (no record)."""
    spec = model.spec
    shape = (num_tokens, len(spec.moe_layer_indices), spec.num_experts_per_tok)
    return torch.full(shape, -1, dtype=torch.int32, device=device)
