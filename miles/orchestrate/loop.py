"""The RL loop, readable as pseudocode (embedded placement, synchronous):

    for step in range(start, num_rollout):
        groups   = rollout(step)                 # engine generates, rewards score (or SFT targets)
        batch    = pack(groups)                  # one TrainBatch, token-aligned
        old      = trainer.logprobs(batch)       # + mismatch metrics against the engine's log-probs
                                                 # (one update per rollout: the training forward's own)
        ref      = reference.logprobs(batch)     # when a KL term is used
        values   = critic.values(batch)          # PPO only (see miles/orchestrate/ppo.py)
        batch    = advantages(batch, estimator, values)
        for minibatch in split(batch, num_steps_per_rollout):
            trainer.train_step(minibatch, old, ref)   # PPO: the critic's step first
        engine.update_weights(trainer.weights, version=step + 1)
        evaluate / save every N steps

``miles train`` calls :func:`run_train`.
"""

from __future__ import annotations

import asyncio
import math
import time
from datetime import datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from miles.algo.advantages import AdvantageParams
from miles.algo.corrections import mismatch_metrics
from miles.algo.losses import kl_estimate
from miles.buffer.batching import build_train_batch, with_advantages
from miles.config import MilesConfig, config_to_yaml, to_plain
from miles.orchestrate.local import LocalPlacement
from miles.orchestrate.ppo import rename_critic_metrics, value_metrics
from miles.train.checkpoint import latest_step, load_checkpoint, save_checkpoint
from miles.train.packing import batch_to, select_sequences
from miles.types import Group, SampleStatus, TrainBatch
from miles.utils.metrics import MetricsLogger


class LoopError(RuntimeError):
    """A run that cannot go on (no data, an impossible resume)."""


def hook_args(config: MilesConfig) -> SimpleNamespace:
    """The flat ``args`` namespace slime-style hooks receive (``args.rm_url``, ``args.n_samples_per_prompt``...)."""
    flat: dict[str, Any] = {}
    for section in (config.model, config.train, config.algo, config.rollout, config.engine, config.placement,
                    config.checkpoint, config.log):  # fmt: skip
        flat.update(vars(section))
    flat.update(
        true_on_policy_mode=config.true_on_policy_mode,
        deterministic_mode=config.deterministic_mode,
        use_rollout_routing_replay=config.use_rollout_routing_replay,
    )
    return SimpleNamespace(**flat)


def _num_rollout(config: MilesConfig, dataset_len: int) -> int:
    r = config.rollout
    if r.num_rollout is not None:
        return r.num_rollout
    assert r.rollout_batch_size is not None and r.num_epoch is not None
    return math.ceil(dataset_len * r.num_epoch / r.rollout_batch_size)


def _dump_path(template: str, step: int) -> Path:
    return Path(
        template.format(rollout_id=step) if "{rollout_id}" in template else f"{template}/rollout_{step}.pt"
    )


def sft_groups(placement: LocalPlacement, step: int) -> list[Group]:
    """SFT warm-up (``--loss-type sft_loss``): each prompt's label is the target response."""
    r = placement.config.rollout
    assert r.rollout_batch_size is not None
    tok = placement.tokenizer
    prompts = placement.dataset.next_batch(r.rollout_batch_size)
    groups = []
    for s in prompts:
        if s.label is None:
            raise LoopError(
                f"--loss-type sft_loss trains on the label as the response; prompt {s.index} has none"
            )
        text = s.label if isinstance(s.label, str) else str(s.label)
        s.response = text
        s.response_ids = [*tok.encode(text, add_special_tokens=False), tok.eos_token_id]
        s.rollout_logprobs = [0.0] * s.response_len
        s.reward, s.status = 0.0, SampleStatus.COMPLETED
        groups.append(Group(s.group_index, (s,)))
    return groups


def _token_index(batch: TrainBatch, seqs: list[int]) -> torch.Tensor:
    cu, device = batch.cu_seqlens.tolist(), batch.input_ids.device
    return torch.cat([torch.arange(cu[i], cu[i + 1], device=device) for i in seqs])


def _reuses_own_logprobs(config: MilesConfig, steps: int) -> bool:
    """Whether the single optimizer step of a rollout can take its old log-probs from its own
    forward: no second update, no TIS/MIS, no KL reward penalty (which needs them beforehand)."""
    a = config.algo
    return steps == 1 and not (a.use_tis or a.use_mis or a.use_rollout_logprobs or a.kl_coef > 0)


def train_on(placement: LocalPlacement, groups: list[Group], step: int) -> dict[str, float]:
    """Old/ref log-probs, advantages and ``num_steps_per_rollout`` optimizer steps on ``groups``."""
    config, trainer = placement.config, placement.trainer
    a = config.algo
    batch = batch_to(build_train_batch(groups), placement.device)
    metrics: dict[str, float] = {}
    policy = config.train.loss_type == "policy_loss"
    old = ref = values = None
    steps = config.rollout.num_steps_per_rollout or 1
    # One update from the weights that generated the batch: the training forward's own detached
    # log-probs are the old ones (and its mismatch metrics are pre-update), so skip a forward.
    # (Not in critic-only warm-up steps: the policy runs no training forward there.)
    on_policy = policy and _reuses_own_logprobs(config, steps) and step >= config.train.num_critic_only_steps
    if policy:
        if not on_policy:
            old = trainer.compute_logprobs(batch)
            for k, v in mismatch_metrics(old, batch.rollout_logprobs, batch.loss_mask).items():
                metrics[f"train/{k}"] = float(v)
            if trainer.routing_mismatch_frac is not None:  # engine vs trainer experts (R3)
                metrics["train/routing_mismatch_frac"] = trainer.routing_mismatch_frac
        if trainer.ref_model is not None:
            ref = trainer.compute_ref_logprobs(batch)
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
        values = None if trainer.critic is None else trainer.critic.compute_values(batch)
        batch = with_advantages(batch, a.advantage_estimator, params, kl=kl, values=values)
        if values is not None:
            metrics.update(value_metrics(batch, values))
        if a.use_rollout_logprobs:
            old = batch.rollout_logprobs
    per = batch.num_sequences // steps
    sums: dict[str, float] = {}
    for i in range(steps):
        seqs = list(range(i * per, (i + 1) * per))
        sub = select_sequences(batch, seqs)
        idx = _token_index(batch, seqs)
        out = trainer.train_step(
            sub,
            old_logprobs=None if old is None else old[idx],
            ref_logprobs=None if ref is None else ref[idx],
            old_values=None if values is None else values[idx],
            on_policy=on_policy,
        )
        for key, value in out.items():
            sums[key] = sums.get(key, 0.0) + value / steps
    if not on_policy:
        sums.pop("train/train_rollout_logprob_abs_diff", None)  # measured above, before any update
        if "train/routing_mismatch_frac" in metrics:
            sums.pop("train/routing_mismatch_frac", None)
    metrics.update(rename_critic_metrics(sums))
    metrics["perf/tokens_per_s_train_tokens"] = float(batch.num_tokens)
    return metrics


def run_train(config: MilesConfig) -> int:
    """Run ``miles train`` in the embedded placement; returns the process exit code."""
    if config.algo.advantage_estimator == "ppo" and config.train.loss_type != "policy_loss":
        raise LoopError("--advantage-estimator ppo needs --loss-type policy_loss (the critic's returns)")
    t = config.train
    missing = [flag for flag, on in (("--use-routing-replay (R2)", t.use_routing_replay),
                                     ("--expert-model-parallel-size > 1", t.expert_model_parallel_size > 1)) if on]  # fmt: skip
    if missing:  # accepted by the parser (slime's names), not built yet: refuse rather than ignore
        raise LoopError(f"not implemented yet: {', '.join(missing)} (see docs/moe.md); drop the flag")
    run_dir = Path(config.log.run_dir or f"runs/{datetime.now():%Y%m%d-%H%M%S}")
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(config_to_yaml(config))
    placement = LocalPlacement.build(config, hook_args(config))
    logger = MetricsLogger(
        run_dir,
        use_tensorboard=config.log.use_tensorboard,
        use_wandb=config.log.use_wandb,
        wandb_project=config.log.wandb_project,
        wandb_mode=config.log.wandb_mode,
        config=to_plain(config),  # nested by section, as config.yaml
    )
    try:
        _loop(config, placement, logger)
    finally:
        logger.close()
        placement.close()
    return 0


def _loop(config: MilesConfig, placement: LocalPlacement, logger: MetricsLogger) -> None:
    r, ck, lg = config.rollout, config.checkpoint, config.log
    start = 0
    if ck.load is not None and latest_step(ck.load) is not None:
        extra = load_checkpoint(ck.load, placement.trainer)
        start = int(extra["next_step"])
        placement.dataset.load_state_dict(extra["dataset"])
        placement.manager._next_index = int(extra["sample_index"])
        placement.push_weights(start)
    total = _num_rollout(config, len(placement.dataset))
    policy = config.train.loss_type == "policy_loss"
    if placement.eval_datasets and start == 0 and not r.skip_eval_before_train:
        logger.log(0, _evaluate(placement, 0))
    for step in range(start, total):
        t0 = time.perf_counter()
        metrics: dict[str, float] = {}
        if lg.load_debug_rollout_data is not None:
            groups = torch.load(_dump_path(lg.load_debug_rollout_data, step), weights_only=False)
        elif policy:
            result = asyncio.run(placement.manager.generate_rollout(step))
            groups, metrics = result.groups, result.metrics
        else:
            groups = sft_groups(placement, step)
        if lg.save_debug_rollout_data is not None:
            path = _dump_path(lg.save_debug_rollout_data, step)
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save(groups, path)
        metrics["perf/rollout_time"] = time.perf_counter() - t0
        if not lg.debug_rollout_only:
            t1 = time.perf_counter()
            metrics.update(train_on(placement, groups, step))
            metrics["perf/train_time"] = time.perf_counter() - t1
            metrics["perf/tokens_per_s"] = (
                metrics.pop("perf/tokens_per_s_train_tokens") / metrics["perf/train_time"]
            )
            metrics["perf/update_weights_time"] = placement.push_weights(step + 1)
        done = step + 1
        if r.eval_interval and placement.eval_datasets and (done % r.eval_interval == 0 or done == total):
            metrics.update(_evaluate(placement, done))
        if ck.save is not None and ((ck.save_interval and done % ck.save_interval == 0) or done == total):
            extra = {
                "next_step": done,
                "dataset": placement.dataset.state_dict(),
                "sample_index": placement.manager._next_index,
            }
            save_checkpoint(ck.save, placement.trainer, done, extra)
        metrics["perf/step_time"] = time.perf_counter() - t0
        logger.log(step, metrics)
    if ck.save_hf is not None:
        from miles.models.loading import save_hf

        assert config.model.hf_checkpoint is not None
        save_hf(placement.trainer.model, ck.save_hf, tokenizer_source=config.model.hf_checkpoint)


def _evaluate(placement: LocalPlacement, step: int) -> dict[str, float]:
    out: dict[str, float] = {}
    n = placement.config.rollout.n_samples_per_eval_prompt
    for name, dataset in placement.eval_datasets.items():
        out.update(asyncio.run(placement.manager.evaluate(name, dataset, step, n)))
    return out


__all__ = ["LoopError", "hook_args", "run_train", "sft_groups", "train_on"]
