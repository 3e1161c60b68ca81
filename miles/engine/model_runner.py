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

from miles.engine.cuda_graph import DecodeGraphs, block_table_array
from miles.engine.kv_cache import KVCache
from miles.engine.request import Request
from miles.engine.routing import RoutingStore
from miles.kernels import batch_invariant
from miles.kernels.paged_attention import (
    PagedAttentionPlan,
    batched_paged_attention,
    gather_kv,
    paged_decode_attention,
    plan_paged_attention,
    store_kv,
)
from miles.models.transformer import CausalLM
from miles.utils.transfer import to_device


class PagedAttentionContext:
    """``AttentionContext`` over a paged cache for one forward.

    ``slot_mapping`` int64 ``[T]``: the flat cache slot of each new token. ``block_tables``
    int64 ``[B, W]``: row ``i`` starts with the blocks of sequence ``i`` (the rest is padding);
    ``query_lens[i]`` new tokens of sequence ``i`` come in the forward, and it has
    ``seq_lens[i]`` tokens in the cache once they are stored. The attention plan (gather
    indices and masks) is built once, by the first layer, and shared by every layer. A decode
    step on CUDA (one new token per sequence) needs no plan: the paged decode kernel reads the
    pages in place.
    """

    def __init__(
        self,
        kv_cache: KVCache,
        slot_mapping: torch.Tensor,
        block_tables: torch.Tensor,
        query_lens: list[int],
        seq_lens: list[int],
    ) -> None:
        self.kv_cache = kv_cache
        self.slot_mapping = slot_mapping
        self.block_tables = block_tables
        self.query_lens = query_lens
        self.seq_lens = seq_lens
        self._plan: PagedAttentionPlan | None = None
        self._seq_lens_t: torch.Tensor | None = None
        self.decode_kernel = block_tables.is_cuda and all(n == 1 for n in query_lens)

    @property
    def plan(self) -> PagedAttentionPlan:
        if self._plan is None:
            self._plan = plan_paged_attention(
                self.block_tables, self.query_lens, self.seq_lens, self.kv_cache.block_size
            )
        return self._plan

    def attend(
        self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
    ) -> torch.Tensor:
        k_cache, v_cache = self.kv_cache.k[layer_idx], self.kv_cache.v[layer_idx]
        store_kv(k_cache, v_cache, k, v, self.slot_mapping)
        if batch_invariant.enabled():
            return self._attend_invariant(q, k_cache, v_cache, scale)
        if self.decode_kernel:
            if self._seq_lens_t is None:
                self._seq_lens_t = to_device(self.seq_lens, q.device)
            return paged_decode_attention(q, k_cache, v_cache, self.block_tables, self._seq_lens_t, scale)
        return batched_paged_attention(q, k_cache, v_cache, self.plan, scale)

    def _attend_invariant(
        self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, scale: float
    ) -> torch.Tensor:
        # One sequence at a time over its gathered cache: the very function the trainer's packed
        # forward calls, so a token's attention output has the same bits in both.
        out = []
        start = 0
        for i, (n, seq_len) in enumerate(zip(self.query_lens, self.seq_lens)):
            table = self.block_tables[i]
            k_all = gather_kv(k_cache, table, seq_len)
            v_all = gather_kv(v_cache, table, seq_len)
            pos = torch.arange(seq_len - n, seq_len, device=q.device)
            out.append(batch_invariant.causal_attention(q[start : start + n], k_all, v_all, pos, scale))
            start += n
        return torch.cat(out)


@dataclass
class ScheduledRequest:
    """``num_tokens`` tokens of ``request`` to feed this step, from ``request.num_computed_tokens``."""

    request: Request
    num_tokens: int

    @property
    def completes_prompt(self) -> bool:
        """After this chunk every known token is computed: the request samples a token."""
        return self.request.num_computed_tokens + self.num_tokens == self.request.num_tokens


@dataclass(frozen=True)
class DeviceTokens:
    """Decode inputs still on the device (the overlapped schedule): row ``rows[i]`` of the batch
    feeds ``tokens[src[i]]``, a token the step before sampled and the host has not appended to
    its request yet. Such a row feeds position ``num_computed_tokens == num_tokens``."""

    tokens: torch.Tensor
    rows: list[int]
    src: list[int]


@dataclass
class ModelOutput:
    """``last_logits`` fp32 ``[B, V]``: the logits at the last fed token of each request.

    ``all_logits[i]`` fp32 ``[num_tokens_i, V]`` (every fed position) for requests that asked for
    prompt logprobs, else ``None``.
    """

    last_logits: torch.Tensor
    all_logits: list[torch.Tensor | None]


class ModelRunner:
    """Owns the model and the KV cache; runs one scheduled batch per call.

    With a ``routing`` store (MoE models), every forward records each token's experts at its
    KV slot (an observing ``RoutingHook``; see ``miles.engine.routing``). With ``graphs``, a
    decode step (one new token per request, no prompt log-probs, default kernels) replays a CUDA
    graph instead (see ``miles.engine.cuda_graph``).
    """

    def __init__(
        self,
        model: CausalLM,
        kv_cache: KVCache,
        routing: RoutingStore | None = None,
        graphs: DecodeGraphs | None = None,
    ) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.block_size = kv_cache.block_size
        self.device = model.device
        self.routing = routing
        self.graphs = graphs

    def prepare(
        self, batch: Sequence[ScheduledRequest], pending: DeviceTokens | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, PagedAttentionContext]:
        """Flat ``input_ids``/``positions`` ``[T]`` and the attention context for ``batch``."""
        unknown = _pending_rows(batch, pending)
        ids: list[int] = []
        starts: list[int] = []
        tables: list[list[int]] = []
        query_lens: list[int] = []
        seq_lens: list[int] = []
        bs = self.block_size
        for i, item in enumerate(batch):
            req, start, n = item.request, item.request.num_computed_tokens, item.num_tokens
            end = start + n
            known = req.num_tokens + (i in unknown)
            if n < 1 or end > known or -(-end // bs) > len(req.block_table):
                raise RuntimeError(
                    f"request {req.request_id}: cannot feed tokens [{start}, {end}) with "
                    f"{known} tokens and {len(req.block_table)} blocks"
                )
            ids += [0] if i in unknown else req.token_slice(start, end)
            starts.append(start)
            tables.append(req.block_table)
            query_lens.append(n)
            seq_lens.append(end)
        if not batch:
            raise RuntimeError("cannot prepare an empty batch")
        # A few tensor ops for the whole batch instead of several per request: each small op has
        # a fixed cost, and on CUDA each per-request ``torch.tensor`` was a host-to-device copy.
        width = max(len(t) for t in tables)
        table_t = block_table_array(tables, len(tables), width, 0)
        qlen_t = torch.tensor(query_lens, dtype=torch.long)
        seq_of = torch.repeat_interleave(torch.arange(len(batch)), qlen_t, output_size=len(ids))
        first = torch.cumsum(qlen_t, 0) - qlen_t  # index of each request's first token
        pos = torch.tensor(starts, dtype=torch.long)[seq_of] + torch.arange(len(ids)) - first[seq_of]
        slots = table_t[seq_of, pos // bs] * bs + pos % bs
        dev = self.device
        input_ids = to_device(ids, dev)
        if pending is not None:
            # One token per row in a step with pending rows (decode), so row i is token i.
            input_ids[to_device(pending.rows, dev)] = pending.tokens[to_device(pending.src, dev)]
        ctx = PagedAttentionContext(
            self.kv_cache, to_device(slots, dev), to_device(table_t, dev), query_lens, seq_lens
        )
        return input_ids, to_device(pos, dev), ctx

    @torch.no_grad()
    def run(self, batch: Sequence[ScheduledRequest], pending: DeviceTokens | None = None) -> ModelOutput:
        """Forward ``batch`` (storing its K/V) and return the logits the engine needs.

        Does not advance ``num_computed_tokens``: the engine does that after sampling. Queues
        the work without waiting for the device (the logits are on it).
        """
        if self.graphs is not None and self._graphable(batch):
            return self._run_graph(batch, pending)
        input_ids, positions, ctx = self.prepare(batch, pending)
        hook = None if self.routing is None else self.routing.recorder(ctx.slot_mapping)
        hidden = self.model(input_ids, positions, ctx, hook)
        if len(ctx.query_lens) == hidden.shape[0]:  # one token per request: every row is last
            last_logits = self.model.compute_logits(hidden).float()
        else:
            ends = to_device(ctx.query_lens, self.device).cumsum(0) - 1
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

    def _graphable(self, batch: Sequence[ScheduledRequest]) -> bool:
        assert self.graphs is not None
        if batch_invariant.enabled() or self.routing is not None:
            return False
        for item in batch:
            if item.num_tokens != 1 or item.request.return_prompt_logprobs:
                return False
        return self.graphs.supports(len(batch), max(len(item.request.block_table) for item in batch))

    def _run_graph(self, batch: Sequence[ScheduledRequest], pending: DeviceTokens | None) -> ModelOutput:
        assert self.graphs is not None
        bs = self.block_size
        unknown = _pending_rows(batch, pending)
        ids, pos, slots, lens, tables = [], [], [], [], []
        for i, item in enumerate(batch):
            req, p = item.request, item.request.num_computed_tokens
            known = req.num_tokens + (i in unknown)
            if p >= known or p // bs >= len(req.block_table):
                raise RuntimeError(
                    f"request {req.request_id}: cannot feed token {p} with {known} tokens "
                    f"and {len(req.block_table)} blocks"
                )
            ids += [0] if i in unknown else req.token_slice(p, p + 1)
            pos.append(p)
            slots.append(req.block_table[p // bs] * bs + p % bs)
            lens.append(p + 1)
            tables.append(req.block_table)
        override = None
        if pending is not None:
            dev = self.device
            override = (to_device(pending.rows, dev), pending.tokens[to_device(pending.src, dev)])
        logits = self.graphs.run(ids, pos, slots, lens, tables, override)
        return ModelOutput(logits, [None] * len(batch))


def _pending_rows(batch: Sequence[ScheduledRequest], pending: DeviceTokens | None) -> set[int]:
    if pending is None:
        return set()
    rows = set(pending.rows)
    if len(rows) != len(pending.src) or not all(
        0 <= r < len(batch) and batch[r].num_tokens == 1 for r in rows
    ):
        raise RuntimeError("device-side input tokens are for decode rows of this batch only, one each")
    return rows
