"""Batch-invariant kernels (pure torch; CPU and CUDA): each output row is bitwise the same
whatever else is in the batch, so the engine (decode batches of any size, chunked prefill, prefix
cache hits) and the trainer (packed sequences) compute the same bits for the same token.

Why the ordinary kernels are not: a BLAS picks its blocking, its kernel (GEMV for one row, GEMM
otherwise, split-K for skinny shapes) and hence its summation order from the *shape*, so
``linear(x)[0]`` changes with the number of rows (on a CPU, row 0 of one projection differed
for almost every batch size tried: docs/performance.md). Attention over a different
number of keys, or the trainer's causal SDPA against the engine's paged gather, sums in yet
other orders. What stays invariant (checked in ``tests/kernels``): element-wise ops, reductions
over the last dimension of a fixed length (RMSNorm, ``log_softmax`` over the vocabulary,
``amax``), and a GEMM of one fixed shape and layout — whose row ``i`` depends only on row ``i``
(on CPU only with MKL's strict reproducibility, ``MKL_CBWR=AUTO,STRICT``, which ``import miles``
sets: otherwise MKL may sum a row in an order that depends on its place in the block).

So every reduction here runs in fixed-shape pieces:

- :func:`linear`: rows in blocks of :data:`ROW_BLOCK` (the last block zero-padded), one
  ``F.linear`` of shape ``[ROW_BLOCK, K] x [K, N]`` per block.
- :func:`causal_attention`: queries in blocks of :data:`Q_BLOCK` rows, keys in chunks of
  :data:`KV_CHUNK` aligned to *absolute* key positions 0, C, 2C..., an online softmax visiting
  chunks in that order. A chunk fully masked for a row is an exact no-op for it (``alpha = 1``,
  ``p = 0``), so a query's bits depend only on its position and the keys before it, never on the
  block it shares or the number of keys after it. Prefill, chunked prefill, decode and the
  trainer's packed forward all call this one function.

On CUDA, when Triton is installed, :func:`linear` and the attention functions run the Triton
kernels of ``miles.kernels.triton`` instead (a persistent matmul with one tile configuration and
no split-K, so no row padding; one attention kernel with a fixed key/value split size); the
choice depends on the device alone, never on the batch. ``MILES_INVARIANT_KERNELS=torch`` keeps
the pure-torch path on CUDA too.

The backward is exact, not invariant: autograd's here, cuBLAS/SDPA for the Triton forwards.

The mode is process-wide (the engine runs its steps on another thread of the same process):
:func:`set_batch_invariant` / :func:`batch_invariant` switch it; the shared model code asks
:func:`enabled`.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable, Iterator, Sequence
from types import ModuleType

import torch
import torch.nn.functional as F

from miles.kernels.triton_loader import triton_module

# Block sizes per device type: small on the CPU (padding a decode row to the block costs compute
# there), large on CUDA (one cuBLAS call per block; a [256, K] x [K, N] GEMM keeps tensor cores
# busy, and a decode step reads the weights once whether it computes 1 row or 256).
_BLOCKS = {"cpu": (16, 16, 64), "cuda": (256, 64, 128)}  # (ROW_BLOCK, Q_BLOCK, KV_CHUNK)
ROW_BLOCK, Q_BLOCK, KV_CHUNK = _BLOCKS["cpu"]
# On CUDA a row-wise op's block is sized by the row width instead (a function of the op, never of
# the batch): about 4M elements, 256 to 8192 rows. The trainer's q/k-norms see T x heads rows of
# 128 (32768 for 2048 tokens): 256-row blocks meant 128 blocks of several kernels each per norm, the
# largest part of the trainer's cost in this mode (the slowdown against the default kernels, then
# and now: docs/performance.md).
_CUDA_ROWWISE_ELEMENTS, _CUDA_ROWWISE_MAX = 1 << 22, 8192


def _triton() -> tuple[ModuleType, ModuleType] | None:
    """The Triton kernels ``(matmul, attention)``, or ``None`` without Triton (or when
    ``MILES_INVARIANT_KERNELS=torch``); imported on first use (``triton_loader``)."""
    matmul = triton_module("matmul", "MILES_INVARIANT_KERNELS")
    attention = triton_module("attention", "MILES_INVARIANT_KERNELS")
    return None if matmul is None or attention is None else (matmul, attention)


def uses_triton(device: torch.device) -> bool:
    """Whether the invariant ops on ``device`` run the Triton kernels (CUDA with Triton)."""
    return device.type == "cuda" and _triton() is not None


def blocks(device: torch.device) -> tuple[int, int, int]:
    """``(row_block, q_block, kv_chunk)`` used on ``device``."""
    return _BLOCKS.get(device.type, _BLOCKS["cpu"])


_enabled = False


def enabled() -> bool:
    """Whether the shared model code runs the batch-invariant kernels."""
    return _enabled


def set_batch_invariant(on: bool) -> None:
    """Switch batch-invariant kernels on or off for the whole process."""
    global _enabled
    _enabled = bool(on)


@contextlib.contextmanager
def batch_invariant(on: bool = True) -> Iterator[None]:
    """``with batch_invariant(): ...`` runs the block with the mode ``on``, then restores it."""
    before = _enabled
    set_batch_invariant(on)
    try:
        yield
    finally:
        set_batch_invariant(before)


def _row_block(device: torch.device, width: int) -> int:
    """Rows per block of :func:`rowwise` for rows of ``width`` elements on ``device``."""
    if device.type != "cuda":
        return blocks(device)[0]
    fit = max(1, _CUDA_ROWWISE_ELEMENTS // max(width, 1))
    return max(blocks(device)[0], min(_CUDA_ROWWISE_MAX, 1 << (fit.bit_length() - 1)))


def rowwise(
    fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, block: int | None = None
) -> torch.Tensor:
    """``fn`` (a row-wise op over the last dimension) applied to fixed-shape blocks of rows of
    ``x [..., C]`` (the last block zero-padded): every call has the same shape, so the kernel,
    its launch configuration and its reduction order never depend on the number of rows.
    ``block`` rows per call; by default ``ROW_BLOCK`` on the CPU and, on CUDA, a size set by the
    row width (see ``_CUDA_ROWWISE_ELEMENTS``)."""
    lead = x.shape[:-1]
    rows = x.reshape(-1, x.shape[-1])
    m = rows.shape[0]
    if m == 0:  # e.g. an MoE expert no token was routed to
        out = fn(rows)
        return out.reshape(*lead, out.shape[-1])
    block = block or _row_block(x.device, rows.shape[1])
    pad = -m % block
    if pad:
        rows = torch.cat([rows, rows.new_zeros(pad, rows.shape[1])])
    rows = rows.contiguous()
    out = torch.cat([fn(rows[i : i + block]) for i in range(0, m + pad, block)])
    return out[:m].reshape(*lead, out.shape[-1])


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear`` whose row ``i`` depends only on ``x[..., i, :]``: ``[..., K] -> [..., N]``."""
    kernels = _triton() if x.is_cuda else None
    if kernels is not None and x.numel() > 0 and x.dtype == weight.dtype:
        rows = kernels[0].linear(x.reshape(-1, x.shape[-1]), weight, bias)
        return rows.reshape(*x.shape[:-1], rows.shape[-1])
    # a GEMM's block stays ROW_BLOCK: a decode step pads its rows to it
    return rowwise(lambda rows: F.linear(rows, weight, bias), x, blocks(x.device)[0])


def log_softmax(z: torch.Tensor) -> torch.Tensor:
    """``log_softmax`` over the last dimension, in fixed row blocks (the sampler's and the
    trainer's log-probs both come from here in this mode)."""
    return rowwise(lambda rows: torch.log_softmax(rows, dim=-1), z)


def logprobs_and_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target_ids: torch.Tensor,
    temperature: float,
    chunk_size: int = 1024,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Target log-probs and entropies ``[T]`` fp32 of ``hidden [T, H]`` under the LM head
    ``weight [V, H]``, by the op sequence of the engine's sampler (``miles.engine.sampler``):
    logits through :func:`linear`, cast to fp32, divided by ``temperature``, ``log_softmax`` over
    the whole vocabulary row. Chunked over tokens only (a vocabulary-chunked log-sum-exp adds in
    another order); autograd keeps one ``[chunk_size, V]`` fp32 block per chunk.
    """
    logp, entropy = [], []
    for s in range(0, hidden.shape[0], chunk_size):
        z = linear(hidden[s : s + chunk_size], weight).float()
        z = z / temperature
        all_logp = log_softmax(z)
        logp.append(all_logp.gather(-1, target_ids[s : s + chunk_size].long().unsqueeze(-1)).squeeze(-1))
        entropy.append(-(all_logp.exp() * all_logp).sum(dim=-1))
    if not logp:
        empty = hidden.new_zeros(0, dtype=torch.float32)
        return empty, empty
    return torch.cat(logp), torch.cat(entropy)


def causal_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_positions: torch.Tensor, scale: float
) -> torch.Tensor:
    """Attention of queries at ``q_positions`` over the keys of one sequence.

    ``q`` ``[Tq, Hq, D]``; ``k``/``v`` ``[Tk, Hkv, D]`` are the keys at positions ``0..Tk-1``
    (GQA when ``Hq`` is a multiple of ``Hkv``); ``q_positions`` int ``[Tq]`` with every value
    ``< Tk``. The query at position ``p`` sees keys ``0..p``. Returns ``[Tq, Hq, D]``.
    """
    tq, hq, d = q.shape
    tk, hkv, _ = k.shape
    if tq == 0:
        return q.new_empty(0, hq, d)
    if hq % hkv:
        raise ValueError(f"query heads ({hq}) must be a multiple of key/value heads ({hkv})")
    if int(q_positions.max()) >= tk:
        raise ValueError(f"a query at position {int(q_positions.max())} needs keys up to it; only {tk} given")
    if uses_triton(q.device):
        return _triton()[1].causal_attention(q, k, v, q_positions, scale)  # type: ignore[index]
    if hq != hkv:
        k = k.repeat_interleave(hq // hkv, dim=1)
        v = v.repeat_interleave(hq // hkv, dim=1)
    _, q_block, kv_chunk = blocks(q.device)
    pad_k = -tk % kv_chunk
    kh = F.pad(k.transpose(0, 1), (0, 0, 0, pad_k)).contiguous()  # [H, Lk, D]
    vh = F.pad(v.transpose(0, 1), (0, 0, 0, pad_k)).contiguous()
    pad_q = -tq % q_block
    qh = F.pad(q.transpose(0, 1), (0, 0, 0, pad_q)).contiguous()  # [H, Lq, D]
    # Padded query rows sit at position 0: they see key 0 only and are dropped at the end.
    pos = F.pad(q_positions.to(device=q.device, dtype=torch.long), (0, pad_q))
    key_pos = torch.arange(kv_chunk, device=q.device)
    outs = []
    for b0 in range(0, tq + pad_q, q_block):
        qb = qh[:, b0 : b0 + q_block]
        pb = pos[b0 : b0 + q_block]
        m = qb.new_full((hq, q_block, 1), float("-inf"), dtype=torch.float32)
        denom = qb.new_zeros(hq, q_block, 1, dtype=torch.float32)
        acc = qb.new_zeros(hq, q_block, d, dtype=torch.float32)
        for c in range(int(pb.max()) // kv_chunk + 1):
            kc = kh[:, c * kv_chunk : (c + 1) * kv_chunk]
            vc = vh[:, c * kv_chunk : (c + 1) * kv_chunk]
            s = torch.bmm(qb, kc.transpose(1, 2)).float() * scale
            s = s.masked_fill((key_pos + c * kv_chunk)[None, None, :] > pb[None, :, None], float("-inf"))
            m_new = torch.maximum(m, s.amax(dim=-1, keepdim=True))
            alpha = torch.exp(m - m_new)
            p = torch.exp(s - m_new)
            denom = denom * alpha + p.sum(dim=-1, keepdim=True)
            acc = acc * alpha + torch.bmm(p.to(vc.dtype), vc).float()
            m = m_new
        outs.append((acc / denom).to(q.dtype))
    return torch.cat(outs, dim=1)[:, :tq].transpose(0, 1)


def varlen_causal_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, scale: float
) -> torch.Tensor:
    """The trainer's packed causal attention through :func:`causal_attention`, one sequence at a
    time (same shapes as :func:`miles.kernels.attention.varlen_causal_attention`; on CUDA with
    Triton, all sequences in one launch of the same kernel)."""
    if uses_triton(q.device):
        return _triton()[1].varlen_causal_attention(q, k, v, cu_seqlens, scale)  # type: ignore[index]
    bounds = cu_seqlens.tolist()
    out = []
    for start, end in itertools.pairwise(bounds):
        if end > start:
            pos = torch.arange(end - start, device=q.device)
            out.append(causal_attention(q[start:end], k[start:end], v[start:end], pos, scale))
    return torch.cat(out) if out else q.new_empty(q.shape)


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_lens: Sequence[int],
    seq_lens: Sequence[int],
    scale: float,
) -> torch.Tensor:
    """The engine's invariant attention over its paged cache ``[num_blocks, block_size, Hkv, D]``:
    ``q [T, Hq, D]`` holds the ``query_lens[i]`` new (already stored) tokens of sequence ``i``,
    which has ``seq_lens[i]`` cached tokens and block table ``block_tables[i]``. Bitwise equal to
    :func:`causal_attention` over each sequence's gathered keys; on CUDA with Triton one launch
    reads the cache in place, elsewhere one sequence at a time."""
    if sum(query_lens) != q.shape[0]:
        raise ValueError(f"query_lens sum to {sum(query_lens)} but q has {q.shape[0]} tokens")
    if uses_triton(q.device):
        return _triton()[1].paged_attention(  # type: ignore[index]
            q, k_cache, v_cache, block_tables, query_lens, seq_lens, scale
        )
    _, block_size, hkv, d = k_cache.shape
    out, start = [], 0
    for i, (n, seq_len) in enumerate(zip(query_lens, seq_lens)):
        used = block_tables[i][: -(-seq_len // block_size)]
        k_all = k_cache[used].reshape(-1, hkv, d)[:seq_len]
        v_all = v_cache[used].reshape(-1, hkv, d)[:seq_len]
        pos = torch.arange(seq_len - n, seq_len, device=q.device)
        out.append(causal_attention(q[start : start + n], k_all, v_all, pos, scale))
        start += n
    return torch.cat(out) if out else q.new_empty(q.shape)


__all__ = [
    "KV_CHUNK",
    "Q_BLOCK",
    "ROW_BLOCK",
    "batch_invariant",
    "blocks",
    "causal_attention",
    "enabled",
    "linear",
    "log_softmax",
    "logprobs_and_entropy",
    "paged_attention",
    "rowwise",
    "set_batch_invariant",
    "uses_triton",
    "varlen_causal_attention",
]
