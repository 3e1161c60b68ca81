"""Score samples with a built-in or custom reward; failures mark samples, never stop the run.

Contract of a reward hook (slime's): per sample ``async def rm(args, sample) -> float``; with
``group_rm``, per group ``async def rm(args, samples) -> list[float]`` (one reward per sample,
in order). Plain ``def`` functions are accepted and called directly on the event loop, so
they should be quick (the built-ins are). A hook may return a dict of named rewards; then
``args.reward_key`` picks the one used as ``Sample.reward`` and the dict is kept in
``sample.metadata["reward_details"]``.

Samples already ``FAILED`` or ``ABORTED`` are not scored. A hook that raises, or returns
something that is not a finite number, marks its sample (with ``group_rm``: its whole group)
``FAILED`` with ``Sample.error`` set to ``"<ExceptionType>: <message>"``; a
:class:`FailureLog` counts errors per distinct message and logs each message once.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import math
from collections.abc import Callable, Sequence
from typing import Any

from miles.rewards.registry import get_reward_function, load_function
from miles.types import Sample, SampleStatus

__all__ = ["FailureLog", "resolve_reward", "score_samples"]

logger = logging.getLogger(__name__)

RewardSpec = str | Callable[..., Any]
FAILED_METRIC = "rollout/failed_samples"


class FailureLog:
    """Errors of failed samples: counted per distinct message, each message logged once.

    The caller reports :meth:`metrics` (``rollout/failed_samples``) every rollout step; the
    log object may live for the whole run so that a recurring error is not logged again.
    """

    def __init__(self, log: logging.Logger | None = None) -> None:
        self.counts: dict[str, int] = {}
        self._log = log or logger

    def record(self, message: str) -> None:
        if message not in self.counts:
            self.counts[message] = 0
            self._log.warning("%s: sample failed: %s", FAILED_METRIC, message)
        self.counts[message] += 1

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def metrics(self) -> dict[str, float]:
        return {FAILED_METRIC: float(self.total)}

    def summary(self) -> str:
        """One line per distinct error, most frequent first: ``"12x ValueError: ..."``."""
        items = sorted(self.counts.items(), key=lambda kv: -kv[1])
        return "\n".join(f"{n}x {msg}" for msg, n in items)

    def fail(self, sample: Sample, error: BaseException | str) -> None:
        """Mark ``sample`` failed with ``error`` and record it."""
        message = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
        sample.status = SampleStatus.FAILED
        sample.error = message
        sample.reward = None
        self.record(message)


def resolve_reward(rm_type: str | None, custom_rm_path: str | None) -> RewardSpec:
    """What :func:`score_samples` should use: the ``--custom-rm-path`` function if set, else
    the ``--rm-type`` name (checked now, so a typo fails at start-up, not mid-rollout)."""
    if custom_rm_path:
        return load_function(custom_rm_path, what="reward function")
    if rm_type:
        get_reward_function(rm_type)
        return rm_type
    raise ValueError("no reward: set --rm-type (e.g. math, countdown, exact) or --custom-rm-path")


async def score_samples(
    samples: Sequence[Sample],
    rm: RewardSpec,
    group_rm: bool = False,
    args: Any = None,
    failures: FailureLog | None = None,
) -> None:
    """Set ``sample.reward`` on every scorable sample (module docstring has the contract).

    ``rm`` is a built-in name (``--rm-type``) or a reward function. In per-sample mode with a
    name, ``sample.metadata["rm_type"]`` overrides the name for that sample (as slime does).
    With ``group_rm`` the function is called once per ``group_index``.
    """
    failures = failures if failures is not None else FailureLog()
    todo = [s for s in samples if s.status not in (SampleStatus.FAILED, SampleStatus.ABORTED)]
    if group_rm:
        fn = get_reward_function(rm) if isinstance(rm, str) else rm
        groups: dict[int, list[Sample]] = {}
        for s in todo:
            groups.setdefault(s.group_index, []).append(s)
        await asyncio.gather(*(_score_group(fn, args, g, failures) for g in groups.values()))
    else:
        await asyncio.gather(*(_score_one(_pick(rm, s), args, s, failures) for s in todo))


def _pick(rm: RewardSpec, sample: Sample) -> RewardSpec:
    override = sample.metadata.get("rm_type") if isinstance(rm, str) else None
    return override if isinstance(override, str) and override else rm


async def _call(fn: Callable[..., Any], *call_args: Any) -> Any:
    result = fn(*call_args)
    if inspect.isawaitable(result):
        result = await result
    return result


async def _score_one(rm: RewardSpec, args: Any, sample: Sample, failures: FailureLog) -> None:
    try:
        fn = get_reward_function(rm) if isinstance(rm, str) else rm
        sample.reward = _to_reward(await _call(fn, args, sample), args, sample)
    except Exception as e:
        failures.fail(sample, e)


async def _score_group(fn: Callable[..., Any], args: Any, group: list[Sample], failures: FailureLog) -> None:
    try:
        values = await _call(fn, args, group)
        if not isinstance(values, (list, tuple)) or len(values) != len(group):
            got = f"{len(values)} values" if isinstance(values, (list, tuple)) else type(values).__name__
            raise TypeError(
                f"group reward function must return one reward per sample ({len(group)}), got {got}"
            )
        rewards = [_to_reward(v, args, s) for v, s in zip(values, group)]
    except Exception as e:
        for s in group:
            failures.fail(s, e)
        return
    for s, r in zip(group, rewards):
        s.reward = r


def _to_reward(value: Any, args: Any, sample: Sample) -> float:
    if isinstance(value, dict):
        key = getattr(args, "reward_key", None)
        if key is None:
            raise TypeError(f"reward function returned a dict with keys {sorted(value)}; set --reward-key")
        if key not in value:
            raise KeyError(f"reward dict has no key {key!r} (--reward-key); keys: {sorted(value)}")
        sample.metadata["reward_details"] = value
        value = value[key]
    if isinstance(value, bool):
        return float(value)
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        raise TypeError(f"reward must be a finite number, got {value!r}")
    return float(value)
