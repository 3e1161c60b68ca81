"""Log-probabilities and entropy of target tokens, from logits or, memory-efficiently, from hidden states.

Token alignment follows ``miles.types.TrainBatch``: row ``t`` of ``hidden`` / ``logits`` predicts
``target_ids[t]`` (the caller shifts). Results are float32 ``[T]`` (float64 for float64 inputs).
``temperature`` divides the logits before the softmax, because the engine samples (and reports
rollout log-probs) under the tempered distribution; the trainer must score tokens under the same one.

The LM head of a 150k-vocabulary model over 16k packed tokens is 2.4 G logits, ~10 GB in fp32.
:func:`logprobs_from_hidden` never holds more than ``chunk_size x vocab_chunk_size`` logits: it
walks over token chunks (and vocabulary chunks, with an online log-sum-exp) in the forward, keeps
only the per-token log-sum-exp and entropy, and recomputes each chunk's logits in the backward.
"""

from __future__ import annotations

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


def _chunk_logits(hidden: Tensor, weight: Tensor, temperature: float) -> Tensor:
    # Matmul in the input dtype (bf16 tensor cores on GPU, fp32 accumulation), softmax maths in fp32.
    z = hidden @ weight.t()
    z = z.to(_acc_dtype(z))
    return z / temperature if temperature != 1.0 else z


def _vocab_slices(vocab: int, vocab_chunk: int) -> list[tuple[int, int]]:
    return [(v0, min(v0 + vocab_chunk, vocab)) for v0 in range(0, vocab, vocab_chunk)]


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
    ) -> tuple[Tensor, Tensor]:
        num_tokens, vocab = hidden.shape[0], weight.shape[0]
        logp = hidden.new_empty(num_tokens, dtype=_acc_dtype(hidden))
        lse = torch.empty_like(logp)
        entropy = torch.empty_like(logp)
        for s in range(0, num_tokens, chunk_size):
            h, y = hidden[s : s + chunk_size], target_ids[s : s + chunk_size]
            # Online log-sum-exp over vocabulary chunks: running max m, sum_e = sum exp(z - m),
            # sum_ez = sum exp(z - m) * z (for the entropy), both rescaled when m grows.
            m = torch.full((h.shape[0],), float("-inf"), device=h.device, dtype=logp.dtype)
            sum_e = torch.zeros_like(m)
            sum_ez = torch.zeros_like(m)
            target = torch.zeros_like(m)
            for v0, v1 in _vocab_slices(vocab, vocab_chunk):
                z = _chunk_logits(h, weight[v0:v1], temperature)
                m_new = torch.maximum(m, z.max(dim=-1).values)
                scale = torch.exp(m - m_new)
                e = torch.exp(z - m_new[:, None])
                sum_e = sum_e * scale + e.sum(dim=-1)
                sum_ez = sum_ez * scale + (e * z).sum(dim=-1)
                inside = (y >= v0) & (y < v1)
                local = (y - v0).clamp(0, v1 - v0 - 1)
                target = torch.where(inside, z.gather(1, local[:, None]).squeeze(1), target)
                m = m_new
            chunk_lse = m + torch.log(sum_e)
            lse[s : s + chunk_size] = chunk_lse
            logp[s : s + chunk_size] = target - chunk_lse
            entropy[s : s + chunk_size] = chunk_lse - sum_ez / sum_e
        ctx.save_for_backward(hidden, weight, target_ids, lse, entropy)
        ctx.temperature, ctx.chunk_size, ctx.vocab_chunk = temperature, chunk_size, vocab_chunk
        ctx.set_materialize_grads(False)
        return logp, entropy

    @staticmethod
    def backward(
        ctx: Any, grad_logp: Tensor | None, grad_entropy: Tensor | None
    ) -> tuple[Tensor | None, ...]:
        hidden, weight, target_ids, lse, entropy = ctx.saved_tensors
        temperature, chunk_size, vocab_chunk = ctx.temperature, ctx.chunk_size, ctx.vocab_chunk
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        num_tokens, vocab = hidden.shape[0], weight.shape[0]
        if (grad_logp is None and grad_entropy is None) or not (need_h or need_w):
            return None, None, None, None, None, None
        acc = _acc_dtype(hidden)
        grad_hidden = torch.zeros_like(hidden, dtype=acc) if need_h else None
        grad_weight = torch.zeros_like(weight, dtype=acc) if need_w else None
        for s in range(0, num_tokens, chunk_size):
            h, y = hidden[s : s + chunk_size], target_ids[s : s + chunk_size]
            c_lse, c_ent = lse[s : s + chunk_size, None], entropy[s : s + chunk_size, None]
            for v0, v1 in _vocab_slices(vocab, vocab_chunk):
                w = weight[v0:v1]
                log_p = _chunk_logits(h, w, temperature) - c_lse
                p = torch.exp(log_p)
                # d logp_y / dz = onehot(y) - p;  dH / dz = -p * (log p + H);  z = logits / temperature.
                g_z = torch.zeros_like(p)
                if grad_logp is not None:
                    g_lp = grad_logp[s : s + chunk_size].to(acc)
                    g_z -= g_lp[:, None] * p
                    # + g_lp at the target column, for rows whose target is in this vocab slice
                    # (scatter rather than boolean indexing: no host sync per chunk).
                    inside = (y >= v0) & (y < v1)
                    local = (y - v0).clamp(0, v1 - v0 - 1)
                    g_z.scatter_add_(1, local[:, None], torch.where(inside, g_lp, 0.0)[:, None])
                if grad_entropy is not None:
                    g_z -= grad_entropy[s : s + chunk_size, None].to(acc) * p * (log_p + c_ent)
                g_logits = (g_z / temperature).to(weight.dtype)
                if grad_hidden is not None:
                    grad_hidden[s : s + chunk_size] += (g_logits @ w).to(acc)
                if grad_weight is not None:
                    grad_weight[v0:v1] += (g_logits.t() @ h).to(acc)
        return (
            None if grad_hidden is None else grad_hidden.to(hidden.dtype),
            None if grad_weight is None else grad_weight.to(weight.dtype),
            None,
            None,
            None,
            None,
        )


def _check_hidden_inputs(hidden: Tensor, weight: Tensor, target_ids: Tensor, chunk_size: int) -> None:
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"expected hidden [T, H] and weight [V, H], got {tuple(hidden.shape)} and {tuple(weight.shape)}"
        )
    if target_ids.shape != hidden.shape[:1]:
        raise ValueError(f"target_ids must have shape [T]=[{hidden.shape[0]}], got {tuple(target_ids.shape)}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if target_ids.numel() and (int(target_ids.min()) < 0 or int(target_ids.max()) >= weight.shape[0]):
        raise ValueError(f"target_ids must lie in [0, {weight.shape[0]})")


def logprobs_and_entropy_from_hidden(
    hidden: Tensor,
    weight: Tensor,
    target_ids: Tensor,
    *,
    temperature: float = 1.0,
    chunk_size: int = 1024,
    vocab_chunk_size: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Target log-probs and entropy of ``softmax(hidden @ weight.T / temperature)``, chunked.

    Shapes: ``hidden [T, H]`` (final hidden states, after the last norm), ``weight [V, H]`` (the LM
    head), ``target_ids [T]`` int -> ``(logp [T], entropy [T])`` float32. Equal (fp32: to ~1e-6)
    to :func:`logprobs_from_logits` / :func:`entropy_from_logits` on the full logits, in value and
    gradient, but peak extra memory is ``chunk_size x vocab_chunk_size`` fp32 logits
    (``vocab_chunk_size=None``: the whole vocabulary). The weight gradient is accumulated in fp32.
    """
    _check_hidden_inputs(hidden, weight, target_ids, chunk_size)
    vocab_chunk = weight.shape[0] if vocab_chunk_size is None else vocab_chunk_size
    if vocab_chunk < 1:
        raise ValueError(f"vocab_chunk_size must be >= 1, got {vocab_chunk_size}")
    logp, entropy = _ChunkedLinearLogprobs.apply(
        hidden, weight, target_ids.long(), float(temperature), int(chunk_size), int(vocab_chunk)
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
