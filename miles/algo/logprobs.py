"""Log-probabilities and entropy of target tokens, from logits or, memory-efficiently, from hidden states.

Token alignment follows ``miles.types.TrainBatch``: row ``t`` of ``hidden`` / ``logits`` predicts
``target_ids[t]`` (the caller shifts). Results are float32 ``[T]`` (float64 for float64 inputs).
``temperature`` divides the logits before the softmax, because the engine samples (and reports
rollout log-probs) under the tempered distribution; the trainer must score tokens under the same one.

The LM head of a 150k-vocabulary model over 16k packed tokens is 2.4 G logits, four bytes each in fp32.
:func:`logprobs_from_hidden` never holds more than ``chunk_size x vocab_chunk_size`` logits: it
walks over token chunks (and vocabulary chunks, with an online log-sum-exp) in the forward, keeps
only the per-token log-sum-exp and entropy, and recomputes each chunk's logits in the backward.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor


def _acc_dtype(x: Tensor) -> torch.dtype:
    # Softmax maths in fp32 at least; float64 inputs stay float64 (gradcheck, references).
    return torch.promote_types(x.dtype, torch.float32)


def logprobs_from_logits(logits: Tensor, target_ids: Tensor, temperature: float = 1.0) -> Tensor:
    """``log softmax(logits / temperature)[target]``: ``[..., V], [...] -> [...]`` float32."""
    z = logits.to(_acc_dtype(logits))
    z = z / temperature if temperature != 1.0 else z
    return z.gather(-1, target_ids.long().unsqueeze(-1)).squeeze(-1) - torch.logsumexp(z, dim=-1)


def entropy_from_logits(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Entropy ``H = logsumexp(z) - sum_v softmax(z)_v z_v`` of ``z = logits / temperature``: ``[..., V] -> [...]`` float32."""
    z = logits.to(_acc_dtype(logits))
    z = z / temperature if temperature != 1.0 else z
    lse = torch.logsumexp(z, dim=-1)
    return lse - (torch.softmax(z, dim=-1) * z).sum(dim=-1)


def slice_stats(
    z: Tensor, local: Tensor, inside: Tensor, temperature: float
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-row statistics of one vocabulary slice of logits ``z [C, Vs]`` (any float dtype) at
    ``x = z / temperature`` in fp32 (at least): ``(max m, sum exp(x - m), sum exp(x - m) * x,
    x at the target or 0)``, each ``[C]``. ``local [C]``: the target's column in the slice (clamped
    into it), ``inside [C]``: whether the target is in the slice. One pass over ``z`` when fused."""
    x = z.to(_acc_dtype(z))
    x = x / temperature if temperature != 1.0 else x
    m = x.amax(dim=-1)
    e = torch.exp(x - m[:, None])
    target = torch.where(inside, x.gather(1, local[:, None]).squeeze(1), 0.0)
    return m, e.sum(dim=-1), (e * x).sum(dim=-1), target


def slice_grad(
    z: Tensor,
    lse: Tensor,
    entropy: Tensor,
    grad_logp: Tensor | None,
    grad_entropy: Tensor | None,
    local: Tensor,
    inside: Tensor,
    temperature: float,
    out_dtype: torch.dtype,
) -> Tensor:
    """The gradient ``[C, Vs]`` (``out_dtype``) w.r.t. one slice of logits ``z`` of
    ``sum(grad_logp * logp + grad_entropy * entropy)``, from the rows' ``lse`` and ``entropy``
    ``[C]``: ``d logp_y / dx = onehot(y) - p``, ``dH / dx = -p (log p + H)``, ``x = z / temperature``."""
    acc = _acc_dtype(z)
    x = z.to(acc)
    x = x / temperature if temperature != 1.0 else x
    log_p = x - lse[:, None]
    p = torch.exp(log_p)
    g = torch.zeros_like(p)
    if grad_logp is not None:
        g_lp = grad_logp.to(acc)[:, None]
        cols = torch.arange(p.shape[1], device=p.device)
        onehot = (cols[None, :] == local[:, None]) & inside[:, None]
        g = torch.where(onehot, g_lp, 0.0) - g_lp * p
    if grad_entropy is not None:
        g = g - grad_entropy.to(acc)[:, None] * p * (log_p + entropy[:, None])
    return (g / temperature if temperature != 1.0 else g).to(out_dtype)


@dataclass(frozen=True)
class SliceOps:
    """How a vocabulary slice's elementwise work runs: ``stats`` computes what
    :func:`slice_stats` computes (same arguments), ``grad`` what :func:`slice_grad` does. These
    eager functions by default; the trainer passes fused versions on CUDA
    (``miles.train.lm_head_ops.FUSED``)."""

    stats: Callable[..., tuple[Tensor, Tensor, Tensor, Tensor]] = slice_stats
    grad: Callable[..., Tensor] = slice_grad


def _merge_stats(
    a: tuple[Tensor, Tensor, Tensor, Tensor], b: tuple[Tensor, Tensor, Tensor, Tensor], b_has_target: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Two vocabulary slices' :func:`slice_stats` of the same rows as one (online log-sum-exp:
    both sums rescaled to the larger max); the target comes from ``b`` where ``b_has_target``."""
    m = torch.maximum(a[0], b[0])
    wa, wb = torch.exp(a[0] - m), torch.exp(b[0] - m)
    return m, a[1] * wa + b[1] * wb, a[2] * wa + b[2] * wb, torch.where(b_has_target, b[3], a[3])


_fp32_out_addmm = [True]  # cuBLAS bf16 x bf16 -> fp32 addmm available (cleared if it raises)


def add_matmul(acc: Tensor, a: Tensor, b: Tensor) -> None:
    """``acc += a @ b`` with the product accumulated in ``acc``'s dtype: fp32 straight from the
    bf16/fp16 GEMM on CUDA (no rounding of each chunk's product to bf16, no extra passes)."""
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
        return
    if acc.is_cuda and acc.dtype == torch.float32 and _fp32_out_addmm[0]:
        try:
            torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
            return
        except (RuntimeError, TypeError):  # an older torch or cuBLAS: the plain way from now on
            _fp32_out_addmm[0] = False
    acc += (a @ b).to(acc.dtype)


def _vocab_slices(vocab: int, vocab_chunk: int) -> list[tuple[int, int]]:
    return [(v0, min(v0 + vocab_chunk, vocab)) for v0 in range(0, vocab, vocab_chunk)]


def _slice_targets(y: Tensor, v0: int, v1: int) -> tuple[Tensor, Tensor]:
    return (y - v0).clamp(0, v1 - v0 - 1), (y >= v0) & (y < v1)


class _ChunkedLinearLogprobs(torch.autograd.Function):
    """``(logp, entropy)`` of ``softmax(hidden @ weight.T / temperature)``, chunked; see module docstring."""

    @staticmethod
    def forward(
        ctx: Any,
        hidden: Tensor,
        weight: Tensor,
        target_ids: Tensor,
        temperature: float,
        chunk_size: int,
        vocab_chunk: int,
        ops: SliceOps,
    ) -> tuple[Tensor, Tensor]:
        num_tokens, vocab = hidden.shape[0], weight.shape[0]
        logp = hidden.new_empty(num_tokens, dtype=_acc_dtype(hidden))
        lse = torch.empty_like(logp)
        entropy = torch.empty_like(logp)
        for s in range(0, num_tokens, chunk_size):
            h, y = hidden[s : s + chunk_size], target_ids[s : s + chunk_size]
            stats: tuple[Tensor, Tensor, Tensor, Tensor] | None = None
            for v0, v1 in _vocab_slices(vocab, vocab_chunk):
                local, inside = _slice_targets(y, v0, v1)
                cur = ops.stats(h @ weight[v0:v1].t(), local, inside, temperature)
                stats = cur if stats is None else _merge_stats(stats, cur, inside)
            assert stats is not None  # a vocabulary has at least one slice
            m, sum_e, sum_ex, target = stats
            chunk_lse = m + torch.log(sum_e)
            lse[s : s + chunk_size] = chunk_lse
            logp[s : s + chunk_size] = target - chunk_lse
            entropy[s : s + chunk_size] = chunk_lse - sum_ex / sum_e
        ctx.save_for_backward(hidden, weight, target_ids, lse, entropy)
        ctx.temperature, ctx.chunk_size, ctx.vocab_chunk, ctx.ops = temperature, chunk_size, vocab_chunk, ops
        ctx.set_materialize_grads(False)
        return logp, entropy

    @staticmethod
    def backward(
        ctx: Any, grad_logp: Tensor | None, grad_entropy: Tensor | None
    ) -> tuple[Tensor | None, ...]:
        hidden, weight, target_ids, lse, entropy = ctx.saved_tensors
        temperature, chunk_size, vocab_chunk, ops = ctx.temperature, ctx.chunk_size, ctx.vocab_chunk, ctx.ops
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        num_tokens, vocab = hidden.shape[0], weight.shape[0]
        if (grad_logp is None and grad_entropy is None) or not (need_h or need_w):
            return (None,) * 7
        acc = _acc_dtype(hidden)
        grad_hidden = torch.zeros_like(hidden, dtype=acc) if need_h else None
        grad_weight = torch.zeros_like(weight, dtype=acc) if need_w else None
        for s in range(0, num_tokens, chunk_size):
            h, y = hidden[s : s + chunk_size], target_ids[s : s + chunk_size]
            rows = slice(s, s + chunk_size)
            g_lp = None if grad_logp is None else grad_logp[rows]
            g_ent = None if grad_entropy is None else grad_entropy[rows]
            for v0, v1 in _vocab_slices(vocab, vocab_chunk):
                w = weight[v0:v1]
                local, inside = _slice_targets(y, v0, v1)
                g = ops.grad(
                    h @ w.t(), lse[rows], entropy[rows], g_lp, g_ent, local, inside, temperature, weight.dtype
                )
                if grad_hidden is not None:
                    add_matmul(grad_hidden[rows], g, w)
                if grad_weight is not None:
                    add_matmul(grad_weight[v0:v1], g.t(), h)
        return (
            None if grad_hidden is None else grad_hidden.to(hidden.dtype),
            None if grad_weight is None else grad_weight.to(weight.dtype),
            *(None,) * 5,
        )


def _check_hidden_inputs(
    hidden: Tensor, weight: Tensor, target_ids: Tensor, chunk_size: int, check_targets: bool = True
) -> None:
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"expected hidden [T, H] and weight [V, H], got {tuple(hidden.shape)} and {tuple(weight.shape)}"
        )
    if target_ids.shape != hidden.shape[:1]:
        raise ValueError(f"target_ids must have shape [T]=[{hidden.shape[0]}], got {tuple(target_ids.shape)}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if (
        check_targets
        and target_ids.numel()
        and (int(target_ids.min()) < 0 or int(target_ids.max()) >= weight.shape[0])
    ):
        raise ValueError(f"target_ids must lie in [0, {weight.shape[0]})")


def logprobs_and_entropy_from_hidden(
    hidden: Tensor,
    weight: Tensor,
    target_ids: Tensor,
    *,
    temperature: float = 1.0,
    chunk_size: int = 1024,
    vocab_chunk_size: int | None = None,
    ops: SliceOps | None = None,
    check_targets: bool = True,
) -> tuple[Tensor, Tensor]:
    """Target log-probs and entropy of ``softmax(hidden @ weight.T / temperature)``, chunked.

    Shapes: ``hidden [T, H]`` (final hidden states, after the last norm), ``weight [V, H]`` (the LM
    head), ``target_ids [T]`` int -> ``(logp [T], entropy [T])`` float32. Equal (up to fp32 summation order)
    to :func:`logprobs_from_logits` / :func:`entropy_from_logits` on the full logits, in value and
    gradient, but peak extra memory is ``chunk_size x vocab_chunk_size`` fp32 logits
    (``vocab_chunk_size=None``: the whole vocabulary). The weight gradient is accumulated in fp32.
    ``ops`` runs the per-slice elementwise work (:class:`SliceOps`: :func:`slice_stats`,
    :func:`slice_grad`); the trainer passes fused ones on CUDA, which read each block of logits
    once instead of materialising fp32 copies and temporaries. ``check_targets=False``
    skips the check that the targets lie in ``[0, V)`` (two device syncs on CUDA): for callers
    that checked them already.
    """
    _check_hidden_inputs(hidden, weight, target_ids, chunk_size, check_targets)
    vocab_chunk = weight.shape[0] if vocab_chunk_size is None else vocab_chunk_size
    if vocab_chunk < 1:
        raise ValueError(f"vocab_chunk_size must be >= 1, got {vocab_chunk_size}")
    logp, entropy = _ChunkedLinearLogprobs.apply(
        hidden,
        weight,
        target_ids.long(),
        float(temperature),
        int(chunk_size),
        int(vocab_chunk),
        ops or SliceOps(),
    )
    return logp, entropy


def logprobs_from_hidden(
    hidden: Tensor,
    weight: Tensor,
    target_ids: Tensor,
    *,
    temperature: float = 1.0,
    chunk_size: int = 1024,
    vocab_chunk_size: int | None = None,
) -> Tensor:
    """Target log-probs ``[T]`` of ``softmax(hidden @ weight.T / temperature)``; see
    :func:`logprobs_and_entropy_from_hidden` for shapes and memory."""
    logp, _ = logprobs_and_entropy_from_hidden(
        hidden,
        weight,
        target_ids,
        temperature=temperature,
        chunk_size=chunk_size,
        vocab_chunk_size=vocab_chunk_size,
    )
    return logp
