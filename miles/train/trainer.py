"""The policy trainer: log-probs, the RL/SFT loss with gradient accumulation, and the optimizer step.

``Trainer`` runs on one data-parallel rank. It receives that rank's share of the global batch
(:func:`miles.train.packing.shard_for_rank`), splits it into micro-batches, and accumulates
gradients so that the result is the gradient of the *global-batch* loss, whatever the micro-batching
and the number of ranks: each micro-batch loss is divided by the global normaliser (``loss_normalizer``
summed over the local batch, all-reduced over ranks): the ranks' losses add up to the global one.

Algorithms come from the :mod:`miles.algo` registries by name; nothing here branches on an
algorithm beyond "SFT or policy loss" and "is a term switched on".
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
    CORRECTIONS,
    KL_ESTIMATORS,
    LOSS_REDUCTIONS,
    POLICY_LOSSES,
    CorrectionParams,
    apply_correction,
    entropy_loss,
    kl_loss,
    loss_normalizer,
    mismatch_metrics,
    sft_loss,
)
from miles.models import CausalLM
from miles.train import trainer_sleep
from miles.train.expert_parallel import clipped_step
from miles.train.offload import move_module
from miles.train.optim import LRSchedule, build_training_optimizer
from miles.train.packing import batch_to, select_sequences, select_tokens
from miles.train.parallelize import apply_activation_checkpointing, is_fsdp
from miles.train.router_losses import RouterLossTracker
from miles.train.routing import ReplayHook, check_own_record, empty_record, trainer_routing_hook
from miles.train.steps import aligned_bins, oom_halves, packed_logprobs
from miles.types import TrainBatch

if TYPE_CHECKING:
    from miles.train.critic import Critic

LOSS_TYPES = ("policy_loss", "sft_loss")
# Correction metrics that are maxima, not token means: reduced with MAX across ranks.
_MAX_METRICS = frozenset({"tis_weight_max", "is_ratio_max"})


@dataclass(frozen=True)
class TrainerConfig:
    """Everything the trainer needs (slime flag in brackets where one exists).

    Micro-batching: ``max_tokens_per_gpu`` set -> dynamic token-budget bins
    (``--use-dynamic-batch-size --max-tokens-per-gpu``), else ``micro_batch_size`` sequences.
    ``use_rollout_logprobs``: without ``old_logprobs``, use the engine's log-probs as the old
    policy (bypass mode) instead of recomputing them with a forward pass.
    """

    lr: float = 1e-6
    min_lr: float = 0.0
    lr_warmup_steps: int = 0
    lr_decay_style: str = "constant"  # constant | linear | cosine  [--lr-decay-style]
    lr_decay_steps: int | None = None
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.98
    adam_eps: float = 1e-8
    clip_grad: float = 1.0  # 0 disables clipping (the norm is still reported)
    micro_batch_size: int = 1
    max_tokens_per_gpu: int | None = None
    loss_type: str = "policy_loss"  # policy_loss | sft_loss  [--loss-type]
    policy_loss: str = "ppo"  # a POLICY_LOSSES name
    reduction: str = "token_mean"  # a LOSS_REDUCTIONS name
    reduction_max_len: int | None = None  # Dr.GRPO constant length (seq_mean_token_sum only)
    eps_clip: float = 0.2
    eps_clip_high: float | None = None
    eps_clip_c: float | None = None
    use_kl_loss: bool = False
    kl_loss_coef: float = 0.0
    kl_loss_type: str = "k1"
    entropy_coef: float = 0.0
    correction: str = "none"  # a CORRECTIONS name (--use-tis -> tis)
    correction_params: CorrectionParams = field(default_factory=CorrectionParams)
    use_rollout_logprobs: bool = False
    # Rollout routing replay (R3): forwards of a batch with routed_experts use the engine's
    # experts [--use-rollout-routing-replay]. Without it the record only feeds the mismatch metric.
    routing_replay: bool = False
    # Routing replay (R2): compute_logprobs keeps the experts its forward used (old_routing) and
    # the training forwards of those tokens replay them [--use-routing-replay]. R3 wins if both.
    own_routing_replay: bool = False
    moe_aux_loss_coef: float = 0.0  # MoE load balancing, see router_losses [--moe-aux-loss-coeff]
    moe_z_loss_coef: float = 0.0  # MoE router z-loss [--moe-z-loss-coeff]
    temperature: float = 1.0  # the rollout temperature: log-probs are scored under it
    gradient_checkpointing: bool = False
    optimizer_cpu_offload: bool = False  # AdamW state + fp32 masters in CPU memory [--optimizer-cpu-offload]
    logprob_chunk_size: int = 1024
    vocab_chunk_size: int | None = None
    seed: int = 1234
    max_oom_retries: int = 3  # micro-batch splits after torch.OutOfMemoryError, per step
    num_critic_only_steps: int = 0  # PPO: train only the critic for the first N steps

    def __post_init__(self) -> None:
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {', '.join(LOSS_TYPES)}, got {self.loss_type!r}")
        POLICY_LOSSES.get(self.policy_loss)  # raise UnknownNameError early, naming the choices
        LOSS_REDUCTIONS.get(self.reduction)
        KL_ESTIMATORS.get(self.kl_loss_type)
        CORRECTIONS.get(self.correction)
        if self.micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be >= 1, got {self.micro_batch_size}")
        if self.max_tokens_per_gpu is not None and self.max_tokens_per_gpu < 1:
            raise ValueError(f"max_tokens_per_gpu must be >= 1, got {self.max_tokens_per_gpu}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.max_oom_retries < 0 or self.num_critic_only_steps < 0:
            raise ValueError("max_oom_retries and num_critic_only_steps must be >= 0")
        if self.own_routing_replay and self.use_rollout_logprobs:
            raise ValueError(
                "own_routing_replay (R2) needs the old-log-prob forward: no use_rollout_logprobs"
            )

    def lr_schedule(self) -> LRSchedule:
        return LRSchedule(
            self.lr, self.min_lr, self.lr_warmup_steps, self.lr_decay_style, self.lr_decay_steps
        )


class Trainer:
    """Trains ``model`` (plain or FSDP2-sharded by :func:`~miles.train.parallelize.parallelize`).

    ``process_group``: the data-parallel group (default: the world when torch.distributed is
    initialised, else a single rank). Build it after ``parallelize``: the optimizer holds the
    (sharded) parameters. Without FSDP but with several ranks, gradients are all-reduced here.
    The constructor seeds torch's RNG with ``config.seed`` and applies activation checkpointing
    when ``config.gradient_checkpointing`` is set.

    ``ref_model``: a frozen reference policy for the KL loss (:meth:`compute_ref_logprobs`);
    ``ref_offload=True`` keeps it on CPU and moves it to ``device`` only for its forward.
    ``critic``: a :class:`~miles.train.critic.Critic` trained in :meth:`train_step` (PPO).
    """

    def __init__(
        self,
        model: CausalLM,
        config: TrainerConfig,
        device: torch.device | str = "cpu",
        *,
        process_group: dist.ProcessGroup | None = None,
        ref_model: CausalLM | None = None,
        ref_offload: bool = False,
        critic: Critic | None = None,
    ) -> None:
        torch.manual_seed(config.seed)
        self.model, self.config, self.device = model, config, torch.device(device)
        self.group = process_group
        self.dp_size = dist.get_world_size(process_group) if dist.is_initialized() else 1
        self.fsdp = is_fsdp(model)
        if config.gradient_checkpointing:
            apply_activation_checkpointing(model)
        self.optimizer, self.scheduler = build_training_optimizer(model, config, self.device)
        self.ref_model, self.ref_offload = ref_model, ref_offload
        if ref_model is not None:
            ref_model.requires_grad_(False).eval()
            if ref_offload:
                move_module(ref_model, torch.device("cpu"))
        if config.num_critic_only_steps and critic is None:
            raise ValueError("num_critic_only_steps needs a critic")
        self.critic = critic
        self.step = 0  # train_step calls completed (skipped and critic-only steps included)
        self.skipped_steps = 0
        self.oom_retries = 0  # micro-batch splits after an OOM, over the trainer's life
        self.asleep = False
        # train/routing_mismatch_frac of the last compute_logprobs on a batch with routed_experts.
        self.routing_mismatch_frac: float | None = None
        self.router_mismatch_frac = 0.0  # the router's own top-k against the record (set with the above)
        # R2: int32 [T, moe_layers, top_k] experts of the last compute_logprobs' batch, or None.
        self.old_routing: Tensor | None = None

    # ----------------------------------------------------------------------------------------
    # Log-probs
    # ----------------------------------------------------------------------------------------

    def _forward_logprobs(
        self,
        model: CausalLM,
        mb: TrainBatch,
        need_entropy_grad: bool,
        routing_counts: Tensor | None = None,
        own_routing: Tensor | None = None,
        capture: bool = False,
    ) -> tuple[Tensor, Tensor, ReplayHook | None]:
        """``routing_counts`` ``[2]``: where to add the (token, layer) routing mismatch counts;
        ``own_routing``/``capture``: R2's record to replay / to take (``trainer_routing_hook``)."""
        cfg = self.config
        hook = trainer_routing_hook(
            model, mb, rollout_replay=cfg.routing_replay, own_record=own_routing, capture=capture
        )
        out = packed_logprobs(
            model,
            mb,
            temperature=cfg.temperature,
            chunk_size=cfg.logprob_chunk_size,
            vocab_chunk_size=cfg.vocab_chunk_size,
            need_entropy_grad=need_entropy_grad,
            routing=hook,
        )
        if hook is not None and routing_counts is not None and mb.routed_experts is not None:
            routing_counts += hook.counts()
        return (*out, hook)

    def _routing_frac(self, counts: Tensor) -> float:
        """Used-experts mismatch over every rank's (token, layer) pairs; the router's own: attribute."""
        self._all_reduce(counts)
        self.router_mismatch_frac = float(counts[2]) / max(float(counts[1]), 1.0)
        return float(counts[0]) / max(float(counts[1]), 1.0)

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

    def compute_logprobs_and_entropy(self, batch: TrainBatch) -> tuple[Tensor, Tensor]:
        """Float32 ``(logp [T], entropy [T])`` of this rank's batch, micro-batched as in training.

        With ``batch.routed_experts`` it also sets ``routing_mismatch_frac`` (else ``None``). With
        ``own_routing_replay`` (R2) it sets ``old_routing`` (else ``None``): int32 ``[T, moe_layers,
        top_k]``, the experts this forward used for each token (R3's replayed ones included); hand
        the rows of a sub-batch to :meth:`train_step` as ``old_routing``, like the log-probs."""
        counts = torch.zeros(3, device=self.device)
        logp, entropy, self.old_routing = self._no_grad_logprobs(
            self.model, batch, counts, self.config.own_routing_replay
        )
        self.routing_mismatch_frac = None if batch.routed_experts is None else self._routing_frac(counts)
        return logp, entropy

    def compute_logprobs(self, batch: TrainBatch) -> Tensor:
        """Float32 log-prob ``[T]`` of each token given its prefix (0 at each sequence's first token)."""
        return self.compute_logprobs_and_entropy(batch)[0]

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
    # Training
    # ----------------------------------------------------------------------------------------

    def _bins(self, batch: TrainBatch) -> list[list[int]]:
        return aligned_bins(
            batch,
            micro_batch_size=self.config.micro_batch_size,
            max_tokens=self.config.max_tokens_per_gpu,
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
        ``use_kl_loss``, no ``ref_logprobs`` and a ``ref_model``, the reference model scores them.

        ``on_policy``: the current weights are the old policy (the first and only update on this
        batch), so each micro-batch's own log-probs, detached, are the old ones: the separate
        old-log-prob forward is skipped (about a quarter of the step's compute) and the same
        numbers come out. Needs ``correction == "none"`` and no ``old_logprobs``.

        A ``torch.OutOfMemoryError`` in a micro-batch splits it in two (by sequences) and retries,
        at most ``config.max_oom_retries`` times per call (metric ``oom_retries``). The split
        leaves the result unchanged: every micro-batch is normalised by the global normaliser.

        With ``batch.routed_experts``, metric ``routing_mismatch_frac``: from the old-log-prob
        forward when this call runs it, else from the training forwards.

        ``old_routing`` (R2, ``own_routing_replay``): int32 ``[T, moe_layers, top_k]`` aligned with
        ``batch`` (rows of :attr:`old_routing`), replayed in every training forward and its
        recomputation; required with ``old_logprobs`` of an MoE model, taken from this call's own
        old-log-prob forward otherwise.
        """
        cfg = self.config
        batch = batch_to(batch, self.device)
        sft = cfg.loss_type == "sft_loss"
        tokens: dict[str, Tensor] = {}  # token tensors sliced along with the batch
        corr_metrics: dict[str, Tensor] = {}
        if on_policy and (
            sft or old_logprobs is not None or cfg.correction != "none" or cfg.use_rollout_logprobs
        ):
            raise ValueError(
                "on_policy reuses the step's own log-probs as the old ones: it needs the policy loss, "
                "correction 'none', no use_rollout_logprobs and no old_logprobs"
            )
        own_logp = torch.zeros(batch.num_tokens, device=self.device) if on_policy else None
        routing_frac: float | None = None  # measured by an old-log-prob forward of this call
        token_ids = torch.arange(batch.num_tokens, device=self.device)
        if on_policy:
            tokens["weights"] = torch.ones_like(batch.loss_mask, dtype=torch.float32)
            tokens["pg_mask"] = batch.loss_mask.detach().clone()
        elif not sft:
            if old_logprobs is None:
                if cfg.use_rollout_logprobs:
                    old_logprobs = batch.rollout_logprobs
                else:
                    old_logprobs = self.compute_logprobs(batch)
                    routing_frac, old_routing = self.routing_mismatch_frac, self.old_routing
            elif cfg.own_routing_replay and old_routing is None and self.model.spec.is_moe:
                raise ValueError(
                    "own_routing_replay (R2) with old_logprobs needs old_routing: the rows of "
                    "trainer.old_routing that compute_logprobs set with those log-probs"
                )
            tokens["old"] = old_logprobs.to(self.device, torch.float32)
            corr = apply_correction(
                cfg.correction,
                tokens["old"],
                batch.rollout_logprobs,
                batch.loss_mask,
                batch.cu_seqlens,
                cfg.correction_params,
            )
            tokens["weights"], tokens["pg_mask"], corr_metrics = corr.weights, corr.loss_mask, corr.metrics
        if cfg.own_routing_replay and old_routing is not None:
            tokens["routing"] = check_own_record(old_routing.to(self.device), batch.num_tokens)
        if cfg.use_kl_loss:
            if ref_logprobs is None and self.ref_model is not None:
                ref_logprobs = self.compute_ref_logprobs(batch)
            if ref_logprobs is None:
                raise ValueError("use_kl_loss needs ref_logprobs or a Trainer built with ref_model=")
            tokens["ref"] = ref_logprobs.to(self.device, torch.float32)

        # One normaliser for every micro-batch of every rank: micro-batch losses add up to the
        # global reduction. It counts the input mask, so MIS-rejected tokens still dilute the mean.
        normalizer = loss_normalizer(cfg.reduction, batch.loss_mask, batch.cu_seqlens, cfg.reduction_max_len)
        normalizer = normalizer.to(self.device, torch.float32)
        self._all_reduce(normalizer)
        # FSDP2 averages gradients over ranks; our per-rank losses are already global shares.
        grad_scale = float(self.dp_size) if self.fsdp else 1.0

        plan, retries, i = self._bins(batch), 0, 0
        sums: dict[str, Tensor] = {}
        measure = batch.routed_experts is not None and routing_frac is None
        routing_counts = torch.zeros(3, device=self.device) if measure else None
        tracker = RouterLossTracker.for_model(self.model, cfg, batch.num_tokens, self._all_reduce)
        while i < len(plan):
            bin_ = plan[i]
            mb = select_sequences(batch, bin_ or [0])
            tok = {k: select_tokens(v, batch.cu_seqlens, bin_ or [0]) for k, v in tokens.items()}
            if not bin_:  # a padding micro-batch: runs the collectives, contributes nothing
                mb = dataclasses.replace(mb, loss_mask=torch.zeros_like(mb.loss_mask))
                tok = {k: torch.zeros_like(v) if k == "pg_mask" else v for k, v in tok.items()}
            halves: list[list[int]] | None = None
            in_backward = False
            try:
                loss, metrics, mb_logp = self._micro_batch_loss(
                    mb, tok, normalizer, sft, routing_counts if bin_ else None, tracker, bool(bin_)
                )
                if own_logp is not None and bin_:
                    own_logp[select_tokens(token_ids, batch.cu_seqlens, bin_)] = mb_logp
                in_backward = True
                (loss * (grad_scale if bin_ else 0.0)).backward()
            except torch.OutOfMemoryError as e:
                halves = oom_halves(bin_, mb.num_tokens, retries, cfg.max_oom_retries, self.fsdp, e)
            if halves is not None:  # outside the except block: the traceback's frames are gone
                del mb, tok
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                plan, retries = plan[:i] + halves + plan[i + 1 :], retries + 1
                if in_backward:
                    # Part of this micro-batch's gradient may already be accumulated: start over.
                    self.model.zero_grad(set_to_none=True)
                    sums, i = {}, 0
                    if routing_counts is not None:
                        routing_counts.zero_()
                    if tracker is not None:
                        tracker.reset()
                continue
            metrics["loss"] = loss.detach()
            if bin_:
                for k, v in metrics.items():
                    sums[k] = sums[k] + v.float() if k in sums else v.float()
            i += 1
        self.oom_retries += retries
        sums["oom_retries"] = torch.tensor(float(retries), device=self.device)
        if self.dp_size > 1 and not self.fsdp:
            self._all_reduce_grads()
        if own_logp is not None:  # what correction "none" reports, from the pre-update forwards
            corr_metrics = mismatch_metrics(own_logp, batch.rollout_logprobs, batch.loss_mask)
        out = self._reduce_metrics(sums, corr_metrics, batch)
        if tracker is not None:
            out.update(tracker.load_metrics(self._all_reduce))
        if routing_counts is not None:
            routing_frac = self._routing_frac(routing_counts)
        if routing_frac is not None:
            out.update(routing_mismatch_frac=routing_frac, router_mismatch_frac=self.router_mismatch_frac)
        return out

    def _micro_batch_loss(
        self,
        mb: TrainBatch,
        tok: dict[str, Tensor],
        normalizer: Tensor,
        sft: bool,
        routing_counts: Tensor | None = None,
        tracker: RouterLossTracker | None = None,
        real: bool = True,
    ) -> tuple[Tensor, dict[str, Tensor], Tensor]:
        """``(loss, metrics, log-probs detached)`` of one micro-batch."""
        cfg = self.config
        red, norm = cfg.reduction, normalizer
        with tracker.forward(count=real) if tracker is not None else contextlib.nullcontext():
            own = tok.get("routing")
            logp, entropy, _ = self._forward_logprobs(
                self.model, mb, cfg.entropy_coef != 0, routing_counts, own
            )
        if sft:
            loss, metrics = sft_loss(logp, mb.loss_mask, mb.cu_seqlens, reduction=red, normalizer=norm)
        else:
            loss, metrics = POLICY_LOSSES.get(cfg.policy_loss)(
                logp,
                tok["old"] if "old" in tok else logp.detach(),
                mb.advantages,
                tok["pg_mask"],
                mb.cu_seqlens,
                eps_clip=cfg.eps_clip,
                eps_clip_high=cfg.eps_clip_high,
                eps_clip_c=cfg.eps_clip_c,
                weights=tok["weights"],
                reduction=red,
                normalizer=norm,
            )
        if cfg.use_kl_loss:
            coef, kind = cfg.kl_loss_coef, cfg.kl_loss_type
            term, m = kl_loss(
                logp,
                tok["ref"],
                mb.loss_mask,
                mb.cu_seqlens,
                coef=coef,
                kind=kind,
                reduction=red,
                normalizer=norm,
            )
            loss, metrics = loss + term, {**metrics, **m}
        # The entropy is always reported; it joins the loss only with a non-zero coefficient.
        coef = cfg.entropy_coef
        term, m = entropy_loss(
            entropy, mb.loss_mask, mb.cu_seqlens, coef=coef, reduction=red, normalizer=norm
        )
        if coef != 0:
            loss = loss + term
        if tracker is not None:  # MoE router losses (with a coefficient > 0) and expert loads
            loss, m = tracker.finish(loss, mb.num_tokens, {**metrics, **m})
        return loss, {**metrics, **m}, logp.detach()

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

    def clip_and_step(self, loss: float) -> dict[str, float]:
        """Clip gradients, then step the optimizer and the LR schedule unless ``loss`` or the
        gradient norm is NaN/inf (then the step is skipped). Gradients are zeroed either way."""
        norm, lr, stepped = clipped_step(
            self.model,
            self.optimizer,
            self.scheduler,
            clip_grad=self.config.clip_grad,
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
        loss) or ``sft_loss``, ``entropy``, ``kl_loss`` (with ``use_kl_loss``), the correction's
        (``train_rollout_logprob_abs_diff``, ``mismatch_kl``, ``mismatch_k3_kl``, ``tis_*``,
        ``mis_*``), ``routing_mismatch_frac`` (batches with ``routed_experts``), ``grad_norm``, ``lr`` (the LR this step used), ``skipped_steps`` (1 when
        a NaN/inf loss or gradient norm skipped the update) and ``oom_retries``.

        With a critic, it trains first on ``batch.returns`` (``value_loss``, ``value_clipfrac``,
        ``critic_grad_norm``, ``critic_lr``); during the first ``num_critic_only_steps`` steps
        the policy is not updated (``critic_only`` is 1). ``old_values`` ``[T]`` (the critic's
        values at rollout time) anchor the value clip; default: the critic's current values.
        ``on_policy``, ``old_routing`` (R2): see :meth:`accumulate_gradients`.
        """
        if self.asleep:
            raise RuntimeError("the trainer is asleep: call wake_up() before train_step()")
        out: dict[str, float] = {}
        if self.critic is not None:
            out.update(self.critic.train_step(batch, old_values))
        if self.step < self.config.num_critic_only_steps:
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
