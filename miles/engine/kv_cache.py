"""Paged KV cache: the K/V tensors, and the allocator that hands out their blocks.

Memory is ``num_blocks`` blocks of ``block_size`` token slots per layer. A request owns a list of
blocks (its block table); slot ``p`` of a request lives at ``block_table[p // block_size]``,
offset ``p % block_size``.

Prefix reuse: a *full* block is keyed by a hash chained over the token ids of every block up to
and including it, so equal keys mean equal prefixes. A hit also compares the block's own token
ids; an alias would take a 64-bit collision of the parent keys *and* equal block tokens. A new request first walks its full blocks through that
map and shares every block it finds (reference counts), computing only the rest. The n samples
of one GRPO group thus share their prompt, and a repeated system prompt is computed once.

A block is registered under its key as soon as it is allocated for known tokens, but marked
*ready* only once its K/V are computed: a request whose prefix hits a block that is not ready yet
waits one step rather than recomputing it (this is what makes the samples of a group, added
together, share their prompt). Freed blocks that are ready keep their key and stay reusable;
when no plain free block is left the least recently freed cached block is evicted.
"""

from __future__ import annotations

import enum
import hashlib
from array import array
from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from miles.engine.request import Request


class KVCache:
    """Per-layer K and V tensors, each ``[num_blocks, block_size, num_kv_heads, head_dim]``."""

    def __init__(
        self,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"num_blocks and block_size must be >= 1, got {num_blocks} and {block_size}")
        shape = (num_blocks, block_size, num_kv_heads, head_dim)
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)


def block_hash(parent: int | None, token_ids: Sequence[int]) -> int:
    """Key of a full block: a 64-bit digest of the parent block's key and this block's tokens."""
    h = hashlib.blake2b(digest_size=8)
    h.update((-1 if parent is None else parent).to_bytes(8, "little", signed=True))
    h.update(array("q", token_ids).tobytes())
    return int.from_bytes(h.digest(), "little", signed=True)


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    hash: int | None = None  # set while the block is registered in the prefix map
    token_ids: tuple[int, ...] = ()
    ready: bool = False  # its K/V have been computed


class AllocStatus(enum.Enum):
    OK = "ok"
    NO_SPACE = "no_space"
    WAIT_FOR_PREFIX = "wait_for_prefix"  # a shared prefix block is still being computed


class BlockAllocator:
    """Reference-counted blocks with chained-hash prefix reuse and LRU eviction of cached blocks.

    Counters: ``num_free_blocks`` (plain free plus evictable cached), ``num_used_blocks``
    (referenced by some request), ``total_cached_tokens`` (prompt tokens served from the cache).
    """

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self._free: deque[int] = deque(range(num_blocks))
        self._free_cached: OrderedDict[int, None] = OrderedDict()  # oldest first
        self._hash_to_block: dict[int, int] = {}
        self.total_cached_tokens = 0

    # ---- counters ----------------------------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        return len(self._free) + len(self._free_cached)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.num_free_blocks

    @property
    def num_cached_blocks(self) -> int:
        """Blocks registered in the prefix map (in use or free)."""
        return len(self._hash_to_block)

    @property
    def usage(self) -> float:
        return self.num_used_blocks / self.num_blocks

    # ---- request lifecycle -------------------------------------------------------------------

    def allocate(self, req: Request) -> AllocStatus:
        """Give ``req`` blocks for all its known tokens, sharing its cached prefix.

        On ``OK`` sets ``block_table``, ``block_hashes``, ``num_computed_tokens`` and
        ``cached_tokens``. The block holding the last token is never taken from the cache: the
        model must run on at least that token to produce the next-token logits.
        """
        if req.block_table:
            raise RuntimeError(f"request {req.request_id} already holds blocks")
        tokens = req.all_token_ids
        bs = self.block_size
        hits: list[int] = []
        hashes: list[int] = []
        use_cache = self.enable_prefix_caching and not req.return_prompt_logprobs
        if use_cache:
            parent: int | None = None
            for i in range((len(tokens) - 1) // bs):
                chunk = tuple(tokens[i * bs : (i + 1) * bs])
                h = block_hash(parent, chunk)
                bid = self._hash_to_block.get(h)
                if bid is None or self.blocks[bid].token_ids != chunk:
                    break
                if not self.blocks[bid].ready:
                    return AllocStatus.WAIT_FOR_PREFIX
                hits.append(bid)
                hashes.append(h)
                parent = h
        num_needed = -(-len(tokens) // bs) - len(hits)
        num_free_hits = sum(1 for b in hits if self.blocks[b].ref_count == 0)
        if num_needed + num_free_hits > self.num_free_blocks:
            return AllocStatus.NO_SPACE
        for bid in hits:
            block = self.blocks[bid]
            if block.ref_count == 0:
                del self._free_cached[bid]
            block.ref_count += 1
        req.block_table = hits + [self._pop_free() for _ in range(num_needed)]
        req.block_hashes = hashes
        req.num_computed_tokens = len(hits) * bs
        req.num_ready_blocks = len(hits)
        req.cached_tokens = len(hits) * bs
        self.total_cached_tokens += req.cached_tokens
        if self.enable_prefix_caching:
            # Register the known full blocks now (not ready) so that requests with the same
            # prefix wait for them instead of computing their own copy.
            for i in range(len(hits), len(tokens) // bs):
                self._register_next(req, i, ready=False)
        return AllocStatus.OK

    def append_slot(self, req: Request, num_tokens: int | None = None) -> bool:
        """Make room for ``req``'s last known token, number ``num_tokens`` (default: all it has;
        more while a sampled token is not appended yet): a new block when the last is full."""
        if len(req.block_table) * self.block_size >= (req.num_tokens if num_tokens is None else num_tokens):
            return True
        if self.num_free_blocks == 0:
            return False
        req.block_table.append(self._pop_free())
        return True

    def mark_computed(self, req: Request) -> None:
        """After a forward: mark ``req``'s newly completed full blocks ready (and register them)."""
        # (A computed token whose id the host does not have yet, in an overlapped step, waits.)
        full = min(min(req.num_computed_tokens, req.num_tokens) // self.block_size, len(req.block_table))
        for i in range(req.num_ready_blocks, full):
            if i < len(req.block_hashes):
                block = self.blocks[req.block_table[i]]
                if block.hash == req.block_hashes[i]:
                    block.ready = True
            elif self.enable_prefix_caching:
                self._register_next(req, i, ready=True)
        req.num_ready_blocks = max(req.num_ready_blocks, full)

    def free(self, req: Request) -> None:
        """Drop ``req``'s references; ready registered blocks stay cached for reuse."""
        # Reverse order: the tail of a sequence is evicted before its (more shareable) head.
        for bid in reversed(req.block_table):
            block = self.blocks[bid]
            block.ref_count -= 1
            if block.ref_count > 0:
                continue
            if block.hash is not None and block.ready:
                self._free_cached[bid] = None
            else:
                self._unregister(block)
                self._free.append(bid)
        req.block_table = []
        req.block_hashes = []
        req.num_computed_tokens = 0
        req.num_ready_blocks = 0

    def reset_prefix_cache(self) -> None:
        """Forget every cached prefix (the weights changed). Blocks in use keep their data."""
        for bid in list(self._free_cached):
            self._unregister(self.blocks[bid])
            self._free.append(bid)
        self._free_cached.clear()
        for block in self.blocks:
            self._unregister(block)

    # ---- internals ---------------------------------------------------------------------------

    def _pop_free(self) -> int:
        if self._free:
            bid = self._free.popleft()
        else:
            bid, _ = self._free_cached.popitem(last=False)  # evict the least recently freed
            self._unregister(self.blocks[bid])
        self.blocks[bid].ref_count = 1
        return bid

    def _register_next(self, req: Request, i: int, ready: bool) -> None:
        """Append the key of full block ``i`` to ``req.block_hashes`` and register the block."""
        bs = self.block_size
        chunk = tuple(req.all_token_ids[i * bs : (i + 1) * bs])
        h = block_hash(req.block_hashes[-1] if req.block_hashes else None, chunk)
        req.block_hashes.append(h)
        block = self.blocks[req.block_table[i]]
        # A key already taken (by a block whose parent was evicted) keeps its block: ours stays
        # private, which is correct, just not shared.
        if h not in self._hash_to_block and block.hash is None:
            self._hash_to_block[h] = block.block_id
            block.hash, block.token_ids, block.ready = h, chunk, ready

    def _unregister(self, block: Block) -> None:
        if block.hash is not None and self._hash_to_block.get(block.hash) == block.block_id:
            del self._hash_to_block[block.hash]
        block.hash, block.token_ids, block.ready = None, (), False


def available_memory_bytes(device: torch.device) -> int:
    """Memory that can still be allocated on ``device``: free CUDA memory, or the host's
    ``MemAvailable`` (Linux) for the CPU."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import os

    return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def kv_capacity_tokens(
    *,
    bytes_per_token: int,
    sequences: int,
    seq_len: int,
    available_bytes: int,
    mem_fraction: float,
) -> int:
    """KV-cache capacity (token slots) for a rollout of ``sequences`` concurrent sequences of at
    most ``seq_len`` tokens: enough for all of them at once, but never more than ``mem_fraction``
    of ``available_bytes``. Fewer slots than the rollout needs only costs preemptions; fewer than
    one sequence cannot work and raises ``MemoryError`` naming the numbers."""
    want = sequences * seq_len
    budget = int(available_bytes * mem_fraction) // bytes_per_token
    if budget < seq_len:
        raise MemoryError(
            f"the KV cache needs {seq_len} tokens for one sequence ({seq_len * bytes_per_token / 2**20:.0f} MiB)"
            f" but {mem_fraction:.2f} of the {available_bytes / 2**30:.1f} GiB available holds {budget};"
            " lower --rollout-max-response-len / --context-length or raise --mem-fraction-static"
        )
    return min(want, budget)


def kv_bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
    """Bytes of K and V for one token across all layers."""
    return 2 * num_layers * num_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()
