"""Turns a scheduled batch into one forward of the shared model over the paged KV cache.

The forward's ``T`` tokens are, in order, the ``num_tokens`` next tokens of each scheduled
request (starting at its ``num_computed_tokens``). ``PagedAttentionContext`` stores each layer's
new K/V into the requests' slots, then lets every request attend over its cached prefix plus its
new tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from miles.engine.kv_cache import KVCache
from miles.engine.request import Request
from miles.kernels.paged_attention import paged_prefix_attention, store_kv
from miles.models.transformer import CausalLM


class PagedAttentionContext:
    """``AttentionContext`` over a paged cache for one forward.

    ``slot_mapping`` int64 ``[T]``: the flat cache slot of each new token. ``block_tables[i]``
    int64: the blocks of sequence ``i``; ``query_lens[i]`` new tokens of sequence ``i`` come in
    the forward, and it has ``seq_lens[i]`` tokens in the cache once they are stored.
    """

    def __init__(
        self,
        kv_cache: KVCache,
        slot_mapping: torch.Tensor,
        block_tables: list[torch.Tensor],
        query_lens: list[int],
        seq_lens: list[int],
    ) -> None:
        self.kv_cache = kv_cache
        self.slot_mapping = slot_mapping
        self.block_tables = block_tables
        self.query_lens = query_lens
        self.seq_lens = seq_lens

    def attend(
        self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
    ) -> torch.Tensor:
        k_cache, v_cache = self.kv_cache.k[layer_idx], self.kv_cache.v[layer_idx]
        store_kv(k_cache, v_cache, k, v, self.slot_mapping)
        return paged_prefix_attention(
            q, k_cache, v_cache, self.block_tables, self.query_lens, self.seq_lens, scale
        )


@dataclass
class ScheduledRequest:
    """``num_tokens`` tokens of ``request`` to feed this step, from ``request.num_computed_tokens``."""

    request: Request
    num_tokens: int

    @property
    def completes_prompt(self) -> bool:
        """After this chunk every known token is computed: the request samples a token."""
        return self.request.num_computed_tokens + self.num_tokens == self.request.num_tokens


@dataclass
class ModelOutput:
    """``last_logits`` fp32 ``[B, V]``: the logits at the last fed token of each request.

    ``all_logits[i]`` fp32 ``[num_tokens_i, V]`` (every fed position) for requests that asked for
    prompt logprobs, else ``None``.
    """

    last_logits: torch.Tensor
    all_logits: list[torch.Tensor | None]


class ModelRunner:
    """Owns the model and the KV cache; runs one scheduled batch per call."""

    def __init__(self, model: CausalLM, kv_cache: KVCache) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.block_size = kv_cache.block_size
        self.device = model.device

    def prepare(
        self, batch: Sequence[ScheduledRequest]
    ) -> tuple[torch.Tensor, torch.Tensor, PagedAttentionContext]:
        """Flat ``input_ids``/``positions`` ``[T]`` and the attention context for ``batch``."""
        ids: list[int] = []
        pos_list: list[torch.Tensor] = []
        slots: list[torch.Tensor] = []
        tables: list[torch.Tensor] = []
        query_lens: list[int] = []
        seq_lens: list[int] = []
        bs = self.block_size
        for item in batch:
            req, start, n = item.request, item.request.num_computed_tokens, item.num_tokens
            end = start + n
            if n < 1 or end > req.num_tokens or -(-end // bs) > len(req.block_table):
                raise RuntimeError(
                    f"request {req.request_id}: cannot feed tokens [{start}, {end}) with "
                    f"{req.num_tokens} tokens and {len(req.block_table)} blocks"
                )
            ids += req.all_token_ids[start:end]
            table = torch.tensor(req.block_table, dtype=torch.long, device=self.device)
            pos = torch.arange(start, end, dtype=torch.long, device=self.device)
            pos_list.append(pos)
            slots.append(table[pos // bs] * bs + pos % bs)
            tables.append(table)
            query_lens.append(n)
            seq_lens.append(end)
        input_ids = torch.tensor(ids, dtype=torch.long, device=self.device)
        ctx = PagedAttentionContext(self.kv_cache, torch.cat(slots), tables, query_lens, seq_lens)
        return input_ids, torch.cat(pos_list), ctx

    @torch.no_grad()
    def run(self, batch: Sequence[ScheduledRequest]) -> ModelOutput:
        """Forward ``batch`` (storing its K/V) and return the logits the engine needs.

        Does not advance ``num_computed_tokens``: the engine does that after sampling.
        """
        input_ids, positions, ctx = self.prepare(batch)
        hidden = self.model(input_ids, positions, ctx)
        ends = torch.tensor(ctx.query_lens, device=self.device).cumsum(0) - 1
        last_logits = self.model.compute_logits(hidden[ends]).float()
        all_logits: list[torch.Tensor | None] = []
        start = 0
        for item, n in zip(batch, ctx.query_lens):
            if item.request.return_prompt_logprobs:
                all_logits.append(self.model.compute_logits(hidden[start : start + n]).float())
            else:
                all_logits.append(None)
            start += n
        return ModelOutput(last_logits, all_logits)
