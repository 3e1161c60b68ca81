"""The trainer's half of one RL step, run by every trainer rank on the same rollout groups.

Embedded (one process) it runs with ``rank=0, world_size=1``; under Ray each trainer actor runs
it with its own rank, in step with the others (the collectives below and inside the trainer need
every rank to make the same calls in the same order).

Data parallelism: every rank builds the same global :class:`TrainBatch` from the groups, then
works on its token-balanced share (:func:`miles.train.packing.balanced_partition`). Quantities
the advantage estimators need over the whole batch (old/ref log-probs, critic values) are
computed on the shares and gathered back into batch order on every rank
(:func:`gather_tokens`), so advantages (group normalisation, whitening) are computed on the global
batch, identically everywhere. Each of the ``num_steps_per_rollout`` mini-batches is split over
the ranks again for its optimizer step.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from miles.algo.advantages import AdvantageParams
from miles.algo.corrections import mismatch_metrics
from miles.algo.losses import kl_estimate
from miles.buffer.batching import build_train_batch, with_advantages
from miles.config import MilesConfig
from miles.orchestrate.ppo import rename_critic_metrics, value_metrics
from miles.train.flops import active_params, matmul_peak_flops, mfu
from miles.train.packing import balanced_partition, batch_to, select_sequences, sequence_lengths
from miles.train.trainer import Trainer
from miles.types import Group, TrainBatch
from miles.utils.progress import Progress


def compute_dtype(config: MilesConfig, device: torch.device) -> str:
    """The engine's (and the trainer's compute) dtype: fp32 on CPU, else ``--dtype`` (bf16 by default)."""
    m = config.model
    return "float32" if device.type == "cpu" else (m.dtype if m.dtype != "auto" else "bfloat16")


def token_index(batch: TrainBatch, seqs: Sequence[int]) -> torch.Tensor:
    """Positions in ``batch``'s packed token axis of the tokens of sequences ``seqs``, in order."""
    cu, device = batch.cu_seqlens.tolist(), batch.input_ids.device
    if not seqs:
        return torch.zeros(0, dtype=torch.long, device=device)
    return torch.cat([torch.arange(cu[i], cu[i + 1], device=device) for i in seqs])


def partition(batch: TrainBatch, world_size: int) -> list[list[int]]:
    """Each rank's sequence indices (token-balanced; every rank computes the same split)."""
    if world_size == 1:
        return [list(range(batch.num_sequences))]
    return balanced_partition(sequence_lengths(batch), world_size)


def gather_tokens(local: torch.Tensor, batch: TrainBatch, parts: list[list[int]]) -> torch.Tensor:
    """The per-token tensor of the whole ``batch`` from each rank's ``local`` share (``[T_rank, ...]``,
    the tokens of ``parts[rank]`` in order), on every rank. Collective over the default group."""
    if len(parts) == 1:
        return local
    lengths = sequence_lengths(batch)
    sizes = [sum(lengths[i] for i in p) for p in parts]
    padded = local.new_zeros((max(sizes), *local.shape[1:]))
    padded[: local.shape[0]] = local
    pieces = [torch.empty_like(padded) for _ in parts]
    dist.all_gather(pieces, padded)
    full = local.new_empty((batch.num_tokens, *local.shape[1:]))
    for piece, p, n in zip(pieces, parts, sizes):
        full[token_index(batch, p)] = piece[:n]
    return full


def reuses_own_logprobs(config: MilesConfig, steps: int) -> bool:
    """Whether the single optimizer step of a rollout can take its old log-probs from its own
    forward: no second update, no TIS/MIS, no KL reward penalty (which needs them beforehand)."""
    a = config.algo
    return steps == 1 and not (a.use_tis or a.use_mis or a.use_rollout_logprobs or a.kl_coef > 0)


@contextmanager
def forward_progress(desc: str, total_tokens: int, models: Sequence[nn.Module], show: bool) -> Iterator[None]:
    """A :class:`Progress` of the tokens that go through ``models``' forwards (each micro-batch's),
    out of ``total_tokens``, shown when ``show`` (rank 0): a long training step says how far it is.

    Counted by a forward pre-hook on each model, so the trainer needs no callback; a padding
    micro-batch or an OOM retry counts again (the count stops at the total)."""
    if not show or total_tokens <= 0:
        yield
        return
    progress = Progress(desc, total_tokens, "tokens")

    def count(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        ids = args[0] if args else kwargs.get("input_ids")
        if isinstance(ids, torch.Tensor):
            progress.advance(ids.numel())

    handles = [m.register_forward_pre_hook(count, with_kwargs=True) for m in models]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        progress.close()


def train_on(
    trainer: Trainer,
    config: MilesConfig,
    groups: list[Group],
    step: int,
    device: torch.device,
    *,
    rank: int = 0,
    world_size: int = 1,
) -> dict[str, float]:
    """Old/ref log-probs, advantages and ``num_steps_per_rollout`` optimizer steps on ``groups``.

    Returns the step's metrics (identical on every rank: the trainer reduces its own). Rank 0
    shows the step's progress: tokens through the policy's and reference model's forwards."""
    started = time.perf_counter()
    batch = batch_to(build_train_batch(groups), device)
    parts = partition(batch, world_size)
    steps = config.rollout.num_steps_per_rollout or 1
    if batch.num_sequences % steps:
        raise ValueError(
            f"{batch.num_sequences} sequences cannot be split into --num-steps-per-rollout {steps} mini-batches"
        )
    per = batch.num_sequences // steps
    if per < world_size:
        raise ValueError(
            f"a mini-batch of {per} sequences cannot give each of the {world_size} trainer ranks one: "
            "raise --rollout-batch-size x --n-samples-per-prompt or use fewer ranks"
        )
    # This rank's sequences of each optimizer step (token-balanced within each mini-batch).
    lengths = sequence_lengths(batch)
    plan: list[list[int]] = []
    for i in range(steps):
        seqs = list(range(i * per, (i + 1) * per))
        share = (
            balanced_partition([lengths[k] for k in seqs], world_size)[rank] if world_size > 1 else range(per)
        )
        plan.append([seqs[j] for j in share])
    policy = config.train.loss_type == "policy_loss"
    # One update from the weights that generated the batch: the training forward's own detached
    # log-probs are the old ones (and its mismatch metrics are pre-update), so skip a forward.
    # (Not in critic-only warm-up steps: the policy runs no training forward there.)
    trains_policy = step >= config.train.num_critic_only_steps
    on_policy = policy and reuses_own_logprobs(config, steps) and trains_policy
    local_tokens = sum(lengths[k] for k in parts[rank])
    # forwards over this rank's share before the updates: old log-probs, reference log-probs
    passes = int(policy and not on_policy) + int(policy and trainer.ref_model is not None)
    total = passes * local_tokens + (sum(lengths[k] for seqs in plan for k in seqs) if trains_policy else 0)
    models = [trainer.model] + ([trainer.ref_model] if trainer.ref_model is not None else [])
    with forward_progress(f"train step {step}", total, models, show=rank == 0):
        metrics = _train(trainer, config, groups, batch, parts, plan, on_policy, rank)
    metrics["perf/tokens_per_s_train_tokens"] = float(batch.num_tokens)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    # Every rank trained its share of the global batch in this time: per-device MFU.
    peak = matmul_peak_flops(device, getattr(torch, compute_dtype(config, device)))
    seconds = time.perf_counter() - started
    metrics["perf/mfu"] = mfu(active_params(trainer.model), batch.num_tokens // world_size, seconds, peak)
    return metrics


def _train(trainer: Trainer, config: MilesConfig, groups: list[Group], batch: TrainBatch, parts: list[list[int]],
           plan: list[list[int]], on_policy: bool, rank: int) -> dict[str, float]:  # fmt: skip
    """:func:`train_on`'s work: ``plan`` holds this rank's sequences of each optimizer step."""
    a = config.algo
    local = select_sequences(batch, parts[rank]) if len(parts) > 1 else batch
    metrics: dict[str, float] = {}
    old = ref = values = routing = None
    if config.train.loss_type == "policy_loss":
        if not on_policy:
            old = gather_tokens(trainer.compute_logprobs(local), batch, parts)
            if trainer.old_routing is not None:  # R2: the experts of this forward, replayed below
                routing = gather_tokens(trainer.old_routing, batch, parts)
            for k, v in mismatch_metrics(old, batch.rollout_logprobs, batch.loss_mask).items():
                metrics[f"train/{k}"] = float(v)
            if trainer.routing_mismatch_frac is not None:  # engine vs trainer experts (R3)
                metrics["train/routing_mismatch_frac"] = trainer.routing_mismatch_frac
                metrics["train/router_mismatch_frac"] = trainer.router_mismatch_frac
        if trainer.ref_model is not None:
            ref = gather_tokens(trainer.compute_ref_logprobs(local), batch, parts)
        kl = (
            kl_estimate(old, ref, a.kl_loss_type) * batch.loss_mask
            if (old is not None and ref is not None and a.kl_coef > 0)
            else None
        )
        params = AdvantageParams(
            group_size=len(groups[0]),
            std_normalization=not a.disable_grpo_std_normalization,
            kl_coef=a.kl_coef,
            gamma=a.gamma,
            lambd=a.lambd,
            normalize=a.normalize_advantages,
        )
        if trainer.critic is not None:
            values = gather_tokens(trainer.critic.compute_values(local), batch, parts)
        batch = with_advantages(batch, a.advantage_estimator, params, kl=kl, values=values)
        if values is not None:
            metrics.update(value_metrics(batch, values))
        if a.use_rollout_logprobs:
            old = batch.rollout_logprobs
    sums: dict[str, float] = {}
    for mine in plan:
        idx = token_index(batch, mine)
        out = trainer.train_step(
            select_sequences(batch, mine),
            old_logprobs=None if old is None else old[idx],
            ref_logprobs=None if ref is None else ref[idx],
            old_values=None if values is None else values[idx],
            on_policy=on_policy,
            old_routing=None if routing is None else routing[idx],
        )
        for key, value in out.items():
            sums[key] = sums.get(key, 0.0) + value / len(plan)
    if not on_policy:
        sums.pop("train/train_rollout_logprob_abs_diff", None)  # measured above, before any update
        if "train/routing_mismatch_frac" in metrics:
            sums.pop("train/routing_mismatch_frac", None)
            sums.pop("train/router_mismatch_frac", None)
    metrics.update(rename_critic_metrics(sums))
    return metrics


__all__ = [
    "compute_dtype",
    "forward_progress",
    "gather_tokens",
    "partition",
    "reuses_own_logprobs",
    "token_index",
    "train_on",
]
