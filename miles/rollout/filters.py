"""Dynamic-sampling filters (per group) and the per-sample filter hook.

Dynamic-sampling filter (``--dynamic-sampling-filter-path``), slime's signature::

    def my_filter(args, samples: list[Sample], **kwargs) -> DynamicFilterOutput | bool

``samples`` are the scored samples of one prompt (a group). slime returns the dataclass
``DynamicFilterOutput(keep: bool, reason: str | None = None)`` (``slime/rollout/filter_hub/
base_types.py``); the reason feeds the ``rollout/dynamic_filter/drop_<reason>`` counters.
A bare ``bool`` (slime's legacy form) is accepted too: ``True`` keeps the group.
:func:`call_dynamic_filter` normalises both.

Per-sample filter (``--rollout-sample-filter-path``), slime's signature::

    def my_sample_filter(args, samples: list[Sample]) -> None

slime's hook sets ``sample.remove_sample = True`` on samples that must not be trained on;
they stay in the batch (group sizes, reward normalisation and logs are unchanged) with a zero
loss mask. :func:`apply_sample_filter` does exactly that after calling the hook, and records
``metadata["removed_by_filter"] = True``.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from miles.rewards.registry import load_function
from miles.types import Sample

__all__ = [
    "BUILTIN_FILTERS",
    "DynamicFilterOutput",
    "apply_sample_filter",
    "call_dynamic_filter",
    "check_reward_nonzero_std",
    "load_filter",
]

_STD_EPS = 1e-6  # slime's threshold: torch.tensor(rewards).std() > 1e-6


@dataclass(frozen=True)
class DynamicFilterOutput:
    """Whether to keep a group, and why not (``reason`` is a short metric-name suffix)."""

    keep: bool
    reason: str | None = None


def check_reward_nonzero_std(args: Any, samples: list[Sample], **kwargs: Any) -> DynamicFilterOutput:
    """Keep a group only if its rewards are not all equal (DAPO dynamic sampling).

    Rewards of failed samples (``None``) are ignored; a group with fewer than two rewards is
    dropped (``reason="too_few_rewards"``). A zero-spread group is dropped with
    ``reason="zero_std_<reward rounded to 0.1>"`` as in slime.
    """
    rewards = [float(s.reward) for s in samples if s.reward is not None]
    if len(rewards) < 2:
        return DynamicFilterOutput(keep=False, reason="too_few_rewards")
    if statistics.stdev(rewards) > _STD_EPS:
        return DynamicFilterOutput(keep=True)
    return DynamicFilterOutput(keep=False, reason=f"zero_std_{round(rewards[0], 1)}")


BUILTIN_FILTERS: dict[str, Callable[..., Any]] = {
    "check_reward_nonzero_std": check_reward_nonzero_std,
    # slime / Miles scripts name the filter by its path there; run the built-in for them.
    "slime.rollout.filter_hub.dynamic_sampling_filters.check_reward_nonzero_std": check_reward_nonzero_std,
    "miles.rollout.filter_hub.dynamic_sampling_filters.check_reward_nonzero_std": check_reward_nonzero_std,
}


def load_filter(path: str) -> Callable[..., Any]:
    """A built-in filter by name (or by its slime path), else ``load_function(path)``."""
    builtin = BUILTIN_FILTERS.get(path)
    if builtin is not None:
        return builtin
    return load_function(path, what="filter")


def call_dynamic_filter(
    fn: Callable[..., Any] | None, args: Any, samples: list[Sample], **kwargs: Any
) -> DynamicFilterOutput:
    """Run a group filter; ``None`` keeps everything. Any object with ``keep``/``reason``
    attributes (slime's own dataclass) or a bool is accepted; anything else is a TypeError."""
    if fn is None:
        return DynamicFilterOutput(keep=True)
    out = fn(args, samples, **kwargs)
    if isinstance(out, DynamicFilterOutput):
        return out
    if isinstance(out, bool):
        return DynamicFilterOutput(keep=out)
    if hasattr(out, "keep") and isinstance(out.keep, bool):
        return DynamicFilterOutput(keep=out.keep, reason=getattr(out, "reason", None))
    name = getattr(fn, "__qualname__", repr(fn))
    raise TypeError(f"dynamic sampling filter {name} returned {out!r}; expected DynamicFilterOutput or bool")


def apply_sample_filter(fn: Callable[..., Any] | None, args: Any, samples: list[Sample]) -> int:
    """Run a per-sample filter and zero the loss mask of samples it marked ``remove_sample``.

    Returns the number of samples removed. The hook's return value is ignored (slime's hook
    returns None), so a hook that returns a list by mistake fails loudly instead.
    """
    if fn is None:
        return 0
    out = fn(args, samples)
    if out is not None:
        name = getattr(fn, "__qualname__", repr(fn))
        raise TypeError(
            f"sample filter {name} returned {type(out).__name__}; it must return None and set "
            "sample.remove_sample = True on the samples to drop"
        )
    removed = 0
    for s in samples:
        if getattr(s, "remove_sample", False):
            s.loss_mask = [0] * s.response_len
            s.metadata["removed_by_filter"] = True
            removed += 1
    return removed
