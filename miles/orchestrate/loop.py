"""The RL loop, readable as pseudocode (synchronous; any placement, see ``placement.py``):

    data      = load_rollout_data(config)        # tokenizer, prompts, eval sets, the model's shape
    placement = start_placement(config, ...)     # trainer(s) and engine(s): embedded or on Ray
    manager   = rollout manager over placement.engine_client(), rewards, filters
    for step in range(start, num_rollout):
        groups   = manager.generate_rollout(step)   # engines generate, rewards score (or SFT targets)
        metrics  = placement.train(groups, step)     # every trainer rank: rl_step = pack -> score ->
                                                     # advantages -> optimizer steps (miles.train.rl_step)
        placement.push_weights(step + 1)             # export -> transport -> engine load
        evaluate / save every N steps

The driver (this process) builds the rollout side once, whatever the placement: the data, the
:class:`~miles.rollout.manager.RolloutManager`, its rewards and the metrics; the placement owns
only the trainers and the engines. ``miles train`` calls :func:`run_train`, which first runs
:func:`miles.orchestrate.preflight.preflight`.
"""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from miles.config import MilesConfig, to_plain
from miles.models.loading import load_config, load_tokenizer
from miles.models.spec import ModelSpec
from miles.orchestrate.build import kv_demand
from miles.orchestrate.placement import Placement, start_placement
from miles.orchestrate.preflight import preflight, start_run_dir
from miles.rollout.async_worker import RolloutWorker, WorkerSettings
from miles.rollout.dataset import PromptDataset, load_eval_datasets
from miles.rollout.dump import load_rollout_dump, save_rollout_dump
from miles.rollout.manager import RolloutManager
from miles.train.checkpoint import latest_step
from miles.types import Group, SampleStatus
from miles.utils.metrics import MetricsLogger
from miles.utils.progress import announce

# How long a weight update waits for the requests in flight to finish (asynchronous runs without
# --partial-rollout): a generous bound on one request, so that a stuck engine stops the run.
_HOLD_TIMEOUT_S = 3600.0


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


@dataclass(frozen=True)
class RolloutData:
    """The driver's data: built once per run, whatever the placement."""

    tokenizer: Any
    dataset: PromptDataset
    eval_datasets: dict[str, PromptDataset]
    spec: ModelSpec  # the policy's shape (no weights): the KV demand, R3's top-k
    demand: tuple[int, int]  # what the engines' KV caches must hold (build.kv_demand)


def load_rollout_data(config: MilesConfig) -> RolloutData:
    """Tokenizer, prompts and evaluation sets, and the model's config; refuses R3 on a dense model."""
    m, r = config.model, config.rollout
    assert m.hf_checkpoint is not None  # required by the config rules
    spec = load_config(m.hf_checkpoint)
    if config.use_rollout_routing_replay and not spec.is_moe:
        raise ValueError("--use-rollout-routing-replay needs an MoE model; this one is dense")
    announce(f"loading the tokenizer of {m.hf_checkpoint} ...")
    tokenizer = load_tokenizer(m.hf_checkpoint)
    announce(f"reading the prompts {r.prompt_data or '(replayed rollouts)'} ...")
    dataset = PromptDataset.from_config(r, tokenizer)
    evals = dict(load_eval_datasets(r.eval_datasets, r, tokenizer))
    return RolloutData(tokenizer, dataset, evals, spec, kv_demand(config, spec, [dataset, *evals.values()]))


@dataclass
class Run:
    """What the loop drives: the driver's data and rollout manager, and the placement."""

    config: MilesConfig
    data: RolloutData
    placement: Placement
    manager: RolloutManager

    @classmethod
    def assemble(cls, config: MilesConfig, data: RolloutData, placement: Placement) -> Run:
        """The rollout manager over ``placement``'s engines, with the rewards and filters the
        flags name; each engine takes up to ``--sglang-server-concurrency`` requests at once."""
        tok = data.tokenizer
        manager = RolloutManager(
            config.rollout,
            data.dataset,
            placement.engine_client(),
            args=hook_args(config),
            concurrency=config.engine.server_concurrency * placement.num_engines,
            stop_token_ids=[tok.eos_token_id] if tok.eos_token_id is not None else [],
            routed_experts_top_k=data.spec.num_experts_per_tok if config.use_rollout_routing_replay else None,
        )
        return cls(config, data, placement, manager)


def run_train(config: MilesConfig) -> int:
    """Run ``miles train`` (embedded, or on Ray with ``--placement ray``); returns the exit code.

    A mistake :func:`preflight` can see raises :class:`ConfigError` before anything is built."""
    plan = preflight(config)
    start_run_dir(plan, config)
    data = load_rollout_data(config)
    if config.placement.use_ray:
        announce(f"starting the Ray placement ({config.placement.actor_world_size} trainer ranks) ...")
    placement = start_placement(config, data.demand, data.tokenizer, plan.run_dir)
    try:
        run = Run.assemble(config, data, placement)
        logger = MetricsLogger(
            plan.run_dir,
            use_tensorboard=config.log.use_tensorboard,
            use_wandb=config.log.use_wandb,
            wandb_project=config.log.wandb_project,
            wandb_mode=config.log.wandb_mode,
            wandb_group=config.log.wandb_group,
            config=to_plain(config),  # nested by section, as config.yaml
            console_interval=config.log.log_interval,
        )
        try:
            train_loop(run, logger)
        finally:
            logger.close()
    finally:
        placement.stop()
    return 0


def train_loop(run: Run, logger: MetricsLogger) -> None:
    """Steps from the checkpoint ``--load`` names (or 0) to the last, then ``--save-hf``.

    With ``--async-mode`` other than ``off`` the rollout comes from a :class:`RolloutWorker`
    generating in its own thread while the trainer trains (docs/async.md); the step is otherwise
    the same."""
    config, placement = run.config, run.placement
    r, ck = config.rollout, config.checkpoint
    worker = _worker(run) if r.async_mode != "off" else None
    start = _resume(run, worker) if ck.load is not None and latest_step(ck.load) is not None else 0
    total = _num_rollout(config, len(run.data.dataset))
    if worker is not None:
        announce(
            f"rollout worker: {r.async_mode}, weights at most {worker.settings.max_staleness} versions old"
        )
        worker.start(version=start)
    try:
        if run.data.eval_datasets and start == 0 and not r.skip_eval_before_train:
            logger.log(0, _evaluate(run, 0, worker))
        for step in range(start, total):
            metrics = _step(run, worker, step, total)
            logger.log(step, metrics)
    finally:
        if worker is not None:
            worker.stop()
    if ck.save_hf is not None:
        placement.save_hf(ck.save_hf)


def _step(run: Run, worker: RolloutWorker | None, step: int, total: int) -> dict[str, float]:
    """One step: its rollout, training, weights to the engines, evaluation and checkpoint."""
    config, r, ck = run.config, run.config.rollout, run.config.checkpoint
    t0 = time.perf_counter()
    busy0 = worker.gate.busy_seconds() if worker is not None else 0.0
    if worker is None:
        groups, metrics = _rollout(run, step)
    else:
        groups, metrics = worker.get_batch(step)
        if not groups:
            raise LoopError(
                f"step {step}: the rollout worker has no group left to train on (the data ran out)"
            )
        _save_dump(run, groups, step)
    metrics["perf/rollout_time"] = time.perf_counter() - t0
    if not config.log.debug_rollout_only:
        metrics.update(_train(run, groups, step, total, worker))
    done = step + 1
    if r.eval_interval and run.data.eval_datasets and (done % r.eval_interval == 0 or done == total):
        metrics.update(_evaluate(run, done, worker))
    if ck.save is not None and ((ck.save_interval and done % ck.save_interval == 0) or done == total):
        extra = {"next_step": done, "dataset": run.data.dataset.state_dict(), **run.manager.state_dict()}
        if worker is not None:  # it draws prompts meanwhile: its snapshot of the dataset goes with its own
            extra["dataset"], extra["rollout_worker"] = worker.state_dict()
        run.placement.save_checkpoint(ck.save, done, extra)
    step_time = time.perf_counter() - t0
    metrics["perf/step_time"] = step_time
    # Idle fractions of the step: the trainer waits for the rollout; the engines are busy while
    # requests are in flight (asynchronous) or during the rollout phase (synchronous).
    waited = metrics.pop("async/wait_time", metrics["perf/rollout_time"])
    busy = worker.gate.busy_seconds() - busy0 if worker is not None else metrics["perf/rollout_time"]
    metrics["perf/trainer_idle_frac"] = min(1.0, waited / step_time) if step_time > 0 else 0.0
    metrics["perf/engine_idle_frac"] = max(0.0, 1.0 - busy / step_time) if step_time > 0 else 0.0
    metrics.pop("async/engine_busy_time", None)
    return metrics


def _worker(run: Run) -> RolloutWorker:
    """The rollout worker of an asynchronous run (``one-step-off``: bound 1, batches in order)."""
    r = run.config.rollout
    assert r.rollout_batch_size is not None
    one_step_off = r.async_mode == "one-step-off"
    settings = WorkerSettings(
        batch_groups=r.rollout_batch_size,
        max_staleness=1 if one_step_off else r.max_weight_staleness,
        total_groups=_num_rollout(run.config, len(run.data.dataset)) * r.rollout_batch_size,
        ordered=one_step_off,
        stale_action=r.stale_group_action,
        mask_offpolicy=r.mask_offpolicy_in_partial_rollout,
    )
    return RolloutWorker(run.manager, settings, n_samples=r.n_samples_per_prompt)


def _resume(run: Run, worker: RolloutWorker | None) -> int:
    """Restore the trainer, the data's position, the sample numbering and the rollout worker's
    pending prompts from ``--load``, and give the engines the restored weights; the step to
    continue from. A malformed state raises :class:`LoopError` before anything changes."""
    load = run.config.checkpoint.load
    assert load is not None
    extra = run.placement.load_checkpoint(load)
    try:
        start = int(extra["next_step"])
        dataset_state, index = extra["dataset"], {"sample_index": extra["sample_index"]}
        worker_state = extra.get("rollout_worker")
        if worker_state is not None and not isinstance(worker_state, dict):
            raise ValueError(f"rollout_worker must be an object, got {type(worker_state).__name__}")
        if worker is not None and worker_state is not None:
            worker.load_state_dict(worker_state)
    except (KeyError, TypeError, ValueError) as e:
        raise LoopError(f"--load {load}: malformed loop state in the checkpoint: {e}") from None
    if worker is None and worker_state is not None and worker_state.get("pending_prompts"):
        raise LoopError(
            f"--load {load} was saved by an asynchronous run with {len(worker_state['pending_prompts'])} prompts "
            "drawn but not trained; resume it with the same --async-mode, which generates them first"
        )
    run.data.dataset.load_state_dict(dataset_state)
    run.manager.load_state_dict(index)
    run.placement.push_weights(start)
    run.placement.sleep("trainers")  # the rollout comes next
    return start


def _rollout(run: Run, step: int) -> tuple[list[Group], dict[str, float]]:
    """Step ``step``'s groups: generated and scored, replayed from a dump, or SFT targets."""
    lg = run.config.log
    metrics: dict[str, float] = {}
    if lg.load_debug_rollout_data is not None:
        groups = load_rollout_dump(_dump_path(lg.load_debug_rollout_data, step))
    elif run.config.train.loss_type == "policy_loss":
        result = asyncio.run(run.manager.generate_rollout(step))
        groups, metrics = result.groups, result.metrics
    else:
        groups = sft_groups(run.config, run.data, step)
    _save_dump(run, groups, step)
    return groups, metrics


def _save_dump(run: Run, groups: list[Group], step: int) -> None:
    """``--save-debug-rollout-data``: the groups step ``step`` trains on."""
    template = run.config.log.save_debug_rollout_data
    if template is not None:
        path = _dump_path(template, step)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_rollout_dump(groups, path)


def _train(
    run: Run, groups: list[Group], step: int, total: int, worker: RolloutWorker | None
) -> dict[str, float]:
    """The trainer's half of the step, with the device handed over around it (``--offload-*``),
    then the weights to the engines (asynchronous runs: every step; without ``--partial-rollout``
    the rollout worker holds generation until the requests in flight finish, so that no sample
    is cut in two by the update)."""
    placement = run.placement
    t0 = time.perf_counter()
    placement.sleep("engines")
    placement.wake("trainers")
    metrics = placement.train(groups, step)
    metrics["perf/train_time"] = time.perf_counter() - t0
    metrics["perf/tokens_per_s"] = metrics.pop("perf/tokens_per_s_train_tokens") / metrics["perf/train_time"]
    placement.wake("engines")
    # --update-weights-interval k: the engines keep generating with weights up to k-1 steps old
    # (the samples' weight_versions say which); the last step always syncs.
    if worker is not None:
        t1 = time.perf_counter()
        hold = not run.config.rollout.partial_rollout
        if hold:
            worker.hold(timeout_s=_HOLD_TIMEOUT_S)
        try:
            metrics["perf/update_weights_time"] = placement.push_weights(step + 1)
        finally:
            if hold:
                worker.release()
        worker.set_version(step + 1)
        metrics["perf/hold_and_update_time"] = time.perf_counter() - t1
    elif (step + 1) % run.config.placement.update_weights_interval == 0 or step + 1 == total:
        metrics["perf/update_weights_time"] = placement.push_weights(step + 1)
    placement.sleep("trainers")
    return metrics


def _evaluate(run: Run, step: int, worker: RolloutWorker | None = None) -> dict[str, float]:
    """Every evaluation set (in the rollout worker's loop when there is one: it owns the manager)."""
    out: dict[str, float] = {}
    n = run.config.rollout.n_samples_per_eval_prompt
    for name, dataset in run.data.eval_datasets.items():
        coro = run.manager.evaluate(name, dataset, step, n)
        out.update(asyncio.run(coro) if worker is None else worker.run(coro))
    return out


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


def sft_groups(config: MilesConfig, data: RolloutData, step: int) -> list[Group]:
    """SFT warm-up (``--loss-type sft_loss``): each prompt's label is the target response."""
    r = config.rollout
    assert r.rollout_batch_size is not None
    tok = data.tokenizer
    groups = []
    for s in data.dataset.next_batch(r.rollout_batch_size):
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


__all__ = [
    "LoopError",
    "RolloutData",
    "Run",
    "hook_args",
    "load_rollout_data",
    "preflight",
    "run_train",
    "sft_groups",
    "train_loop",
]
