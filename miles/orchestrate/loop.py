"""The RL loop, readable as pseudocode (synchronous; any placement, see ``placement.py``):

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

The trainer's part (old log-probs to optimizer steps) is ``train_step.train_on``, run by every
trainer rank; rollout, rewards, data and metrics stay in this process in every placement.

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

from miles.config import MilesConfig, config_to_yaml, to_plain
from miles.orchestrate.placement import Placement
from miles.train.checkpoint import latest_step
from miles.types import Group, SampleStatus
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


def sft_groups(placement: Placement, step: int) -> list[Group]:
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


def unbuilt_flags(config: MilesConfig) -> list[str]:
    """Flags slime users pass that Miles parses but does not implement yet, when set."""
    t, a, r, e, p, ck = (
        config.train,
        config.algo,
        config.rollout,
        config.engine,
        config.placement,
        config.checkpoint,
    )
    checks = [
        (t.log_probs_max_tokens_per_gpu is not None, "--log-probs-max-tokens-per-gpu (log-prob passes use --max-tokens-per-gpu)"),
        (a.disable_rewards_normalization, "--disable-rewards-normalization"),
        (a.use_unbiased_kl, "--use-unbiased-kl"),
        (r.rollout_max_context_len is not None, "--rollout-max-context-len (use --rollout-max-response-len)"),
        (r.partial_rollout, "--partial-rollout"),
        (e.chunked_prefill_size is not None, "--sglang-chunked-prefill-size (use --sglang-max-prefill-tokens)"),
        (e.speculative_algorithm is not None, "--sglang-speculative-algorithm (speculative rollouts)"),
        (e.router_ip is not None or e.router_port is not None, "--sglang-router-ip/--sglang-router-port "
         "(an existing router; Miles starts its own)"),
        (p.rollout_backend == "sglang" and not p.rollout_external_engine_addrs, "--rollout-backend sglang without "
         "--rollout-external-engine-addrs (Miles does not launch SGLang servers; point it at running ones)"),
        (ck.no_save_optim, "--no-save-optim"),
    ]  # fmt: skip
    return [flag for on, flag in checks if on]


def run_train(config: MilesConfig) -> int:
    """Run ``miles train`` (embedded, or on Ray with ``--placement ray``); returns the exit code."""
    if config.algo.advantage_estimator == "ppo" and config.train.loss_type != "policy_loss":
        raise LoopError("--advantage-estimator ppo needs --loss-type policy_loss (the critic's returns)")
    unbuilt = unbuilt_flags(config)
    if unbuilt:  # accepted by the parser (slime's names), not built: refuse rather than ignore
        raise LoopError(f"not implemented yet: {'; '.join(unbuilt)}; drop the flag(s)")
    run_dir = Path(config.log.run_dir or f"runs/{datetime.now():%Y%m%d-%H%M%S}")
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(config_to_yaml(config))
    placement = _build_placement(config, run_dir)
    logger = MetricsLogger(
        run_dir,
        use_tensorboard=config.log.use_tensorboard,
        use_wandb=config.log.use_wandb,
        wandb_project=config.log.wandb_project,
        wandb_mode=config.log.wandb_mode,
        wandb_group=config.log.wandb_group,
        config=to_plain(config),  # nested by section, as config.yaml
        console_interval=config.log.log_interval,
    )
    try:
        _loop(config, placement, logger)
    finally:
        logger.close()
        placement.close()
    return 0


def _build_placement(config: MilesConfig, run_dir: Path) -> Placement:
    if config.placement.use_ray:
        from miles.orchestrate.ray import RayPlacement

        return RayPlacement.build(config, hook_args(config), run_dir=run_dir)
    from miles.orchestrate.local import LocalPlacement

    return LocalPlacement.build(config, hook_args(config))


def _loop(config: MilesConfig, placement: Placement, logger: MetricsLogger) -> None:
    r, ck, lg = config.rollout, config.checkpoint, config.log
    start = 0
    if ck.load is not None and latest_step(ck.load) is not None:
        extra = placement.load_checkpoint(ck.load)
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
            metrics.update(placement.train(groups, step))
            metrics["perf/train_time"] = time.perf_counter() - t1
            metrics["perf/tokens_per_s"] = (
                metrics.pop("perf/tokens_per_s_train_tokens") / metrics["perf/train_time"]
            )
            # --update-weights-interval k: the engines keep generating with weights up to k-1
            # steps old (the samples' weight_versions say which); the last step always syncs.
            send = (step + 1) % config.placement.update_weights_interval == 0 or step + 1 == total
            seconds = placement.push_weights(step + 1, send=send)
            if send:
                metrics["perf/update_weights_time"] = seconds
        done = step + 1
        if r.eval_interval and placement.eval_datasets and (done % r.eval_interval == 0 or done == total):
            metrics.update(_evaluate(placement, done))
        if ck.save is not None and ((ck.save_interval and done % ck.save_interval == 0) or done == total):
            extra = {
                "next_step": done,
                "dataset": placement.dataset.state_dict(),
                "sample_index": placement.manager._next_index,
            }
            placement.save_checkpoint(ck.save, done, extra)
        metrics["perf/step_time"] = time.perf_counter() - t0
        logger.log(step, metrics)
    if ck.save_hf is not None:
        placement.save_hf(ck.save_hf)


def _evaluate(placement: Placement, step: int) -> dict[str, float]:
    out: dict[str, float] = {}
    n = placement.config.rollout.n_samples_per_eval_prompt
    for name, dataset in placement.eval_datasets.items():
        out.update(asyncio.run(placement.manager.evaluate(name, dataset, step, n)))
    return out


__all__ = ["LoopError", "hook_args", "run_train", "sft_groups", "unbuilt_flags"]
