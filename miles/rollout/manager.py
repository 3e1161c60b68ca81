"""``RolloutManager``: prompts -> engine (through an ``EngineClient``) -> rewards -> ``Group``s.

One rollout step draws ``over_sampling_batch_size`` prompts at a time, generates
``n_samples_per_prompt`` samples for each with bounded concurrency, scores them, and keeps the
groups the dynamic-sampling filter accepts, until ``rollout_batch_size`` groups are kept (or the
data runs out). A sample whose generation or reward fails (or whose reward takes longer than
``--reward-timeout``) is marked ``failed``, its error is logged once per distinct message, and the
run goes on - unless every sample of ``--max-failed-rollouts`` consecutive steps failed: then
:class:`RolloutError` stops the run, naming the most frequent errors. Evaluation never counts.
A reward that stalls is reported every ``reward_stall_log_s`` seconds, and a progress line shows
each rollout and evaluation (samples done out of the expected total).

Sampling seeds are derived from (``rollout_seed``, step, sample index), so a resumed run
regenerates exactly the rollout an uninterrupted run would have.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import statistics
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from miles.config import RolloutConfig
from miles.rewards.registry import load_function
from miles.rewards.scoring import FailureLog, RewardSpec, RewardWatch, resolve_reward, score_samples
from miles.rollout.dataset import PromptDataset
from miles.rollout.filters import apply_sample_filter, call_dynamic_filter, load_filter
from miles.rollout.gate import GenerationGate
from miles.rollout.generate import GenerateClient, generate_sample, sample_seed
from miles.types import Group, Sample, SampleStatus, SamplingParams
from miles.utils.progress import Progress

__all__ = ["RolloutError", "RolloutManager", "RolloutResult", "rollout_metrics"]

log = logging.getLogger(__name__)

_ERRORS_SHOWN = 5  # distinct errors quoted in a RolloutError
_ERROR_CHARS = 300  # of each


class RolloutError(RuntimeError):
    """A rollout step that cannot give anything to train on: every sample of several steps in a
    row failed, or no group survived the filters. The message says why and quotes the errors."""


@dataclass
class RolloutResult:
    groups: list[Group]
    metrics: dict[str, float] = field(default_factory=dict)


class RolloutManager:
    """Generates and scores rollouts. ``args`` is what slime-style hooks receive as ``args``."""

    def __init__(
        self,
        config: RolloutConfig,
        dataset: PromptDataset,
        client: GenerateClient,
        *,
        args: Any = None,
        concurrency: int = 64,
        stop_token_ids: Sequence[int] = (),
        routed_experts_top_k: int | None = None,
        reward_stall_log_s: float = 30.0,
    ) -> None:
        if config.rollout_batch_size is None:
            raise ValueError("rollout_batch_size is required")
        if concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {concurrency}")
        self.config = config
        self.dataset = dataset
        self.client = client
        self.args = args
        self.semaphore = asyncio.Semaphore(concurrency)
        self.reward: RewardSpec = resolve_reward(config.rm_type, config.custom_rm_path)
        self.generate_fn: Callable[..., Any] | None = (
            load_function(config.custom_generate_function_path, require_async=True, what="generate function")
            if config.custom_generate_function_path
            else None
        )
        self.dynamic_filter = (
            load_filter(config.dynamic_sampling_filter_path) if config.dynamic_sampling_filter_path else None
        )
        self.sample_filter = (
            load_filter(config.rollout_sample_filter_path) if config.rollout_sample_filter_path else None
        )
        self.failures = FailureLog(log)
        self.reward_watch = RewardWatch(reward_stall_log_s, log)
        # Rollout steps in a row in which every sample failed, and their errors.
        self.failed_steps = 0
        self._failed_step_errors: Counter[str] = Counter()
        self.stop_token_ids = tuple(config.rollout_stop_token_ids) + tuple(stop_token_ids)
        self._next_index = 0
        # Rollout routing replay: ask the engine for every token's experts (the model's top-k).
        self.routed_experts_top_k = routed_experts_top_k
        # The asynchronous rollout worker's gate (miles.rollout.async_worker): generation waits
        # while it is closed, and it counts the requests in flight.
        self.gate: GenerationGate | None = None

    def state_dict(self) -> dict[str, int]:
        """Where sample numbering stands (JSON-serialisable; the prompts' own is the dataset's)."""
        return {"sample_index": self._next_index}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue numbering where :meth:`state_dict` was taken; ``ValueError`` naming the field
        for a malformed state (nothing changes then)."""
        index = state.get("sample_index")
        if type(index) is not int or index < 0:
            raise ValueError(f"sample_index must be a non-negative integer, got {index!r}")
        self._next_index = index

    def sampling_params(self, seed: int | None, *, eval_mode: bool = False) -> SamplingParams:
        c = self.config
        pick = (lambda ev, tr: tr if ev is None else ev) if eval_mode else (lambda ev, tr: tr)
        return SamplingParams(
            max_new_tokens=pick(c.eval_max_response_len, c.rollout_max_response_len) or 1024,
            temperature=pick(c.eval_temperature, c.rollout_temperature),
            top_p=pick(c.eval_top_p, c.rollout_top_p),
            top_k=pick(c.eval_top_k, c.rollout_top_k),
            stop=tuple(c.rollout_stop),
            stop_token_ids=self.stop_token_ids,
            skip_special_tokens=c.rollout_skip_special_tokens,
            sampling_seed=seed,
        )

    async def _generate_one(
        self, sample: Sample, params: SamplingParams, routed: bool = False
    ) -> list[Sample]:
        async with self.semaphore, self.gate.slot() if self.gate is not None else contextlib.nullcontext():
            try:
                if self.generate_fn is not None:
                    out = await self.generate_fn(self.args, sample, params)
                    return list(out) if isinstance(out, list) else [out]
                return [
                    await generate_sample(
                        self.client,
                        sample,
                        params,
                        routed_experts_top_k=self.routed_experts_top_k if routed else None,
                    )
                ]
            except Exception as e:  # the engine is down past its retries, or a hook raised
                self.failures.fail(sample, e)
                return [sample]

    def expand(self, prompts: list[Sample], n: int) -> list[list[Sample]]:
        """``n`` samples of each prompt, numbered on from :meth:`state_dict`'s ``sample_index``."""
        groups = []
        for prompt in prompts:
            group = []
            for _ in range(n):
                s = Sample(
                    prompt=prompt.prompt,
                    prompt_ids=list(prompt.prompt_ids),
                    label=prompt.label,
                    metadata=dict(prompt.metadata),
                    index=self._next_index,
                    group_index=prompt.group_index,
                )
                self._next_index += 1
                group.append(s)
            groups.append(group)
        return groups

    async def run_group(
        self,
        group: list[Sample],
        seed_step: int,
        *,
        eval_mode: bool = False,
        progress: Progress | None = None,
    ) -> list[Sample]:
        """Generate and score one group's samples; each sample's seed is derived from
        (``--rollout-seed``, ``seed_step``, its index). Failures are marked on the samples."""
        seed_base = self.config.rollout_seed + (1_000_000 if eval_mode else 0)
        outs = await asyncio.gather(
            *(
                self._generate_one(
                    s,
                    self.sampling_params(sample_seed(seed_base, seed_step, s.index), eval_mode=eval_mode),
                    routed=not eval_mode,  # evaluation does not train: no routing record
                )
                for s in group
            )
        )
        samples = [x for out in outs for x in out]
        await score_samples(
            samples,
            self.reward,
            self.config.group_rm,
            self.args,
            self.failures,
            timeout_s=self.config.reward_timeout,
            watch=self.reward_watch,
        )
        if progress is not None:
            progress.advance(len(group))
        return samples

    async def _run_groups(
        self, groups: list[list[Sample]], step: int, eval_mode: bool, progress: Progress
    ) -> list[list[Sample]]:
        async with self.reward_watch.watching():  # one stall line for all groups, not one each
            return list(
                await asyncio.gather(
                    *(self.run_group(g, step, eval_mode=eval_mode, progress=progress) for g in groups)
                )
            )

    async def generate_rollout(self, step: int) -> RolloutResult:
        """Groups for one RL step (``rollout_batch_size`` of them unless the data runs out).

        Raises :class:`RolloutError` after ``max_failed_rollouts`` consecutive steps in which
        every sample failed, or when no group survives the filters.
        """
        c = self.config
        assert c.rollout_batch_size is not None
        want, draw = c.rollout_batch_size, c.over_sampling_batch_size or c.rollout_batch_size
        kept: list[Group] = []
        drops: Counter[str] = Counter()
        drawn = 0
        failed_before = self.failures.total
        produced: list[Sample] = []  # every sample of this step, kept or dropped by the filter
        with Progress(f"rollout {step}", want * c.n_samples_per_prompt, "samples") as progress:
            while len(kept) < want:
                prompts = self.dataset.next_batch(draw)
                if not prompts:
                    break
                drawn += len(prompts)
                # Over-sampling draws more than the first estimate: the total grows with it.
                progress.total = max(progress.total, drawn * c.n_samples_per_prompt)
                groups = await self._run_groups(
                    self.expand(prompts, c.n_samples_per_prompt), step, False, progress
                )
                for samples in groups:
                    produced += samples
                    verdict = call_dynamic_filter(self.dynamic_filter, self.args, samples)
                    if not verdict.keep:
                        drops[verdict.reason or "filtered"] += 1
                        continue
                    if len(kept) < want:
                        kept.append(Group(index=samples[0].group_index, samples=tuple(samples)))
        failed = self.failures.total - failed_before
        self.count_failed_step(step, produced)
        if not kept:
            raise RolloutError(
                f"rollout step {step}: no group survived (drew {drawn} prompts; dropped {dict(drops)}; "
                f"failed samples {failed})"
            )
        removed = apply_sample_filter(self.sample_filter, self.args, [s for g in kept for s in g.samples])
        metrics = rollout_metrics(kept, prefix="rollout")
        metrics["rollout/failed_samples"] = float(failed)
        metrics["rollout/num_prompts_drawn"] = float(drawn)
        metrics["rollout/removed_samples"] = float(removed)
        for reason, count in drops.items():
            metrics[f"rollout/dynamic_filter/drop_{reason}"] = float(count)
        return RolloutResult(kept, metrics)

    def count_failed_step(self, step: int, samples: list[Sample]) -> None:
        """Count a step in which every sample failed; raise once ``max_failed_rollouts`` came in a row."""
        if not samples or any(s.status != SampleStatus.FAILED for s in samples):
            self.failed_steps = 0
            self._failed_step_errors.clear()
            return
        self.failed_steps += 1
        self._failed_step_errors.update((s.error or "unknown error")[:_ERROR_CHARS] for s in samples)
        limit = self.config.max_failed_rollouts
        if self.failed_steps < limit:
            log.warning(
                "rollout step %d: all %d samples failed (%d of %d consecutive such steps stop the run: "
                "--max-failed-rollouts)",
                step,
                len(samples),
                self.failed_steps,
                limit,
            )
            return
        errors = self._failed_step_errors.most_common()
        lines = [f"  {n}x {message}" for message, n in errors[:_ERRORS_SHOWN]]
        if len(errors) > _ERRORS_SHOWN:
            lines.append(f"  ... and {len(errors) - _ERRORS_SHOWN} other distinct errors")
        raise RolloutError(
            f"every sample failed in {self.failed_steps} consecutive rollout steps (up to step {step}; "
            f"--max-failed-rollouts {limit}); most frequent errors:\n" + "\n".join(lines)
        )

    async def evaluate(
        self, name: str, dataset: PromptDataset, step: int, n_samples: int = 1
    ) -> dict[str, float]:
        """Mean reward over every prompt of ``dataset`` (``eval/<name>``), plus response lengths.
        Failed samples are reported, never counted towards ``--max-failed-rollouts``."""
        groups = self.expand(dataset.samples(), n_samples)
        with Progress(f"eval {name}", sum(len(g) for g in groups), "samples") as progress:
            done = await self._run_groups(groups, step, True, progress)
        return rollout_metrics([Group(g[0].group_index, tuple(g)) for g in done], prefix=f"eval/{name}")


def rollout_metrics(groups: Sequence[Group], prefix: str) -> dict[str, float]:
    """slime-named rollout metrics: raw reward, response lengths, truncation and failure fractions."""
    samples = [s for g in groups for s in g.samples]
    scored = [float(s.reward) for s in samples if s.reward is not None and s.status.trainable]
    lengths = [s.response_len for s in samples]
    reward_key = f"{prefix}/raw_reward" if prefix == "rollout" else prefix
    out = {
        reward_key: statistics.fmean(scored) if scored else 0.0,
        f"{prefix}/response_len/mean": statistics.fmean(lengths) if lengths else 0.0,
        f"{prefix}/response_len/max": float(max(lengths, default=0)),
        f"{prefix}/truncated_frac": sum(s.status == SampleStatus.TRUNCATED for s in samples)
        / max(len(samples), 1),
        f"{prefix}/num_samples": float(len(samples)),
    }
    if prefix == "rollout":
        spread = [g for g in groups if len({s.reward for s in g.samples}) > 1]
        out["rollout/groups_with_reward_spread_frac"] = len(spread) / max(len(groups), 1)
    return out
