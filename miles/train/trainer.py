"""The policy trainer: log-probs, the RL/SFT loss with gradient accumulation, and the optimizer step.

``Trainer`` runs on one data-parallel rank. It receives that rank's share of the global batch
(:func:`miles.train.packing.shard_for_rank`), splits it into micro-batches, and accumulates
gradients so that the result is the gradient of the *global-batch* loss, whatever the micro-batching
and the number of ranks: each micro-batch loss is divided by the global normaliser (``loss_normalizer``
summed over the local batch, all-reduced over ranks): the ranks' losses add up to the global one.

It takes its settings whole: ``TrainConfig`` (optimizer, micro-batching, loss type and
reduction, MoE) and ``AlgoConfig`` (policy loss, KL, entropy, TIS/MIS); what is not a setting
(device, compute dtype, the rollout temperature, R3) comes as explicit arguments. Algorithms come
from the :mod:`miles.algo` registries by name; nothing here branches on an algorithm beyond "SFT
or policy loss" and "is a term switched on".
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import Tensor

from miles.algo import (
    POLICY_LOSSES,
    CorrectionParams,
    apply_correction,
    entropy_loss,
    kl_loss,
    loss_normalizer,
    mismatch_metrics,
    policy_loss_for_estimator,
    sft_loss,
)
from miles.config import AlgoConfig, TrainConfig
from miles.models import CausalLM
from miles.train import trainer_sleep
from miles.train.offload import move_module
from miles.train.oom_retry import BackwardOutOfMemoryError, run_with_oom_retry
from miles.train.optim import build_training_optimizer, policy_lr_schedule
from miles.train.packing import batch_to, select_sequences, select_tokens, sequence_lengths
from miles.train.parallelize import apply_activation_checkpointing, is_fsdp
from miles.train.router_losses import RouterLossTracker
from miles.train.routing import (
    ReplayHook,
    RoutingMismatch,
    check_routing_record,
    empty_record,
    trainer_routing_hook,
)
from miles.train.steps import aligned_bins, clipped_step, packed_logprobs
from miles.types import TrainBatch

if TYPE_CHECKING:
    from miles.train.critic import Critic

# Tokens per chunk of the LM head in a log-prob pass (the [chunk, vocab] logits of one chunk live at once).
LOGPROB_CHUNK_SIZE = 1024
# Micro-batch splits after a torch.OutOfMemoryError, per step (miles.train.oom_retry).
MAX_OOM_RETRIES = 3
# Correction metrics that are maxima, not token means: reduced with MAX across ranks.
_MAX_METRICS = frozenset({"tis_weight_max", "is_ratio_max"})


@dataclass(frozen=True)
class LogprobResult:
    """One no-grad scoring pass of the policy over a batch (:meth:`Trainer.compute_logprobs`).

    - ``logp``, ``entropy``: float32 ``[T]``, 0 at each sequence's first token;
    - ``routing``: R2's routing record with ``--use-routing-replay`` on an MoE model, else None:
      int32 ``[T, moe_layers, top_k]``, the experts this pass used for each token (R3's replayed
      ones included); hand a sub-batch's rows to :meth:`Trainer.train_step` as ``old_routing``,
      sliced like the log-probs;
    - ``mismatch``: the engine/trainer routing mismatch over every rank when the batch carries
      the engine's ``routed_experts``, else None.
    """

    logp: Tensor
    entropy: Tensor
    routing: Tensor | None = None
    mismatch: RoutingMismatch | None = None


def correction_params(algo: AlgoConfig) -> CorrectionParams:
    """The TIS/MIS bounds: ``--tis-clip``, ``--tis-clip-low``, ``--mis-token-*-bound``,
    ``--mis-veto-threshold`` and, with ``--mis-seq-level geometric``, ``--mis-seq-*-bound``."""
    geometric = algo.mis_seq_level == "geometric"
    return CorrectionParams(
        tis_clip=algo.tis_clip,
        tis_clip_low=algo.tis_clip_low,
        mis_low=algo.mis_token_lower_bound,
        mis_high=algo.mis_token_upper_bound,
        mis_seq_low=algo.mis_seq_lower_bound if geometric else None,
        mis_seq_high=algo.mis_seq_upper_bound if geometric else None,
        mis_veto=algo.mis_veto_threshold,
    )


def critic_only_steps(train: TrainConfig, steps_per_rollout: int) -> int:
    """The :meth:`Trainer.train_step` calls that train the critic only: slime counts
    ``--num-critic-only-steps`` in rollout steps, each ``steps_per_rollout`` optimizer steps."""
    return train.num_critic_only_steps * steps_per_rollout


@dataclass(frozen=True)
class _LossInputs:
    """The per-token inputs of one step's loss, aligned with its batch and sliced along with each
    micro-batch (``old``, ``weights``, ``pg_mask``, ``routing``, ``ref``), the correction's
    metrics, and the routing mismatch measured by this step's own old-log-prob forward."""

    tokens: dict[str, Tensor]
    correction_metrics: dict[str, Tensor]
    mismatch: RoutingMismatch | None


@dataclass
class _Sums:
    """What the micro-batches of one step add up; :meth:`reset` when an OOM restarts the step."""

    routing_counts: Tensor | None  # [3] engine/trainer routing counts of the training forwards
    tracker: RouterLossTracker | None  # MoE router losses and expert loads
    own_logp: Tensor | None  # on_policy: the training forwards' own log-probs [T]
    metrics: dict[str, Tensor] = field(default_factory=dict)

    def add(self, metrics: dict[str, Tensor]) -> None:
        for k, v in metrics.items():
            self.metrics[k] = self.metrics[k] + v.float() if k in self.metrics else v.float()

    def reset(self) -> None:
        self.metrics = {}
        if self.routing_counts is not None:
            self.routing_counts.zero_()
        if self.tracker is not None:
            self.tracker.reset()


class Trainer:
    """Trains ``model`` (plain or FSDP2-sharded by :func:`~miles.train.parallelize.parallelize`).

    ``train``/``algo``: the run's settings (module docstring). Explicit facts: ``device``;
    ``dtype``, the dtype the policy computes in (FSDP2's ``param_dtype``; the MFU's peak);
    ``temperature``, the rollout temperature every log-prob is scored under;
    ``steps_per_rollout``, optimizer steps per rollout step (``--num-critic-only-steps`` counts
    rollout steps); ``use_rollout_routing_replay`` (R3): forwards of a batch with
    ``routed_experts`` use the engine's experts (without it the record only feeds the mismatch
    metric). Trainer-only knobs: ``logprob_chunk_size``, ``vocab_chunk_size`` (the chunked LM
    head), ``max_oom_retries``.

    ``process_group``: the data-parallel group (default: the world when torch.distributed is
    initialised, else a single rank). Build it after ``parallelize``: the optimizer holds the
    (sharded) parameters. Without FSDP but with several ranks, gradients are all-reduced here.
    The constructor seeds torch's RNG with ``--seed`` and applies activation checkpointing with
    ``--gradient-checkpointing``.

    ``ref_model``: a frozen reference policy for the KL loss (:meth:`compute_ref_logprobs`);
    ``ref_offload=True`` keeps it on CPU and moves it to ``device`` only for its forward.
    ``critic``: a :class:`~miles.train.critic.Critic` trained in :meth:`train_step` (PPO).
    """

    def __init__(
        self,
        model: CausalLM,
        train: TrainConfig,
        algo: AlgoConfig,
        device: torch.device | str = "cpu",
        *,
        dtype: torch.dtype = torch.float32,
        temperature: float = 1.0,
        steps_per_rollout: int = 1,
        use_rollout_routing_replay: bool = False,
        process_group: dist.ProcessGroup | None = None,
        ref_model: CausalLM | None = None,
        ref_offload: bool = False,
        critic: Critic | None = None,
        logprob_chunk_size: int = LOGPROB_CHUNK_SIZE,
        vocab_chunk_size: int | None = None,
        max_oom_retries: int = MAX_OOM_RETRIES,
    ) -> None:
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if steps_per_rollout < 1 or max_oom_retries < 0:
            raise ValueError(
                f"steps_per_rollout must be >= 1 and max_oom_retries >= 0, got {steps_per_rollout}, {max_oom_retries}"
            )
        if train.use_routing_replay and algo.use_rollout_logprobs:
            raise ValueError(
                "--use-routing-replay (R2) replays the old-log-prob forward's experts: it cannot be "
                "combined with --use-rollout-logprobs, which skips that forward"
            )
        if train.num_critic_only_steps and critic is None:
            raise ValueError("num_critic_only_steps needs a critic")
        torch.manual_seed(train.seed)
        self.model, self.device, self.dtype = model, torch.device(device), dtype
        self.train_config, self.algo_config = train, algo
        self.temperature, self.steps_per_rollout = temperature, steps_per_rollout
        self.use_rollout_routing_replay = use_rollout_routing_replay
        self.logprob_chunk_size, self.vocab_chunk_size = logprob_chunk_size, vocab_chunk_size
        self.max_oom_retries = max_oom_retries
        self.critic_only_steps = critic_only_steps(train, steps_per_rollout)
        self.policy_loss = POLICY_LOSSES.get(policy_loss_for_estimator(algo.advantage_estimator))
        self.correction_params = correction_params(algo)
        self.group = process_group
        self.dp_size = dist.get_world_size(process_group) if dist.is_initialized() else 1
        self.rank = dist.get_rank(process_group) if dist.is_initialized() else 0
        self.fsdp = is_fsdp(model)
        if train.gradient_checkpointing:
            apply_activation_checkpointing(model)
        self.optimizer, self.scheduler = build_training_optimizer(
            model, train, policy_lr_schedule(train), self.device
        )
        self.ref_model, self.ref_offload = ref_model, ref_offload
        if ref_model is not None:
            ref_model.requires_grad_(False).eval()
            if ref_offload:
                move_module(ref_model, torch.device("cpu"))
        self.critic = critic
        self.step = 0  # train_step calls completed (skipped and critic-only steps included)
        self.skipped_steps = 0
        self.oom_retries = 0  # micro-batch splits after an OOM, over the trainer's life
        self.asleep = False

    # ----------------------------------------------------------------------------------------
    # Log-probs
    # ----------------------------------------------------------------------------------------

    def _forward_logprobs(
        self,
        model: CausalLM,
        mb: TrainBatch,
        need_entropy_grad: bool,
        routing_counts: Tensor | None = None,
        routing_record: Tensor | None = None,
        capture: bool = False,
    ) -> tuple[Tensor, Tensor, ReplayHook | None]:
        """``routing_counts`` ``[3]``: where to add the (token, layer) routing mismatch counts;
        ``routing_record``/``capture``: R2's record to replay / to take (``trainer_routing_hook``)."""
        hook = trainer_routing_hook(
            model,
            mb,
            rollout_routing_replay=self.use_rollout_routing_replay,
            routing_record=routing_record,
            capture=capture,
        )
        out = packed_logprobs(
            model,
            mb,
            temperature=self.temperature,
            chunk_size=self.logprob_chunk_size,
            vocab_chunk_size=self.vocab_chunk_size,
            need_entropy_grad=need_entropy_grad,
            routing=hook,
        )
        if hook is not None and routing_counts is not None and mb.routed_experts is not None:
            routing_counts += hook.counts()
        return (*out, hook)

    def _routing_mismatch(self, counts: Tensor) -> RoutingMismatch:
        """The mismatch over every rank's (token, layer) pairs (a collective)."""
        self._all_reduce(counts)
        return RoutingMismatch.from_counts(counts)

    @torch.no_grad()
    def _no_grad_logprobs(
        self, model: CausalLM, batch: TrainBatch, routing_counts: Tensor | None = None, capture: bool = False
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """``(logp, entropy, used experts [T, L, k] int32 if capture and MoE else None)``."""
        batch = batch_to(batch, self.device)
        logp = torch.zeros(batch.num_tokens, dtype=torch.float32, device=self.device)
        entropy = torch.zeros_like(logp)
        used = empty_record(model, batch.num_tokens, self.device) if capture and model.spec.is_moe else None
        token_ids = torch.arange(batch.num_tokens, device=self.device)
        for bin_ in self._bins(batch):
            # Empty bins exist only so that every FSDP rank runs the same number of forwards.
            counts = routing_counts if bin_ else None  # a padding bin repeats sequence 0
            mb = select_sequences(batch, bin_ or [0])
            lp, ent, hook = self._forward_logprobs(model, mb, False, counts, capture=used is not None)
            if bin_:
                where = select_tokens(token_ids, batch.cu_seqlens, bin_)
                logp[where], entropy[where] = lp, ent
                if used is not None and hook is not None:
                    used[where] = hook.captured()
        if is_fsdp(model):
            model.reshard()  # type: ignore[operator]  # the root stays gathered after a forward
        return logp, entropy, used

    def compute_logprobs(self, batch: TrainBatch) -> LogprobResult:
        """The policy's log-probs and entropies of this rank's batch (no grad, micro-batched as in
        training), with R2's routing record and the routing mismatch (:class:`LogprobResult`).
        Collective when the batch has ``routed_experts`` (the mismatch is reduced over ranks)."""
        counts = torch.zeros(3, device=self.device)
        logp, entropy, routing = self._no_grad_logprobs(
            self.model, batch, counts, capture=self.train_config.use_routing_replay
        )
        mismatch = None if batch.routed_experts is None else self._routing_mismatch(counts)
        return LogprobResult(logp, entropy, routing, mismatch)

    def compute_ref_logprobs(self, batch: TrainBatch) -> Tensor:
        """Float32 log-prob ``[T]`` under the frozen reference model (with ``ref_offload``: moved
        to the device for this forward only)."""
        if self.ref_model is None:
            raise ValueError("compute_ref_logprobs needs a Trainer built with ref_model=")
        if self.ref_offload:
            move_module(self.ref_model, self.device)
        try:
            return self._no_grad_logprobs(self.ref_model, batch)[0]
        finally:
            if self.ref_offload:
                move_module(self.ref_model, torch.device("cpu"))

    # ----------------------------------------------------------------------------------------
    # Gradient accumulation
    # ----------------------------------------------------------------------------------------

    def _bins(self, batch: TrainBatch) -> list[list[int]]:
        return aligned_bins(
            batch,
            micro_batch_size=self.train_config.micro_batch_size,
            max_tokens=self.train_config.micro_batch_max_tokens,
            dp_size=self.dp_size,
            group=self.group,
            device=self.device,
            vocab_size=self.model.spec.vocab_size,
        )

    def accumulate_gradients(
        self,
        batch: TrainBatch,
        old_logprobs: Tensor | None = None,
        ref_logprobs: Tensor | None = None,
        *,
        on_policy: bool = False,
        old_routing: Tensor | None = None,
    ) -> dict[str, float]:
        """Forward/backward over the micro-batches of ``batch``; ``.grad`` then holds the gradient
        of the global-batch loss (all ranks). No optimizer step. Returns metrics reduced over
        ranks, without the ``train/`` prefix.

        ``old_logprobs``/``ref_logprobs``: ``[T]`` float, aligned with ``batch.input_ids``. With
        ``--use-kl-loss``, no ``ref_logprobs`` and a ``ref_model``, the reference model scores them.

        ``on_policy``: the current weights are the old policy (the first and only update on this
        batch), so each micro-batch's own log-probs, detached, are the old ones: the separate
        old-log-prob forward is skipped and the same numbers come out. Needs no TIS/MIS, no
        ``--use-rollout-logprobs`` and no ``old_logprobs``.

        A ``torch.OutOfMemoryError`` in a micro-batch splits it in two (by sequences) and retries
        (:mod:`miles.train.oom_retry`), at most ``max_oom_retries`` times per call (metric
        ``oom_retries``). The split leaves the result unchanged: every micro-batch is normalised
        by the global normaliser.

        With ``batch.routed_experts``, metrics ``routing_mismatch_frac`` and
        ``router_mismatch_frac`` (:class:`~miles.train.routing.RoutingMismatch`): from the
        old-log-prob forward when this call runs it, else from the training forwards.

        ``old_routing`` (R2, ``--use-routing-replay``): int32 ``[T, moe_layers, top_k]`` aligned
        with ``batch`` (rows of :attr:`LogprobResult.routing`), replayed in every training forward
        and its recomputation; required with ``old_logprobs`` of an MoE model, taken from this
        call's own old-log-prob forward otherwise.
        """
        batch = batch_to(batch, self.device)
        inputs = self._loss_inputs(batch, old_logprobs, ref_logprobs, on_policy, old_routing)
        # One normaliser for every micro-batch of every rank: micro-batch losses add up to the
        # global reduction. It counts the input mask, so MIS-rejected tokens still dilute the mean.
        reduction = self.train_config.loss_reduction
        normalizer = loss_normalizer(reduction, batch.loss_mask, batch.cu_seqlens).to(
            self.device, torch.float32
        )
        self._all_reduce(normalizer)
        measure = batch.routed_experts is not None and inputs.mismatch is None
        sums = _Sums(
            routing_counts=torch.zeros(3, device=self.device) if measure else None,
            tracker=RouterLossTracker.for_model(
                self.model, self.train_config, batch.num_tokens, self._all_reduce
            ),
            own_logp=torch.zeros(batch.num_tokens, device=self.device) if on_policy else None,
        )

        def restart() -> None:  # an OOM in a backward: part of a micro-batch's gradient may be in
            self.model.zero_grad(set_to_none=True)
            sums.reset()

        retries = run_with_oom_retry(
            self._bins(batch),
            lambda bin_: self._run_micro_batch(batch, bin_, inputs, normalizer, sums),
            restart=restart,
            lengths=sequence_lengths(batch),
            max_retries=self.max_oom_retries,
            fsdp=self.fsdp,
        )
        self.oom_retries += retries
        sums.metrics["oom_retries"] = torch.tensor(float(retries), device=self.device)
        if self.dp_size > 1 and not self.fsdp:
            self._all_reduce_grads()
        return self._step_metrics(batch, inputs, sums)

    def _loss_inputs(
        self,
        batch: TrainBatch,
        old_logprobs: Tensor | None,
        ref_logprobs: Tensor | None,
        on_policy: bool,
        old_routing: Tensor | None,
    ) -> _LossInputs:
        """Where the old log-probs come from (the training forwards themselves with ``on_policy``;
        the argument; the engine's with ``--use-rollout-logprobs``; else a no-grad forward run
        here), the TIS/MIS weights and mask against the rollout's log-probs, R2's routing record
        and the reference log-probs of the KL loss."""
        train, algo = self.train_config, self.algo_config
        sft = train.loss_type == "sft_loss"
        if on_policy and (
            sft or old_logprobs is not None or algo.correction != "none" or algo.use_rollout_logprobs
        ):
            raise ValueError(
                "on_policy reuses the step's own log-probs as the old ones: it needs the policy loss, "
                "correction 'none', no use_rollout_logprobs and no old_logprobs"
            )
        tokens: dict[str, Tensor] = {}
        correction_metrics: dict[str, Tensor] = {}
        mismatch: RoutingMismatch | None = None  # measured by an old-log-prob forward of this call
        if on_policy:
            tokens["weights"] = torch.ones_like(batch.loss_mask, dtype=torch.float32)
            tokens["pg_mask"] = batch.loss_mask.detach().clone()
        elif not sft:
            if old_logprobs is None:
                if algo.use_rollout_logprobs:
                    old_logprobs = batch.rollout_logprobs
                else:
                    old = self.compute_logprobs(batch)
                    old_logprobs, old_routing, mismatch = old.logp, old.routing, old.mismatch
            elif train.use_routing_replay and old_routing is None and self.model.spec.is_moe:
                raise ValueError(
                    "--use-routing-replay (R2) with old_logprobs needs old_routing: the rows of the "
                    "routing record that compute_logprobs returned with those log-probs"
                )
            tokens["old"] = old_logprobs.to(self.device, torch.float32)
            corr = apply_correction(
                algo.correction,
                tokens["old"],
                batch.rollout_logprobs,
                batch.loss_mask,
                batch.cu_seqlens,
                self.correction_params,
            )
            tokens["weights"], tokens["pg_mask"], correction_metrics = (
                corr.weights,
                corr.loss_mask,
                corr.metrics,
            )
        if train.use_routing_replay and old_routing is not None:
            tokens["routing"] = check_routing_record(old_routing.to(self.device), batch.num_tokens)
        if algo.use_kl_loss:
            if ref_logprobs is None and self.ref_model is not None:
                ref_logprobs = self.compute_ref_logprobs(batch)
            if ref_logprobs is None:
                raise ValueError("use_kl_loss needs ref_logprobs or a Trainer built with ref_model=")
            tokens["ref"] = ref_logprobs.to(self.device, torch.float32)
        return _LossInputs(tokens, correction_metrics, mismatch)

    def _run_micro_batch(
        self, batch: TrainBatch, bin_: list[int], inputs: _LossInputs, normalizer: Tensor, sums: _Sums
    ) -> None:
        """Forward and backward of the micro-batch of sequences ``bin_``; its metrics join ``sums``.

        An empty ``bin_`` is a padding micro-batch: it runs sequence 0 with a zero loss mask (the
        collectives of every FSDP rank must match) and contributes nothing. An OOM in the backward
        is raised as :class:`~miles.train.oom_retry.BackwardOutOfMemoryError`."""
        seqs = bin_ or [0]
        mb = select_sequences(batch, seqs)
        tok = {k: select_tokens(v, batch.cu_seqlens, seqs) for k, v in inputs.tokens.items()}
        if not bin_:
            mb = dataclasses.replace(mb, loss_mask=torch.zeros_like(mb.loss_mask))
            tok = {k: torch.zeros_like(v) if k == "pg_mask" else v for k, v in tok.items()}
        loss, metrics, logp = self._micro_batch_loss(
            mb, tok, normalizer, sums.routing_counts if bin_ else None, sums.tracker, bool(bin_)
        )
        if sums.own_logp is not None and bin_:
            token_ids = torch.arange(batch.num_tokens, device=self.device)
            sums.own_logp[select_tokens(token_ids, batch.cu_seqlens, bin_)] = logp
        # FSDP2 averages gradients over ranks; our per-rank losses are already global shares.
        scale = (float(self.dp_size) if self.fsdp else 1.0) if bin_ else 0.0
        try:
            (loss * scale).backward()
        except torch.OutOfMemoryError as e:
            raise BackwardOutOfMemoryError(str(e)) from e
        metrics["loss"] = loss.detach()
        if bin_:
            sums.add(metrics)

    def _micro_batch_loss(
        self,
        mb: TrainBatch,
        tok: dict[str, Tensor],
        normalizer: Tensor,
        routing_counts: Tensor | None = None,
        tracker: RouterLossTracker | None = None,
        real: bool = True,
    ) -> tuple[Tensor, dict[str, Tensor], Tensor]:
        """``(loss, metrics, log-probs detached)`` of one micro-batch: the policy loss (or the SFT
        loss), the KL loss, the entropy bonus and the MoE router losses."""
        train, algo = self.train_config, self.algo_config
        red, norm = train.loss_reduction, normalizer
        with tracker.forward(count=real) if tracker is not None else contextlib.nullcontext():
            logp, entropy, _ = self._forward_logprobs(
                self.model, mb, algo.entropy_coef != 0, routing_counts, tok.get("routing")
            )
        if train.loss_type == "sft_loss":
            loss, metrics = sft_loss(logp, mb.loss_mask, mb.cu_seqlens, reduction=red, normalizer=norm)
        else:
            loss, metrics = self.policy_loss(
                logp,
                tok["old"] if "old" in tok else logp.detach(),
                mb.advantages,
                tok["pg_mask"],
                mb.cu_seqlens,
                eps_clip=algo.eps_clip,
                eps_clip_high=algo.eps_clip_high,
                eps_clip_c=algo.eps_clip_c,
                weights=tok["weights"],
                reduction=red,
                normalizer=norm,
            )
        if algo.use_kl_loss:
            term, m = kl_loss(
                logp,
                tok["ref"],
                mb.loss_mask,
                mb.cu_seqlens,
                coef=algo.kl_loss_coef,
                kind=algo.kl_loss_type,
                reduction=red,
                normalizer=norm,
            )
            loss, metrics = loss + term, {**metrics, **m}
        # The entropy is always reported; it joins the loss only with a non-zero coefficient.
        coef = algo.entropy_coef
        term, m = entropy_loss(
            entropy, mb.loss_mask, mb.cu_seqlens, coef=coef, reduction=red, normalizer=norm
        )
        if coef != 0:
            loss = loss + term
        if tracker is not None:  # MoE router losses (with a coefficient > 0) and expert loads
            loss, m = tracker.finish(loss, mb.num_tokens, {**metrics, **m})
        return loss, {**metrics, **m}, logp.detach()

    def _step_metrics(self, batch: TrainBatch, inputs: _LossInputs, sums: _Sums) -> dict[str, float]:
        """The step's metrics reduced over ranks: loss terms, correction (or, ``on_policy``, the
        mismatch of the training forwards' own log-probs), expert loads, routing mismatch."""
        correction_metrics = inputs.correction_metrics
        if sums.own_logp is not None:  # what correction "none" reports, from the pre-update forwards
            correction_metrics = mismatch_metrics(sums.own_logp, batch.rollout_logprobs, batch.loss_mask)
        out = self._reduce_metrics(sums.metrics, correction_metrics, batch)
        if sums.tracker is not None:
            out.update(sums.tracker.load_metrics(self._all_reduce))
        mismatch = inputs.mismatch
        if sums.routing_counts is not None:
            mismatch = self._routing_mismatch(sums.routing_counts)
        if mismatch is not None:
            out.update(mismatch.metrics())
        return out

    def _all_reduce(self, t: Tensor, op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM) -> None:
        if self.dp_size > 1:
            dist.all_reduce(t, op=op, group=self.group)

    def _all_reduce_grads(self) -> None:
        for p in self.model.parameters():
            if p.grad is not None:
                self._all_reduce(p.grad)

    def _reduce_metrics(
        self, sums: dict[str, Tensor], corr_metrics: dict[str, Tensor], batch: TrainBatch
    ) -> dict[str, float]:
        """Loss metrics are global shares (sum over ranks); correction metrics are local token
        means (averaged over ranks, weighted by trained tokens) or maxima."""
        num_tokens = batch.loss_mask.float().sum()
        mean_keys = sorted(k for k in corr_metrics if k not in _MAX_METRICS)
        max_keys = sorted(k for k in corr_metrics if k in _MAX_METRICS)
        sum_keys = sorted(sums)
        packed = torch.stack(
            [sums[k].float() for k in sum_keys]
            + [corr_metrics[k].float() * num_tokens for k in mean_keys]
            + [num_tokens]
        )
        self._all_reduce(packed)
        out = {k: float(v) for k, v in zip(sum_keys, packed.tolist())}
        total_tokens = max(float(packed[-1]), 1.0)
        out.update({k: float(packed[len(sum_keys) + i]) / total_tokens for i, k in enumerate(mean_keys)})
        if max_keys:
            maxima = torch.stack([corr_metrics[k].float() for k in max_keys])
            self._all_reduce(maxima, dist.ReduceOp.MAX)
            out.update({k: float(v) for k, v in zip(max_keys, maxima.tolist())})
        return out

    # ----------------------------------------------------------------------------------------
    # Optimizer step
    # ----------------------------------------------------------------------------------------

    def clip_and_step(self, loss: float) -> dict[str, float]:
        """Clip gradients, then step the optimizer and the LR schedule unless ``loss`` or the
        gradient norm is NaN/inf (then the step is skipped). Gradients are zeroed either way."""
        norm, lr, stepped = clipped_step(
            self.model,
            self.optimizer,
            self.scheduler,
            clip_grad=self.train_config.clip_grad,
            loss=loss,
            device=self.device,
        )
        self.skipped_steps += 0 if stepped else 1
        return {"grad_norm": norm, "lr": lr, "skipped_steps": 0.0 if stepped else 1.0}

    def train_step(
        self,
        batch: TrainBatch,
        old_logprobs: Tensor | None = None,
        ref_logprobs: Tensor | None = None,
        old_values: Tensor | None = None,
        *,
        on_policy: bool = False,
        old_routing: Tensor | None = None,
    ) -> dict[str, float]:
        """One optimizer step on this rank's share of the global batch; slime-named metrics.

        Metrics (``train/`` prefix): ``loss``, ``pg_loss``, ``pg_clipfrac``, ``ppo_kl`` (policy
        loss) or ``sft_loss``, ``entropy``, ``kl_loss`` (with ``--use-kl-loss``), the correction's
        (``train_rollout_logprob_abs_diff``, ``mismatch_kl``, ``mismatch_k3_kl``, ``tis_*``,
        ``mis_*``), ``routing_mismatch_frac`` and ``router_mismatch_frac`` (batches with
        ``routed_experts``), ``grad_norm``, ``lr`` (the LR this step used), ``skipped_steps`` (1
        when a NaN/inf loss or gradient norm skipped the update) and ``oom_retries``.

        With a critic, it trains first on ``batch.returns`` (``value_loss``, ``value_clipfrac``,
        ``critic_grad_norm``, ``critic_lr``); during the first :attr:`critic_only_steps` calls
        the policy is not updated (``critic_only`` is 1). ``old_values`` ``[T]`` (the critic's
        values at rollout time) anchor the value clip; default: the critic's current values.
        ``on_policy``, ``old_routing`` (R2): see :meth:`accumulate_gradients`.
        """
        if self.asleep:
            raise RuntimeError("the trainer is asleep: call wake_up() before train_step()")
        out: dict[str, float] = {}
        if self.critic is not None:
            out.update(self.critic.train_step(batch, old_values))
        if self.step < self.critic_only_steps:
            self.step += 1
            return {f"train/{k}": v for k, v in {**out, "critic_only": 1.0}.items()}
        self.model.train()
        metrics = self.accumulate_gradients(
            batch, old_logprobs, ref_logprobs, on_policy=on_policy, old_routing=old_routing
        )
        metrics.update(self.clip_and_step(metrics["loss"]))
        self.step += 1
        if self.critic is not None:
            metrics["critic_only"] = 0.0
        return {f"train/{k}": v for k, v in {**out, **metrics}.items()}

    # ----------------------------------------------------------------------------------------
    # Offload (colocated mode: the engine takes the device while the trainer sleeps)
    # ----------------------------------------------------------------------------------------

    def sleep(self) -> dict[str, float]:
        """Free the device: :func:`miles.train.trainer_sleep.sleep`. Idempotent."""
        return trainer_sleep.sleep(self)

    def wake_up(self) -> None:
        """Move everything :meth:`sleep` offloaded back to the device. Idempotent."""
        trainer_sleep.wake_up(self)
