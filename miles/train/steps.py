"""Building blocks shared by the policy trainer and the critic.

- :func:`packed_logprobs`: token log-probs and entropies of a packed micro-batch under a model;
- :func:`first_token_mask`: which rows of a packed batch start a sequence;
- :func:`aligned_bins`: micro-batch plans with the same number of micro-batches on every
  data-parallel rank (FSDP gathers parameters in each forward, so counts must agree);
- :func:`clipped_step`: gradient norm (global under expert parallelism), clipping and the
  optimizer/LR step, skipped on NaN/inf.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor

from miles.algo import logprobs_and_entropy_from_hidden
from miles.kernels import batch_invariant
from miles.models import CausalLM, VarlenContext
from miles.models.moe import RouterStats
from miles.train.expert_parallel import global_grad_norm, layout
from miles.train.lm_head_ops import slice_ops_for
from miles.train.packing import micro_batch_bins
from miles.train.routing import ReplayHook
from miles.types import TrainBatch


def first_token_mask(cu_seqlens: Tensor, num_tokens: int, device: torch.device) -> Tensor:
    """Bool ``[T]``: True at the first token of each sequence (its "prediction" has no meaning)."""
    starts = cu_seqlens[:-1].long().to(device)
    # One row past the end catches the starts of empty trailing sequences: no boolean indexing
    # (a device sync) to drop them.
    is_start = torch.zeros(num_tokens + 1, dtype=torch.bool, device=device)
    is_start[starts.clamp(max=num_tokens)] = True
    return is_start[:num_tokens]


def packed_logprobs(
    model: CausalLM,
    mb: TrainBatch,
    *,
    temperature: float,
    chunk_size: int,
    vocab_chunk_size: int | None,
    need_entropy_grad: bool,
    routing: ReplayHook | None = None,
) -> tuple[Tensor, Tensor]:
    """``(logp [T], entropy [T])`` float32 of each token given its prefix; 0 at each sequence's
    first token. Row ``t - 1`` of the hidden states predicts token ``t``; the chunked LM head
    never materialises ``[T, vocab]`` fp32 logits. ``routing``: the micro-batch's routing
    replay hook (see ``miles.train.routing``), checked once the forward is done. Inside a
    :meth:`RouterStats.collect <miles.models.moe.RouterStats.collect>` block the forward is routed
    through that collector (wrapping ``routing``), which records the MoE router losses and loads."""
    hook: ReplayHook | RouterStats | None = routing
    stats = RouterStats.active()
    if stats is not None:
        stats.inner, hook = routing, stats
    hidden = model(mb.input_ids, mb.positions, VarlenContext(mb.cu_seqlens), hook)
    if hook is not None:
        hook.end_forward()
    t = hidden.shape[0]
    logp = hidden.new_zeros(t, dtype=torch.float32)
    entropy = torch.zeros_like(logp)
    if t > 1:
        if batch_invariant.enabled():  # the engine sampler's exact op sequence
            lp, ent = batch_invariant.logprobs_and_entropy(
                hidden[:-1], model.lm_head.weight, mb.input_ids[1:], temperature, chunk_size
            )
        else:
            lp, ent = logprobs_and_entropy_from_hidden(
                hidden[:-1],
                model.lm_head.weight,
                mb.input_ids[1:],
                temperature=temperature,
                chunk_size=chunk_size,
                vocab_chunk_size=vocab_chunk_size,
                ops=slice_ops_for(hidden),
                check_targets=False,  # aligned_bins checked the whole batch's ids once
            )
        if not need_entropy_grad:
            ent = ent.detach()
        logp = torch.cat([logp[:1], lp.float()])
        entropy = torch.cat([entropy[:1], ent.float()])
    is_start = first_token_mask(mb.cu_seqlens, t, hidden.device)
    return torch.where(is_start, 0.0, logp), torch.where(is_start, 0.0, entropy)


def aligned_bins(
    batch: TrainBatch,
    *,
    micro_batch_size: int,
    max_tokens: int | None,
    dp_size: int,
    group: dist.ProcessGroup | None,
    device: torch.device,
    vocab_size: int | None = None,
) -> list[list[int]]:
    """Micro-batch sequence lists, padded so that every data-parallel rank runs as many.

    The count is all-reduced (MAX); a rank with fewer re-splits its token-budget bins finer and,
    as a last resort, appends empty bins (the caller runs them as zero-weight padding).
    ``vocab_size``: also check that every token id lies in ``[0, vocab_size)``, once for the batch
    (the micro-batches' LM heads then skip their own check, a device sync each).
    """
    if batch.num_sequences == 0:
        raise ValueError("every data-parallel rank needs at least one sequence")
    if vocab_size is not None and batch.num_tokens:
        lo, hi = (int(x) for x in torch.stack(torch.aminmax(batch.input_ids)).tolist())
        if lo < 0 or hi >= vocab_size:
            raise ValueError(f"token ids must lie in [0, {vocab_size}), the batch has ids in [{lo}, {hi}]")
    bins = micro_batch_bins(batch, micro_batch_size=micro_batch_size, max_tokens=max_tokens)
    if dp_size > 1:
        n = torch.tensor([len(bins)], device=device)
        dist.all_reduce(n, op=dist.ReduceOp.MAX, group=group)
        if int(n) > len(bins):
            if max_tokens is not None:  # re-split finer before resorting to empty micro-batches
                bins = micro_batch_bins(batch, max_tokens=max_tokens, min_bins=int(n))
            bins = bins + [[] for _ in range(int(n) - len(bins))]
    return bins


def to_local(t: Tensor) -> Tensor:
    """This rank's shard of a DTensor (a plain tensor as is)."""
    local = getattr(t, "to_local", None)
    return local() if local is not None else t


def clipped_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    *,
    clip_grad: float,
    loss: float,
    device: torch.device,
) -> tuple[float, float, bool]:
    """Clip gradients, then step the optimizer and the LR schedule unless ``loss`` or the gradient
    norm is NaN/inf. Gradients are zeroed either way. Returns ``(grad_norm, lr used, stepped)``.

    Under FSDP2 the norm is a DTensor; ``full_tensor()`` makes it the norm over all shards. Under
    expert parallelism the gradients live on two meshes, which ``clip_grads_with_norm_`` cannot
    mix: the norm is :func:`~miles.train.expert_parallel.global_grad_norm` (a collective) and each
    rank scales its local shards.
    """
    params = [p for p in model.parameters() if p.grad is not None]
    grads = [p.grad for p in params if p.grad is not None]
    expert_parallel = layout(model) is not None
    if expert_parallel:
        assert isinstance(model, CausalLM)  # only shard_experts sets a layout
        grad_norm = global_grad_norm(model)
    else:
        grad_norm = torch.nn.utils.get_total_norm(grads, 2.0) if grads else torch.zeros((), device=device)
        if hasattr(grad_norm, "full_tensor"):
            grad_norm = grad_norm.full_tensor()
    norm = float(grad_norm)
    lr = float(optimizer.param_groups[0]["lr"])
    finite = math.isfinite(loss) and math.isfinite(norm)
    if finite:
        if clip_grad > 0 and expert_parallel:  # as torch.nn.utils.clip_grads_with_norm_, shard by shard
            coef = torch.clamp(clip_grad / (grad_norm + 1e-6), max=1.0)
            for g in grads:
                to_local(g).mul_(coef.to(g.dtype))
        elif clip_grad > 0:
            torch.nn.utils.clip_grads_with_norm_(params, clip_grad, grad_norm)
        optimizer.step()
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return norm, lr, finite
