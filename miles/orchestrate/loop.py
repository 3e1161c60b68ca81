"""The RL loop, readable as pseudocode (synchronous; any placement, see ``placement.py``):

    for step in range(start, num_rollout):
        groups   = rollout(step)                 # engine generates, rewards score (or SFT targets)
        batch    = pack(groups)                  # one TrainBatch, token-aligned (miles/buffer)
        scores   = score(trainer, batch)         # old log-probs + mismatch metrics against the
                                                 # engine's (one update per rollout: the training
                                                 # forward's own), reference log-probs, PPO values
        batch    = advantages(batch, scores)     # --advantage-estimator on the global batch
        for minibatch in split(batch, num_steps_per_rollout):
            trainer.train_step(minibatch, scores)     # PPO: the critic's step first
        engine.update_weights(trainer.weights, version=step + 1)
        evaluate / save every N steps

The trainer's part (score to optimizer steps) is :func:`miles.train.rl_step.rl_step`, run by
every trainer rank on the packed batch; rollout, rewards, data and metrics stay in this process
in every placement.

``miles train`` calls :func:`run_train`, which first runs :func:`preflight`: every check that
needs no model (files, hooks, flags, the run directory), so a mistake fails in a moment with
``miles: error: ...`` instead of after the models have loaded.
"""

from __future__ import annotations

import asyncio
import math
import shutil
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from miles.config import MilesConfig, config_to_yaml, to_plain
from miles.config_rules import refuse_unbuilt
from miles.models.loading import CheckpointError, load_config, resolve_checkpoint
from miles.orchestrate.placement import Placement
from miles.rollout.dump import load_rollout_dump, save_rollout_dump
from miles.train.checkpoint import TRACKER, iteration_dir, latest_step
from miles.types import Group, SampleStatus
from miles.utils.dataclass_flags import ConfigError
from miles.utils.metrics import MetricsLogger
from miles.utils.progress import announce


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


# What a run writes into its --run-dir (``miles plot`` adds plots/); --overwrite removes these only,
# so a checkpoint directory the user keeps inside the run directory survives.
RUN_FILES = ("metrics.jsonl", "config.yaml", "plots", "tensorboard", "wandb", "engines", "weight_sync")


@dataclass(frozen=True)
class RunPlan:
    """What :func:`preflight` found: where the run writes, and how it starts."""

    run_dir: Path
    resume_step: int | None  # the step of the checkpoint --load resumes from; None: a fresh start
    earlier_run: tuple[str, ...]  # RUN_FILES an earlier run left in run_dir


def preflight(config: MilesConfig) -> RunPlan:
    """Every check of a training run that needs no model: flags accepted but not built, the run
    directory, the files it reads (``--prompt-data``, eval sets, ``--hf-checkpoint``, ``--load``,
    ``--ref-load``, ``--critic-load``, replayed rollouts) and the hooks it imports (reward,
    generate function, filters). Raises :class:`ConfigError` naming the flag and the file; changes
    nothing. ``miles train`` runs it before building anything, and so does ``--dry-run``."""
    refuse_unbuilt(config)  # parsing refused these already, unless built with refuse_unbuilt=False
    r, m, lg = config.rollout, config.model, config.log
    resume_step = _check_load(config)
    run_dir = Path(lg.run_dir or f"runs/{datetime.now():%Y%m%d-%H%M%S}")
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"--run-dir {run_dir} is a file, not a directory")
    earlier = tuple(name for name in RUN_FILES if (run_dir / name).exists())
    if {"metrics.jsonl", "config.yaml"} & set(earlier) and resume_step is None and not lg.overwrite:
        raise ConfigError(
            f"--run-dir {run_dir} already holds a run ({', '.join(earlier)}): pass --overwrite to replace "
            "it, --load CHECKPOINT_DIR to resume it, or choose another --run-dir"
        )
    if r.prompt_data is not None:  # required by the config rules unless rollouts are replayed
        _check_data_file("--prompt-data", r.prompt_data)
    replay = lg.load_debug_rollout_data
    if replay is not None and "{rollout_id}" not in replay and not Path(replay).is_dir():
        raise ConfigError(f"--load-debug-rollout-data {replay}: no such directory")
    for name, path in r.eval_datasets:
        _check_data_file(f"--eval-prompt-data {name}", path)
    assert m.hf_checkpoint is not None  # required by the config rules
    _check_model("--hf-checkpoint", m.hf_checkpoint)
    if m.ref_load is not None:
        _check_model("--ref-load", m.ref_load)
    if m.critic_load is not None:
        if (Path(m.critic_load) / TRACKER).is_file() or (Path(m.critic_load) / "meta.json").is_file():
            raise ConfigError(
                f"--critic-load {m.critic_load} is a Miles training checkpoint; it takes a Hugging Face model "
                "(the critic's initial weights). To resume a PPO run, pass --load: the critic is saved with the policy"
            )
        _check_model("--critic-load", m.critic_load)
    _check_hooks(config)
    return RunPlan(run_dir, resume_step, earlier)


def _check_load(config: MilesConfig) -> int | None:
    """The step ``--load`` resumes from; None for no ``--load``, or none yet with ``--allow-fresh-start``."""
    ck = config.checkpoint
    if ck.load is None:
        return None
    path = Path(ck.load)
    fresh = (
        "pass --allow-fresh-start to start from --hf-checkpoint while it holds none "
        "(slime's auto-resume: --load and --save the same directory)"
    )
    if not path.exists():
        if ck.allow_fresh_start:
            return None
        raise ConfigError(f"--load {path}: no such directory; {fresh}")
    if not path.is_dir():
        raise ConfigError(f"--load {path} is a file; it takes a checkpoint directory (a --save directory)")
    try:
        step = latest_step(path)
    except CheckpointError as e:
        raise ConfigError(f"--load: {e}") from None
    if step is None:
        if (path / "meta.json").is_file():
            raise ConfigError(
                f"--load {path} is one iteration of a checkpoint; pass the directory that holds {TRACKER}: "
                f"--load {path.parent}"
            )
        if ck.allow_fresh_start:
            return None
        raise ConfigError(f"--load {path} holds no checkpoint (no {TRACKER}); {fresh}")
    if not (iteration_dir(path, step) / "meta.json").is_file():
        raise ConfigError(
            f"--load {path}: {TRACKER} names step {step}, but {iteration_dir(path, step)} is missing or incomplete"
        )
    return step


def _check_data_file(flag: str, path: str) -> None:
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"{flag} {path}: no such file")
    if not p.is_file():
        raise ConfigError(f"{flag} {path} is a directory; it takes a .jsonl or .parquet file")


def _check_model(flag: str, path: str) -> None:
    """The checkpoint exists; an HF directory's config.json names a supported architecture. (A
    GGUF's header is read by the model load itself: reading it here would double the wait.)"""
    try:
        if resolve_checkpoint(path).kind == "hf":
            load_config(path)
    except ValueError as e:  # CheckpointError, UnsupportedModelError
        raise ConfigError(f"{flag}: {e}") from None


def _check_hooks(config: MilesConfig) -> None:
    """Import every hook the rollout manager will import, now: a typo fails before any model loads."""
    from miles.rewards.registry import load_function
    from miles.rewards.scoring import resolve_reward
    from miles.rollout.filters import load_filter

    r = config.rollout
    try:
        resolve_reward(r.rm_type, r.custom_rm_path)
    except ValueError as e:  # no reward, or an unknown --rm-type
        raise ConfigError(f"--rm-type: {e}" if r.rm_type and not r.custom_rm_path else str(e)) from None
    except ImportError as e:  # FunctionLoadError, or an error inside the module
        raise ConfigError(f"--custom-rm-path: {e}") from None
    hooks = [
        ("--custom-generate-function-path", r.custom_generate_function_path,
         lambda p: load_function(p, require_async=True, what="generate function")),
        ("--dynamic-sampling-filter-path", r.dynamic_sampling_filter_path, load_filter),
        ("--rollout-sample-filter-path", r.rollout_sample_filter_path, load_filter),
    ]  # fmt: skip
    for flag, path, load in hooks:
        if path is not None:
            try:
                load(path)
            except ImportError as e:
                raise ConfigError(f"{flag}: {e}") from None


def start_run_dir(plan: RunPlan, config: MilesConfig) -> None:
    """Create the run directory (removing an earlier run's files with ``--overwrite``), write
    ``config.yaml`` and say where the run writes."""
    run_dir = plan.run_dir
    if plan.earlier_run and config.log.overwrite:
        for name in plan.earlier_run:
            path = run_dir / name
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
        announce(
            f"run directory: {run_dir} (--overwrite: removed the earlier run's {', '.join(plan.earlier_run)})"
        )
    elif plan.resume_step is not None and (run_dir / "metrics.jsonl").exists():
        announce(f"run directory: {run_dir} (resuming: appending to its metrics.jsonl)")
    else:
        announce(f"run directory: {run_dir}")
    ck = config.checkpoint
    if plan.resume_step is not None:
        announce(f"resuming from {ck.load} at step {plan.resume_step}")
    elif ck.load is not None:
        announce(
            f"--load {ck.load} holds no checkpoint yet (--allow-fresh-start): starting from --hf-checkpoint"
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(config_to_yaml(config))


def run_train(config: MilesConfig) -> int:
    """Run ``miles train`` (embedded, or on Ray with ``--placement ray``); returns the exit code.

    A mistake :func:`preflight` can see raises :class:`ConfigError` before anything is built."""
    plan = preflight(config)
    start_run_dir(plan, config)
    run_dir = plan.run_dir
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

        announce(f"starting the Ray placement ({config.placement.actor_world_size} trainer ranks) ...")
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
            groups = load_rollout_dump(_dump_path(lg.load_debug_rollout_data, step))
        elif policy:
            result = asyncio.run(placement.manager.generate_rollout(step))
            groups, metrics = result.groups, result.metrics
        else:
            groups = sft_groups(placement, step)
        if lg.save_debug_rollout_data is not None:
            path = _dump_path(lg.save_debug_rollout_data, step)
            path.parent.mkdir(parents=True, exist_ok=True)
            save_rollout_dump(groups, path)
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


__all__ = [
    "RUN_FILES",
    "LoopError",
    "RunPlan",
    "hook_args",
    "preflight",
    "run_train",
    "sft_groups",
    "start_run_dir",
]
