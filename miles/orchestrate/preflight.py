"""What a training run checks and prepares before it builds anything.

:func:`preflight` runs every check that needs no model (files, hooks, flags, the run directory),
so a mistake fails in a moment with ``miles: error: ...`` instead of after the models have
loaded; ``miles train --dry-run`` runs it too. :func:`start_run_dir` then creates the run
directory and writes ``config.yaml``.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from miles.config import MilesConfig, config_to_yaml
from miles.config_rules import refuse_unbuilt
from miles.models.loading import CheckpointError, load_config, resolve_checkpoint
from miles.train.checkpoint import TRACKER, iteration_dir, latest_step
from miles.utils.dataclass_flags import ConfigError
from miles.utils.progress import announce

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


__all__ = ["RUN_FILES", "RunPlan", "preflight", "start_run_dir"]
