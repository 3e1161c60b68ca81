"""The engine's record of MoE routing, for rollout routing replay (R3).

Every forward of an MoE model writes the top-k expert ids each token got in each MoE layer into
a *per-KV-slot* store, next to the token's K/V: ``ids[slot, moe_layer, k]`` int32, with
``slot = block_table[p // block_size] * block_size + p % block_size``. A token's routing, like
its K/V, depends only on the tokens up to it (causal model) and the weights, so a slot's row is
valid exactly as long as its K/V are: a prefix-cache hit reuses the blocks *and* their routing
(the experts really used to build that K/V), and a weight update flushes both together. This is
what SGLang does (routing captured by KV location); recomputing cached prefixes instead would
cost a forward and could pick other experts than the cached K/V came from.

Requests that asked for ``return_routed_experts`` copy their rows to a host buffer after each
forward (so the record survives blocks being freed at finish or abort): the rows of the tokens
just fed, plus the cached prefix on the first forward after (re)admission. A preempted or
retracted request forgets its rows and takes them again when recomputed (its new blocks may be
cache hits whose routing came from another forward, and after a weight update every row is the
new weights'). The record has ``num_tokens - 1`` rows at the end: the last sampled token is
never fed to the model.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from miles.models.spec import ModelSpec

if TYPE_CHECKING:
    from miles.engine.model_runner import ScheduledRequest
    from miles.engine.request import Request


class RecordingHook:
    """``RoutingHook`` that observes only: stores each MoE layer's top-k ids at the token slots."""

    def __init__(self, store: RoutingStore, slot_mapping: torch.Tensor) -> None:
        self.store = store
        self.slots = slot_mapping

    def route(self, layer_idx: int, router_logits: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
        self.store.ids[self.slots, self.store.layer_pos[layer_idx]] = topk_ids.to(torch.int32)
        return topk_ids


class RoutingStore:
    """``ids`` int32 ``[num_slots, num_moe_layers, top_k]`` (-1 where never written)."""

    def __init__(self, spec: ModelSpec, num_slots: int, block_size: int, device: torch.device) -> None:
        if not spec.is_moe:
            raise ValueError("routing is recorded for MoE models only")
        self.moe_layers = spec.moe_layer_indices
        self.layer_pos = {layer: i for i, layer in enumerate(self.moe_layers)}
        self.top_k = spec.num_experts_per_tok
        self.block_size = block_size
        self.row_shape = (len(self.moe_layers), self.top_k)
        self.ids = torch.full((num_slots, *self.row_shape), -1, dtype=torch.int32, device=device)

    def recorder(self, slot_mapping: torch.Tensor) -> RecordingHook:
        return RecordingHook(self, slot_mapping)

    def new_buffer(self, rows: int) -> torch.Tensor:
        return torch.full((max(rows, 1), *self.row_shape), -1, dtype=torch.int32)

    @staticmethod
    def forget(requests: Sequence[Request]) -> None:
        """Drop the host rows of requests that lost their blocks (preempted or retracted): they
        are taken again when the request is recomputed, maybe over other (cached) blocks, or
        under other weights, whose experts are the ones that made the K/V it then attends to."""
        for req in requests:
            req.num_routed_rows = 0

    def after_forward(self, batch: Sequence[ScheduledRequest], preempted: Sequence[Request]) -> None:
        """Copy the new rows of the requests that record into their host buffers (one gather and
        one device-to-host copy for the batch). Call before ``num_computed_tokens`` advances."""
        self.forget(preempted)
        spans: list[tuple[Request, int, int]] = []
        slots: list[torch.Tensor] = []
        bs = self.block_size
        for item in batch:
            req = item.request
            if not req.return_routed_experts:
                continue
            start = req.num_computed_tokens
            lo, hi = min(req.num_routed_rows, start), start + item.num_tokens
            pos = torch.arange(lo, hi)
            table = torch.tensor(req.block_table, dtype=torch.long)
            slots.append(table[pos // bs] * bs + pos % bs)
            spans.append((req, lo, hi))
        if not spans:
            return
        rows = self.ids[torch.cat(slots).to(self.ids.device)].cpu()
        offset = 0
        for req, lo, hi in spans:
            buf = req.routed_experts
            if buf is None or buf.shape[0] < hi:
                grown = self.new_buffer(max(hi, 2 * (0 if buf is None else buf.shape[0])))
                if buf is not None:
                    grown[: buf.shape[0]] = buf
                buf = req.routed_experts = grown
            buf[lo:hi] = rows[offset : offset + hi - lo]
            offset += hi - lo
            req.num_routed_rows = hi
