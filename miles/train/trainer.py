"""The policy trainer: log-probs, the RL/SFT loss with gradient accumulation, and the optimizer step.

``Trainer`` runs on one data-parallel rank. It receives that rank's share of the global batch
(:func:`miles.train.packing.shard_for_rank`), splits it into micro-batches, and accumulates
gradients so that the result is the gradient of the *global-batch* loss, whatever the
micro-batching and the number of ranks: each micro-batch loss is divided by the global
normaliser (``loss_normalizer`` summed over the local batch, all-reduced over ranks), so the
micro-batch losses of all ranks add up to the global reduction. See docs/trainer.md.

Algorithms come from the :mod:`miles.algo` registries by name; nothing here branches on an
algorithm beyond "SFT or policy loss" and "is a term switched on".
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

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
    logprobs_and_entropy_from_hidden,
    loss_normalizer,
    sft_loss,
)
from miles.models import CausalLM, VarlenContext
from miles.train.optim import LRSchedule, build_optimizer, build_scheduler, param_groups
from miles.train.packing import batch_to, micro_batch_bins, select_sequences, select_tokens
from miles.train.parallelize import apply_activation_checkpointing, is_fsdp
from miles.types import TrainBatch

LOSS_TYPES = ("policy_loss", "sft_loss")
# Correction metrics that are maxima, not token means: reduced with MAX across ranks.
_MAX_METRICS = frozenset({"tis_weight_max"})


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
    temperature: float = 1.0  # the rollout temperature: log-probs are scored under it
    gradient_checkpointing: bool = False
    logprob_chunk_size: int = 1024
    vocab_chunk_size: int | None = None
    seed: int = 1234

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
    """

    def __init__(
        self,
        model: CausalLM,
        config: TrainerConfig,
        device: torch.device | str = "cpu",
        *,
        process_group: dist.ProcessGroup | None = None,
    ) -> None:
        torch.manual_seed(config.seed)
        self.model, self.config, self.device = model, config, torch.device(device)
        self.group = process_group
        self.dp_size = dist.get_world_size(process_group) if dist.is_initialized() else 1
        self.fsdp = is_fsdp(model)
        if config.gradient_checkpointing:
            apply_activation_checkpointing(model)
        self.optimizer = build_optimizer(
            param_groups(model, config.weight_decay),
            lr=config.lr,
            weight_decay=config.weight_decay,
            betas=(config.adam_beta1, config.adam_beta2),
            eps=config.adam_eps,
            device=self.device,
        )
        self.scheduler = build_scheduler(self.optimizer, config.lr_schedule())
        self.skipped_steps = 0

    # ----------------------------------------------------------------------------------------
    # Log-probs
    # ----------------------------------------------------------------------------------------

    def _forward_logprobs(self, mb: TrainBatch, need_entropy_grad: bool) -> tuple[Tensor, Tensor]:
        """``(logp [T], entropy [T])`` of each token given its prefix; 0 at each sequence's first token.

        Row ``t - 1`` of the hidden states predicts token ``t``. The chunked LM head never
        materialises ``[T, vocab]`` fp32 logits.
        """
        hidden = self.model(mb.input_ids, mb.positions, VarlenContext(mb.cu_seqlens))
        t = hidden.shape[0]
        logp = hidden.new_zeros(t, dtype=torch.float32)
        entropy = torch.zeros_like(logp)
        if t > 1:
            lp, ent = logprobs_and_entropy_from_hidden(
                hidden[:-1],
                self.model.lm_head.weight,
                mb.input_ids[1:],
                temperature=self.config.temperature,
                chunk_size=self.config.logprob_chunk_size,
                vocab_chunk_size=self.config.vocab_chunk_size,
            )
            if not need_entropy_grad:
                ent = ent.detach()
            logp = torch.cat([logp[:1], lp.float()])
            entropy = torch.cat([entropy[:1], ent.float()])
        starts = mb.cu_seqlens[:-1].long()
        is_start = torch.zeros(t, dtype=torch.bool, device=hidden.device)
        is_start[starts[starts < t]] = True
        # The "prediction" of a sequence's first token comes from the previous sequence: no meaning.
        return torch.where(is_start, 0.0, logp), torch.where(is_start, 0.0, entropy)

    @torch.no_grad()
    def compute_logprobs_and_entropy(self, batch: TrainBatch) -> tuple[Tensor, Tensor]:
        """Float32 ``(logp [T], entropy [T])`` of this rank's batch, micro-batched as in training."""
        batch = batch_to(batch, self.device)
        logp = torch.zeros(batch.num_tokens, dtype=torch.float32, device=self.device)
        entropy = torch.zeros_like(logp)
        token_ids = torch.arange(batch.num_tokens, device=self.device)
        for bin_ in self._bins(batch):
            # Empty bins exist only so that every FSDP rank runs the same number of forwards.
            lp, ent = self._forward_logprobs(select_sequences(batch, bin_ or [0]), need_entropy_grad=False)
            if bin_:
                where = select_tokens(token_ids, batch.cu_seqlens, bin_)
                logp[where], entropy[where] = lp, ent
        if self.fsdp:
            self.model.reshard()  # type: ignore[operator]  # the root stays gathered after a forward
        return logp, entropy

    def compute_logprobs(self, batch: TrainBatch) -> Tensor:
        """Float32 log-prob ``[T]`` of each token given its prefix (0 at each sequence's first token)."""
        return self.compute_logprobs_and_entropy(batch)[0]

    # ----------------------------------------------------------------------------------------
    # Training
    # ----------------------------------------------------------------------------------------

    def _bins(self, batch: TrainBatch) -> list[list[int]]:
        """Micro-batch sequence lists, padded so that every data-parallel rank runs as many."""
        if batch.num_sequences == 0:
            raise ValueError("every data-parallel rank needs at least one sequence")
        cfg = self.config
        size, budget = cfg.micro_batch_size, cfg.max_tokens_per_gpu
        bins = micro_batch_bins(batch, micro_batch_size=size, max_tokens=budget)
        if self.dp_size > 1:
            n = torch.tensor([len(bins)], device=self.device)
            dist.all_reduce(n, op=dist.ReduceOp.MAX, group=self.group)
            if int(n) > len(bins):
                if budget is not None:  # re-split finer before resorting to empty micro-batches
                    bins = micro_batch_bins(batch, max_tokens=budget, min_bins=int(n))
                bins = bins + [[] for _ in range(int(n) - len(bins))]
        return bins

    def accumulate_gradients(
        self,
        batch: TrainBatch,
        old_logprobs: Tensor | None = None,
        ref_logprobs: Tensor | None = None,
    ) -> dict[str, float]:
        """Forward/backward over the micro-batches of ``batch``; ``.grad`` then holds the gradient
        of the global-batch loss (all ranks). No optimizer step. Returns metrics reduced over
        ranks, without the ``train/`` prefix.

        ``old_logprobs``/``ref_logprobs``: ``[T]`` float, aligned with ``batch.input_ids``.
        """
        cfg = self.config
        batch = batch_to(batch, self.device)
        sft = cfg.loss_type == "sft_loss"
        tokens: dict[str, Tensor] = {}  # token tensors sliced along with the batch
        corr_metrics: dict[str, Tensor] = {}
        if not sft:
            if old_logprobs is None:
                old_logprobs = (
                    batch.rollout_logprobs if cfg.use_rollout_logprobs else self.compute_logprobs(batch)
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
        if cfg.use_kl_loss:
            if ref_logprobs is None:
                raise ValueError("use_kl_loss needs ref_logprobs (the reference model's log-probs)")
            tokens["ref"] = ref_logprobs.to(self.device, torch.float32)

        # One normaliser for every micro-batch of every rank: micro-batch losses add up to the
        # global reduction. It counts the input mask, so MIS-rejected tokens still dilute the mean.
        normalizer = loss_normalizer(cfg.reduction, batch.loss_mask, batch.cu_seqlens, cfg.reduction_max_len)
        normalizer = normalizer.to(self.device, torch.float32)
        self._all_reduce(normalizer)
        # FSDP2 averages gradients over ranks; our per-rank losses are already global shares.
        grad_scale = float(self.dp_size) if self.fsdp else 1.0

        sums: dict[str, Tensor] = {}
        for bin_ in self._bins(batch):
            mb = select_sequences(batch, bin_ or [0])
            tok = {k: select_tokens(v, batch.cu_seqlens, bin_ or [0]) for k, v in tokens.items()}
            if not bin_:  # a padding micro-batch: runs the collectives, contributes nothing
                mb = dataclasses.replace(mb, loss_mask=torch.zeros_like(mb.loss_mask))
                tok = {k: torch.zeros_like(v) if k == "pg_mask" else v for k, v in tok.items()}
            loss, metrics = self._micro_batch_loss(mb, tok, normalizer, sft)
            (loss * (grad_scale if bin_ else 0.0)).backward()
            metrics["loss"] = loss.detach()
            if bin_:
                for k, v in metrics.items():
                    sums[k] = sums[k] + v.float() if k in sums else v.float()
        if self.dp_size > 1 and not self.fsdp:
            self._all_reduce_grads()
        return self._reduce_metrics(sums, corr_metrics, batch)

    def _micro_batch_loss(
        self, mb: TrainBatch, tok: dict[str, Tensor], normalizer: Tensor, sft: bool
    ) -> tuple[Tensor, dict[str, Tensor]]:
        cfg = self.config
        red, norm = cfg.reduction, normalizer
        logp, entropy = self._forward_logprobs(mb, need_entropy_grad=cfg.entropy_coef != 0)
        if sft:
            loss, metrics = sft_loss(logp, mb.loss_mask, mb.cu_seqlens, reduction=red, normalizer=norm)
        else:
            loss, metrics = POLICY_LOSSES.get(cfg.policy_loss)(
                logp,
                tok["old"],
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
        return loss, {**metrics, **m}

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
        params = [p for p in self.model.parameters() if p.grad is not None]
        grads = [p.grad for p in params if p.grad is not None]
        grad_norm = (
            torch.nn.utils.get_total_norm(grads, 2.0) if grads else torch.zeros((), device=self.device)
        )
        if hasattr(grad_norm, "full_tensor"):  # a DTensor under FSDP2: the norm over all shards
            grad_norm = grad_norm.full_tensor()
        norm = float(grad_norm)
        lr = float(self.optimizer.param_groups[0]["lr"])
        finite = math.isfinite(loss) and math.isfinite(norm)
        if finite:
            if self.config.clip_grad > 0:
                torch.nn.utils.clip_grads_with_norm_(params, self.config.clip_grad, grad_norm)
            self.optimizer.step()
            self.scheduler.step()
        else:
            self.skipped_steps += 1
        self.optimizer.zero_grad(set_to_none=True)
        return {"grad_norm": norm, "lr": lr, "skipped_steps": 0.0 if finite else 1.0}

    def train_step(
        self,
        batch: TrainBatch,
        old_logprobs: Tensor | None = None,
        ref_logprobs: Tensor | None = None,
    ) -> dict[str, float]:
        """One optimizer step on this rank's share of the global batch; slime-named metrics.

        Metrics (``train/`` prefix): ``loss``, ``pg_loss``, ``pg_clipfrac``, ``ppo_kl`` (policy
        loss) or ``sft_loss``, ``entropy``, ``kl_loss`` (with ``use_kl_loss``), the correction's
        (``train_rollout_logprob_abs_diff``, ``mismatch_kl``, ``mismatch_k3_kl``, ``tis_*``,
        ``mis_*``), ``grad_norm``, ``lr`` (the LR this step used) and ``skipped_steps`` (1 when
        a NaN/inf loss or gradient norm skipped the update).
        """
        self.model.train()
        metrics = self.accumulate_gradients(batch, old_logprobs, ref_logprobs)
        metrics.update(self.clip_and_step(metrics["loss"]))
        return {f"train/{k}": v for k, v in metrics.items()}
