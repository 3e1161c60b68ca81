"""Dynamic-sampling filter built-in, loading, and the per-sample filter hook."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from miles.rewards import FunctionLoadError
from miles.rollout.filters import (
    DynamicFilterOutput,
    apply_sample_filter,
    call_dynamic_filter,
    check_reward_nonzero_std,
    load_filter,
)
from miles.types import Sample


def _group(*rewards):
    return [Sample(reward=r, response_ids=[1, 2, 3]) for r in rewards]


def test_nonzero_std():
    assert check_reward_nonzero_std(None, _group(1.0, 0.0, 1.0)) == DynamicFilterOutput(keep=True)
    assert check_reward_nonzero_std(None, _group(1.0, 1.0)) == DynamicFilterOutput(False, "zero_std_1.0")
    assert check_reward_nonzero_std(None, _group(-1.0, -1.0, None)).reason == "zero_std_-1.0"
    assert check_reward_nonzero_std(None, _group(1.0, None)) == DynamicFilterOutput(False, "too_few_rewards")


def test_load_filter_builtin_and_slime_path():
    assert load_filter("check_reward_nonzero_std") is check_reward_nonzero_std
    path = "slime.rollout.filter_hub.dynamic_sampling_filters.check_reward_nonzero_std"
    assert load_filter(path) is check_reward_nonzero_std
    assert load_filter("miles.rollout.filters.check_reward_nonzero_std") is check_reward_nonzero_std
    with pytest.raises(FunctionLoadError, match="filter 'miles.rollout.filters.nope'"):
        load_filter("miles.rollout.filters.nope")


def test_call_dynamic_filter_normalises():
    group = _group(1.0, 0.0)
    assert call_dynamic_filter(None, None, group).keep
    assert call_dynamic_filter(lambda a, s: False, None, group) == DynamicFilterOutput(keep=False)
    slime_style = SimpleNamespace(keep=False, reason="too_easy")
    assert call_dynamic_filter(lambda a, s: slime_style, None, group) == DynamicFilterOutput(
        False, "too_easy"
    )
    with pytest.raises(TypeError, match="expected DynamicFilterOutput or bool"):
        call_dynamic_filter(lambda a, s: 1, None, group)


def test_sample_filter_zeroes_loss_mask():
    def drop_long(args, samples):
        for s in samples:
            if s.reward is not None and s.reward < 0:
                s.remove_sample = True

    group = _group(1.0, -1.0)
    assert apply_sample_filter(drop_long, None, group) == 1
    assert group[0].loss_mask is None
    assert group[1].loss_mask == [0, 0, 0] and group[1].metadata["removed_by_filter"]
    assert apply_sample_filter(None, None, group) == 0
    with pytest.raises(TypeError, match="must return None"):
        apply_sample_filter(lambda a, s: [True, False], None, group)
