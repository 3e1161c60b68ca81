"""The trainer's half of one RL step, run by every trainer rank on the same global batch.

The placement packs the step's groups into one :class:`TrainBatch`
(:func:`miles.buffer.batching.build_train_batch`); :func:`rl_step` does the rest, in one direction:

    scores  = score(trainer, batch)              # old log-probs (+ R2 record, routing mismatch),
                                                 # reference log-probs, critic values
    batch   = advantages(batch, scores)          # --advantage-estimator on the global batch
    metrics = optimizer_steps(trainer, batch, scores)   # --num-steps-per-rollout mini-batches

(The placement then exports the weights to the engines.) One update per rollout from the weights
that generated the batch skips the old-log-prob forward: the training forward's own log-probs are
the old ones (:func:`reuses_own_logprobs`).

Embedded (one process) it runs with one rank; under Ray each trainer actor runs it with its own
rank, in step with the others (the collectives below and inside the trainer need every rank to
make the same calls in the same order).

Data parallelism: every rank holds the same global batch and works on its token-balanced share
(:func:`partition`). Quantities the advantage estimators need over the whole batch (old/ref
log-probs, critic values) are computed on the shares and gathered back into batch order on every
rank (:func:`gather_tokens`), so advantages (group normalisation, whitening) are computed on the
global batch, identically everywhere. Each of the ``num_steps_per_rollout`` mini-batches is split
over the ranks again for its optimizer step (:func:`minibatch_plan`).
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from miles.algo import AdvantageParams, kl_estimate, mismatch_metrics, reduce_loss, with_advantages
from miles.config import AlgoConfig
from miles.train.flops import active_params, matmul_peak_flops, mfu
from miles.train.packing import balanced_partition, batch_to, select_sequences, sequence_lengths
from miles.train.routing import RoutingMismatch
from miles.train.trainer import Trainer
from miles.types import TrainBatch
from miles.utils.progress import Progress

# The trainer's critic metrics under slime's names (slime logs the critic's train step as
# ``train/critic-<key>``: ``train/critic-value_loss``, ``train/critic-value_clipfrac``, ...).
CRITIC_METRIC_NAMES = {
    "train/value_loss": "train/critic-value_loss",
    "train/value_clipfrac": "train/critic-value_clipfrac",
    "train/critic_grad_norm": "train/critic-grad_norm",
    "train/critic_lr": "train/critic-lr",
}


# ---------------------------------------------------------------------------------------------
# The global batch over the ranks
# ---------------------------------------------------------------------------------------------


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


def minibatch_plan(batch: TrainBatch, steps: int, rank: int, world_size: int) -> list[list[int]]:
    """This rank's sequences of each of the ``steps`` optimizer steps: the batch split into
    ``steps`` consecutive mini-batches, each split over the ranks (token-balanced)."""
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
    lengths = sequence_lengths(batch)
    plan: list[list[int]] = []
    for i in range(steps):
        seqs = list(range(i * per, (i + 1) * per))
        share = (
            balanced_partition([lengths[k] for k in seqs], world_size)[rank] if world_size > 1 else range(per)
        )
        plan.append([seqs[j] for j in share])
    return plan


# ---------------------------------------------------------------------------------------------
# The step's stages
# ---------------------------------------------------------------------------------------------


def reuses_own_logprobs(algo: AlgoConfig, steps: int) -> bool:
    """Whether the single optimizer step of a rollout can take its old log-probs from its own
    forward: no second update, no TIS/MIS, no KL reward penalty (which needs them beforehand)."""
    return steps == 1 and not (algo.use_tis or algo.use_mis or algo.use_rollout_logprobs or algo.kl_coef > 0)


@dataclass(frozen=True)
class BatchScores:
    """The no-grad passes of one step over the global batch, gathered into batch order on every
    rank; ``None`` where a pass did not run.

    - ``old_logprobs`` ``[T]`` and ``old_routing`` (R2's record ``[T, moe_layers, top_k]``, with
      ``--use-routing-replay``): the policy before the update (not run when the step reuses its
      own log-probs); ``mismatch``: that pass's engine/trainer routing mismatch;
    - ``ref_logprobs`` ``[T]``: the reference model's; ``values`` ``[T]``: the critic's.
    """

    old_logprobs: Tensor | None = None
    old_routing: Tensor | None = None
    mismatch: RoutingMismatch | None = None
    ref_logprobs: Tensor | None = None
    values: Tensor | None = None

    def metrics(self, batch: TrainBatch) -> dict[str, float]:
        """The old policy against the rollout's (``train/train_rollout_logprob_abs_diff``,
        ``train/mismatch_kl``, ``train/mismatch_k3_kl``) and the routing mismatch, measured
        before any update."""
        out: dict[str, float] = {}
        if self.old_logprobs is not None:
            for k, v in mismatch_metrics(self.old_logprobs, batch.rollout_logprobs, batch.loss_mask).items():
                out[f"train/{k}"] = float(v)
        if self.mismatch is not None:
            out.update({f"train/{k}": v for k, v in self.mismatch.metrics().items()})
        return out


def current_version_metrics(old_logprobs: Tensor, batch: TrainBatch, version: int) -> dict[str, float]:
    """The proximal policy (the trainer's log-probs at weight ``version``, the one step ``version``
    trains) against the engine's, over the trained tokens of the sequences the engines generated
    entirely with ``version``: ``train/current_version_logprob_abs_diff`` (0 in true on-policy mode:
    same weights, same kernels, every token's context computed by those weights) and
    ``train/current_version_token_frac`` (their share of the trained tokens). Tokens of older
    versions differ by design; decoupled PPO weighs them (docs/async.md)."""
    assert batch.rollout_versions is not None
    versions = batch.rollout_versions.to(old_logprobs.device)
    cu = batch.cu_seqlens.to(old_logprobs.device).long()
    # Every token of a sequence generated by ``version``: its oldest (held by its prompt tokens) is ``version``.
    oldest = torch.repeat_interleave(versions[cu[:-1]], cu[1:] - cu[:-1])
    trained = batch.loss_mask.to(old_logprobs.device) > 0
    current = trained & (oldest == version)
    n = int(current.sum())
    diff = (old_logprobs.float() - batch.rollout_logprobs.to(old_logprobs.device).float()).abs()
    return {
        "train/current_version_logprob_abs_diff": float(diff[current].mean()) if n else 0.0,
        "train/current_version_token_frac": n / max(int(trained.sum()), 1),
    }


def score(trainer: Trainer, batch: TrainBatch, parts: list[list[int]], *, on_policy: bool) -> BatchScores:
    """Old log-probs (unless ``on_policy``), reference log-probs and critic values of the global
    ``batch``: each rank scores its share ``parts[rank]``, gathered back into batch order."""
    local = select_sequences(batch, parts[trainer.rank]) if len(parts) > 1 else batch
    old = routing = None
    mismatch: RoutingMismatch | None = None
    if not on_policy:
        result = trainer.compute_logprobs(local)
        old = gather_tokens(result.logp, batch, parts)
        if result.routing is not None:  # R2: the experts of this forward, replayed in the steps
            routing = gather_tokens(result.routing, batch, parts)
        mismatch = result.mismatch
    ref = values = None
    if trainer.ref_model is not None:
        ref = gather_tokens(trainer.compute_ref_logprobs(local), batch, parts)
    if trainer.critic is not None:
        values = gather_tokens(trainer.critic.compute_values(local), batch, parts)
    return BatchScores(old, routing, mismatch, ref, values)


def advantage_params(algo: AlgoConfig, group_size: int) -> AdvantageParams:
    """The estimators' settings: ``--disable-grpo-std-normalization``, ``--kl-coef``, ``--gamma``,
    ``--lambd``, ``--normalize-advantages``; ``group_size``: samples per prompt in the batch."""
    return AdvantageParams(
        group_size=group_size,
        std_normalization=not algo.disable_grpo_std_normalization,
        kl_coef=algo.kl_coef,
        gamma=algo.gamma,
        lambd=algo.lambd,
        normalize=algo.normalize_advantages,
    )


def advantages(batch: TrainBatch, algo: AlgoConfig, group_size: int, scores: BatchScores) -> TrainBatch:
    """``batch`` with its advantages and returns by ``--advantage-estimator`` (GAE on the critic's
    values for PPO); the ``--kl-coef`` reward penalty is the per-token KL of the old policy to the
    reference (``--kl-loss-type``)."""
    kl = None
    if scores.old_logprobs is not None and scores.ref_logprobs is not None and algo.kl_coef > 0:
        kl = kl_estimate(scores.old_logprobs, scores.ref_logprobs, algo.kl_loss_type) * batch.loss_mask
    params = advantage_params(algo, group_size)
    return with_advantages(batch, algo.advantage_estimator, params, kl=kl, values=scores.values)


def value_metrics(batch: TrainBatch, values: Tensor) -> dict[str, float]:
    """``rollout/values``, ``rollout/returns``, ``rollout/advantages``: means over sequences of each
    sequence's mean over its trained tokens (slime's ``log_rollout_data``)."""
    mask, cu = batch.loss_mask, batch.cu_seqlens
    out = {"rollout/values": values.to(mask.device), "rollout/advantages": batch.advantages}
    if batch.returns is not None:
        out["rollout/returns"] = batch.returns
    return {k: float(reduce_loss(v.float(), mask, cu, "seq_mean")) for k, v in out.items()}


def rename_critic_metrics(metrics: dict[str, float]) -> dict[str, float]:
    return {CRITIC_METRIC_NAMES.get(k, k): v for k, v in metrics.items()}


def _rows(x: Tensor | None, idx: Tensor) -> Tensor | None:
    return None if x is None else x[idx]


def optimizer_steps(
    trainer: Trainer, batch: TrainBatch, plan: list[list[int]], scores: BatchScores, *, on_policy: bool
) -> dict[str, float]:
    """One :meth:`Trainer.train_step` per mini-batch, on this rank's sequences ``plan[i]`` of
    it, handed the rows of the scores; the steps' metrics averaged, the critic's under slime's
    names. The mismatch metrics the scoring pass measured before any update are dropped here."""
    old = scores.old_logprobs
    if old is not None and trainer.algo_config.use_rollout_logprobs:
        old = batch.rollout_logprobs  # bypass mode: the engine's log-probs are the old policy
    sums: dict[str, float] = {}
    for mine in plan:
        idx = token_index(batch, mine)
        out = trainer.train_step(
            select_sequences(batch, mine),
            old_logprobs=_rows(old, idx),
            ref_logprobs=_rows(scores.ref_logprobs, idx),
            old_values=_rows(scores.values, idx),
            on_policy=on_policy,
            old_routing=_rows(scores.old_routing, idx),
        )
        for key, value in out.items():
            sums[key] = sums.get(key, 0.0) + value / len(plan)
    if not on_policy:
        sums.pop("train/train_rollout_logprob_abs_diff", None)  # measured by the scoring pass
        if scores.mismatch is not None:
            sums.pop("train/routing_mismatch_frac", None)
            sums.pop("train/router_mismatch_frac", None)
    return rename_critic_metrics(sums)


# ---------------------------------------------------------------------------------------------
# The step
# ---------------------------------------------------------------------------------------------


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


def rl_step(trainer: Trainer, batch: TrainBatch, *, group_size: int, step: int) -> dict[str, float]:
    """Score, advantages and ``--num-steps-per-rollout`` optimizer steps on the global ``batch``
    (rollout step ``step``; ``group_size`` samples per prompt, consecutive).

    Returns the step's metrics (identical on every rank: the trainer reduces its own), with
    ``perf/tokens_per_s_train_tokens`` (the batch's tokens) and ``perf/mfu``. Rank 0 shows the
    step's progress: tokens through the policy's and reference model's forwards."""
    started = time.perf_counter()
    train, algo = trainer.train_config, trainer.algo_config
    rank, world_size = trainer.rank, trainer.dp_size
    batch = batch_to(batch, trainer.device)
    parts = partition(batch, world_size)
    plan = minibatch_plan(batch, trainer.steps_per_rollout, rank, world_size)
    policy = train.loss_type == "policy_loss"
    # Critic-only warm-up steps run no training forward of the policy.
    trains_policy = step >= train.num_critic_only_steps
    on_policy = policy and trains_policy and reuses_own_logprobs(algo, trainer.steps_per_rollout)
    lengths = sequence_lengths(batch)
    # Forwards over this rank's share before the updates (old, reference), then the training ones.
    passes = int(policy and not on_policy) + int(policy and trainer.ref_model is not None)
    total = passes * sum(lengths[k] for k in parts[rank])
    total += sum(lengths[k] for seqs in plan for k in seqs) if trains_policy else 0
    models = [trainer.model] + ([trainer.ref_model] if trainer.ref_model is not None else [])
    with forward_progress(f"train step {step}", total, models, show=rank == 0):
        metrics: dict[str, float] = {}
        scores = BatchScores()
        if policy:
            scores = score(trainer, batch, parts, on_policy=on_policy)
            metrics.update(scores.metrics(batch))
            if batch.rollout_versions is not None and scores.old_logprobs is not None:
                metrics.update(current_version_metrics(scores.old_logprobs, batch, step))
            batch = advantages(batch, algo, group_size, scores)
            if scores.values is not None:
                metrics.update(value_metrics(batch, scores.values))
        metrics.update(optimizer_steps(trainer, batch, plan, scores, on_policy=on_policy))
    metrics["perf/tokens_per_s_train_tokens"] = float(batch.num_tokens)
    if trainer.device.type == "cuda":
        torch.cuda.synchronize(trainer.device)
    # Every rank trained its share of the global batch in this time: per-device MFU.
    peak = matmul_peak_flops(trainer.device, trainer.dtype)
    seconds = time.perf_counter() - started
    metrics["perf/mfu"] = mfu(active_params(trainer.model), batch.num_tokens // world_size, seconds, peak)
    return metrics


__all__ = [
    "CRITIC_METRIC_NAMES",
    "BatchScores",
    "advantage_params",
    "advantages",
    "current_version_metrics",
    "forward_progress",
    "gather_tokens",
    "minibatch_plan",
    "optimizer_steps",
    "partition",
    "reuses_own_logprobs",
    "rl_step",
    "score",
    "token_index",
    "value_metrics",
]
