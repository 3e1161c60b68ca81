"""CUDA graphs for decode steps: one captured forward (model + LM head) per padded batch size.

A decode step of ``n`` sequences (one new token each) replays the graph of the smallest captured
size ``bs >= n`` (:func:`capture_sizes`). The graph reads its inputs from static device buffers
that each step overwrites: token ids, positions, KV slots, sequence lengths and block tables. Rows ``n..bs`` are padding: length 1, block table
``[scratch]``, slot ``scratch * block_size``, so they write and read only the scratch block, a
block of the KV cache the allocator never hands out. Attention reads lengths and tables from
the device (:class:`DecodeContext`), so one graph serves every step of its size.

Lifecycle: the engine captures every size when it starts (:meth:`DecodeGraphs.capture_all`, on
padding-only inputs, as SGLang does at server start); after :meth:`DecodeGraphs.reset` a size is
recaptured the first time a step needs it (that step runs inside the capture's warm-up). A graph
holds the addresses of the weights and of the KV cache, so the engine resets it whenever either
is reallocated (memory release / resume); in-place weight updates (``copy_``) keep it valid.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from miles.engine.kv_cache import KVCache
from miles.kernels.paged_attention import paged_decode_attention, store_kv
from miles.models.transformer import CausalLM
from miles.utils.transfer import copy_to


def block_table_array(tables: Sequence[Sequence[int]], rows: int, width: int, fill: int) -> torch.Tensor:
    """int64 ``[rows, width]``: ``tables[i]`` left-aligned in row ``i``, ``fill`` elsewhere. Built
    in numpy, one row slice per table: a nested-list ``torch.tensor`` of a large batch's tables
    cost several times the host time a step (docs/performance.md, "Figures behind design
    choices")."""
    arr = np.full((rows, width), fill, dtype=np.int64)
    for i, t in enumerate(tables):
        arr[i, : len(t)] = t
    return torch.from_numpy(arr)


def capture_sizes(max_bs: int) -> list[int]:
    """Padded batch sizes with a graph: 1, 2, 4, 8, 16, 24, 32, then every 16 up to 128, every
    32 beyond, and ``max_bs`` itself. Each size costs a capture (Triton compilations included),
    paid again after a memory release, so past 32 the steps coarsen (half as many sizes as steps
    of 16; a batch is padded by at most a fifth). Capture times: docs/performance.md ("graph
    capture")."""
    sizes = [1, 2, 4, 8, 16, 24, 32, *range(48, 129, 16), *range(160, max_bs, 32)]
    return sorted({*(s for s in sizes if s < max_bs), max_bs})


class DecodeContext:
    """``AttentionContext`` of a decode step from device tensors only (no host sync, capturable).

    ``slot_mapping`` int64 ``[B]``: the cache slot of each new token; ``block_tables`` int
    ``[B, W]``; ``seq_lens`` int ``[B]`` (counting the new token).
    """

    def __init__(
        self,
        kv_cache: KVCache,
        slot_mapping: torch.Tensor,
        block_tables: torch.Tensor,
        seq_lens: torch.Tensor,
    ) -> None:
        self.kv_cache = kv_cache
        self.slot_mapping = slot_mapping
        self.block_tables = block_tables
        self.seq_lens = seq_lens

    def attend(
        self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
    ) -> torch.Tensor:
        k_cache, v_cache = self.kv_cache.k[layer_idx], self.kv_cache.v[layer_idx]
        store_kv(k_cache, v_cache, k, v, self.slot_mapping)
        return paged_decode_attention(q, k_cache, v_cache, self.block_tables, self.seq_lens, scale)


class DecodeGraphs:
    """The captured decode graphs of one model and KV cache (see the module docstring).

    ``max_blocks``: block-table width, enough for the context length. ``scratch_block``: a block
    id of ``kv_cache`` outside the allocator's range.
    """

    def __init__(
        self, model: CausalLM, kv_cache: KVCache, max_bs: int, max_blocks: int, scratch_block: int
    ) -> None:
        if not 0 <= scratch_block < kv_cache.num_blocks:
            raise ValueError(
                f"scratch block {scratch_block} is outside the cache's {kv_cache.num_blocks} blocks"
            )
        self.model = model
        self.kv_cache = kv_cache
        self.max_bs = max_bs
        self.sizes = capture_sizes(max_bs)
        self.max_blocks = max_blocks
        self.scratch_block = scratch_block
        device = model.device
        # Rows of ``vec``: token ids, positions, slots, sequence lengths.
        self.vec = torch.zeros((4, max_bs), dtype=torch.long, device=device)
        self.tables = torch.full((max_bs, max_blocks), scratch_block, dtype=torch.long, device=device)
        self.logits = torch.empty((max_bs, model.spec.vocab_size), dtype=torch.float32, device=device)
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._pool: Any = None  # the graphs' shared memory pool handle
        self._captured_on: tuple[int, ...] = ()
        self._sample: list[torch.Tensor] = []  # the parameters _fingerprint checks
        self._packs: list[Any] = []  # and these packed projections (miles.models.layers.Packed)
        self.capture_seconds = 0.0  # total time spent capturing since the last reset

    @property
    def captured(self) -> list[int]:
        return sorted(self._graphs)

    def padded_size(self, n: int) -> int:
        for s in self.sizes:
            if s >= n:
                return s
        raise ValueError(f"a decode batch of {n} exceeds the largest graph ({self.max_bs})")

    def supports(self, n: int, width: int) -> bool:
        return 1 <= n <= self.max_bs and width <= self.max_blocks

    def reset(self) -> None:
        """Drop every graph and its memory pool (after the weights or the cache moved)."""
        self._graphs.clear()
        self._pool = None
        self.capture_seconds = 0.0

    @torch.no_grad()
    def capture_all(self) -> float:
        """Capture every size now (largest first: the smaller ones reuse its memory pool) on
        padding-only inputs; return the seconds it took."""
        start = time.perf_counter()
        for bs in reversed(self.sizes):
            if bs not in self._graphs:
                self.load_padding(bs)
                self._capture(bs)
        return time.perf_counter() - start

    def load_padding(self, bs: int) -> None:
        """Inputs of ``bs`` padding rows only (a capture's warm-up touches the scratch block only)."""
        scratch_slot = self.scratch_block * self.kv_cache.block_size
        pad = torch.tensor([0, 0, scratch_slot, 1], dtype=torch.long)[:, None].expand(4, bs)
        self.vec[:, :bs].copy_(pad)
        self.tables[:bs, 0] = self.scratch_block

    def run(
        self,
        token_ids: Sequence[int],
        positions: Sequence[int],
        slots: Sequence[int],
        seq_lens: Sequence[int],
        block_tables: Sequence[Sequence[int]],
        device_tokens: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Logits fp32 ``[n, V]`` of one decode step of ``n = len(token_ids)`` sequences. The new
        tokens' K/V are stored at ``slots``; sequence ``i`` then has ``seq_lens[i]`` tokens.
        ``device_tokens = (rows, ids)``, both on the device: row ``rows[j]`` feeds ``ids[j]``
        instead of its entry in ``token_ids`` (a token not on the host yet). Nothing here waits
        for the device: the returned logits are a view of the graph's output buffer, valid until
        the next replay is queued."""
        bs = self.load_inputs(token_ids, positions, slots, seq_lens, block_tables)
        if device_tokens is not None:
            self.vec[0].index_copy_(0, device_tokens[0], device_tokens[1])
        if self._graphs and self._fingerprint() != self._captured_on:
            self.reset()  # a parameter or the cache was reallocated behind the engine's back
        graph = self._graphs.get(bs)
        if graph is None:
            graph = self._capture(bs)
        graph.replay()
        return self.logits[: len(token_ids)]

    def load_inputs(
        self,
        token_ids: Sequence[int],
        positions: Sequence[int],
        slots: Sequence[int],
        seq_lens: Sequence[int],
        block_tables: Sequence[Sequence[int]],
    ) -> int:
        """Write one step's inputs, padded, into the static buffers; return the padded size."""
        n = len(token_ids)
        width = max(len(t) for t in block_tables)
        if len(block_tables) != n or not self.supports(n, width):
            raise ValueError(f"decode batch of {n} with {width} blocks is not graph-capturable")
        bs = self.padded_size(n)
        pad = bs - n
        scratch_slot = self.scratch_block * self.kv_cache.block_size
        vec = torch.tensor(
            [
                [*token_ids, *([0] * pad)],
                [*positions, *([0] * pad)],
                [*slots, *([scratch_slot] * pad)],
                [*seq_lens, *([1] * pad)],
            ],
            dtype=torch.long,
        )
        copy_to(self.vec[:, :bs], vec)
        copy_to(self.tables[:bs, :width], block_table_array(block_tables, bs, width, self.scratch_block))
        return bs

    def _fingerprint(self) -> tuple[int, ...]:
        """Addresses a graph holds: the first layer's K/V cache and a sample of the parameters
        (the first, last and every 16th). Checking all of them was a visible part of a decode
        step's host time (docs/performance.md, "Engine (rollout)"); the engine resets the graphs
        itself whenever it moves memory (release, resume), so this only guards against a model moved behind its back, which moves every
        parameter (``model.to``, ``load_state_dict(assign=True)``)."""
        cache = (self.kv_cache.k[0].data_ptr(), self.kv_cache.v[0].data_ptr()) if self.kv_cache.k else ()
        if not self._sample:
            params = list(self.model.parameters())
            self._sample = [*params[::16], params[-1]] if params else []
            # And the packed projections of the first and last layers (repacking moves them).
            packs = [m.packed for m in self.model.modules() if hasattr(m, "packed")]
            self._packs = packs[:1] + packs[-1:]
        packed = (0 if p.weight is None else p.weight.data_ptr() for p in self._packs)
        return (*cache, *(p.data_ptr() for p in self._sample), *packed)

    def forward(self, bs: int) -> None:
        """The captured computation, eagerly: the padded step in the buffers -> ``logits[:bs]``."""
        ctx = DecodeContext(self.kv_cache, self.vec[2, :bs], self.tables[:bs], self.vec[3, :bs])
        hidden = self.model(self.vec[0, :bs], self.vec[1, :bs], ctx)
        self.logits[:bs].copy_(self.model.compute_logits(hidden))

    @torch.no_grad()  # as every decode step runs: a capture with autograd on recorded other kernels
    def _capture(self, bs: int) -> torch.cuda.CUDAGraph:
        start = time.perf_counter()
        # Warm-up on a side stream (as torch.cuda.graph requires): it compiles the Triton kernels
        # and creates the cuBLAS workspaces, and runs this very step (the inputs are in place).
        stream = torch.cuda.Stream(self.model.device)
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            self.forward(bs)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            self.forward(bs)
        self._pool = graph.pool()
        self._graphs[bs] = graph
        self._captured_on = self._fingerprint()
        self.capture_seconds += time.perf_counter() - start
        return graph
