"""score_samples: built-ins, custom hooks (async/sync, group), failures and their log."""

from __future__ import annotations

import asyncio
import logging
from types import SimpleNamespace

import pytest

from miles.rewards.scoring import FailureLog, resolve_reward, score_samples
from miles.types import Sample, SampleStatus


def _samples(responses, label="4", groups=None):
    groups = groups or [0] * len(responses)
    return [
        Sample(response=r, label=label, index=i, group_index=g)
        for i, (r, g) in enumerate(zip(responses, groups))
    ]


def test_builtin_by_name():
    samples = _samples([r"\boxed{4}", r"\boxed{5}"])
    asyncio.run(score_samples(samples, "math"))
    assert [s.reward for s in samples] == [1.0, 0.0]


def test_metadata_rm_type_overrides_per_sample():
    samples = _samples(["4", "4"])
    samples[1].metadata["rm_type"] = "exact"
    asyncio.run(score_samples(samples, "deepscaler"))
    assert [s.reward for s in samples] == [0.0, 1.0]


def test_async_and_sync_custom_functions():
    async def arm(args, sample):
        await asyncio.sleep(0)
        return len(sample.response) * args.scale

    def srm(args, sample):
        return True

    args = SimpleNamespace(scale=0.5)
    samples = _samples(["ab", "abcd"])
    asyncio.run(score_samples(samples, arm, args=args))
    assert [s.reward for s in samples] == [1.0, 2.0]
    asyncio.run(score_samples(samples, srm, args=args))
    assert [s.reward for s in samples] == [1.0, 1.0]


def test_raising_reward_marks_failed_and_logs_once_per_message(caplog):
    def rm(args, sample):
        if sample.response == "boom":
            raise ValueError("judge crashed")
        if sample.response == "bad":
            return "high"
        return 1.0

    samples = _samples(["ok", "boom", "boom", "bad", "boom"])
    log = FailureLog()
    with caplog.at_level(logging.WARNING, logger="miles.rewards.scoring"):
        asyncio.run(score_samples(samples, rm, failures=log))
        asyncio.run(score_samples(_samples(["boom"]), rm, failures=log))  # seen: not logged again
    assert samples[0].reward == 1.0 and samples[0].status == SampleStatus.PENDING
    for s in samples[1:]:
        assert s.status == SampleStatus.FAILED and s.reward is None
    assert samples[1].error == "ValueError: judge crashed"
    assert samples[3].error == "TypeError: reward must be a finite number, got 'high'"
    assert log.counts == {
        "ValueError: judge crashed": 4,
        "TypeError: reward must be a finite number, got 'high'": 1,
    }
    assert log.metrics() == {"rollout/failed_samples": 5.0}
    assert log.summary().splitlines()[0] == "4x ValueError: judge crashed"
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 2
    assert all("rollout/failed_samples" in w for w in warnings)


def test_failed_and_aborted_samples_are_not_scored():
    calls = []

    def rm(args, sample):
        calls.append(sample.index)
        return 1.0

    samples = _samples(["a", "b", "c"])
    samples[0].status = SampleStatus.FAILED
    samples[1].status = SampleStatus.ABORTED
    asyncio.run(score_samples(samples, rm))
    assert calls == [2]


def test_group_rm():
    async def grm(args, samples):
        return [float(i) for i in range(len(samples))]

    samples = _samples(["a", "b", "c", "d", "e"], groups=[0, 0, 1, 1, 1])
    asyncio.run(score_samples(samples, grm, group_rm=True))
    assert [s.reward for s in samples] == [0.0, 1.0, 0.0, 1.0, 2.0]


def test_group_rm_wrong_length_fails_the_group():
    def grm(args, samples):
        return [1.0] if samples[0].group_index == 0 else [1.0] * len(samples)

    samples = _samples(["a", "b", "c"], groups=[0, 0, 1])
    log = FailureLog()
    asyncio.run(score_samples(samples, grm, group_rm=True, failures=log))
    assert [s.status for s in samples[:2]] == [SampleStatus.FAILED] * 2
    assert samples[2].reward == 1.0
    assert "one reward per sample (2), got 1 values" in samples[0].error
    assert log.total == 2


def test_dict_reward_needs_reward_key():
    def rm(args, sample):
        return {"score": -1.0, "acc": False}

    samples = _samples(["x"])
    asyncio.run(score_samples(samples, rm, args=SimpleNamespace(reward_key="score")))
    assert samples[0].reward == -1.0
    assert samples[0].metadata["reward_details"] == {"score": -1.0, "acc": False}
    samples = _samples(["x"])
    asyncio.run(score_samples(samples, rm, args=SimpleNamespace(reward_key=None)))
    assert samples[0].status == SampleStatus.FAILED
    assert "set --reward-key" in samples[0].error


def test_unknown_rm_type_fails_samples_with_suggestion():
    samples = _samples(["x"])
    asyncio.run(score_samples(samples, "mathh"))
    assert "did you mean math?" in samples[0].error


def test_resolve_reward():
    assert resolve_reward("countdown", None) == "countdown"
    fn = resolve_reward("math", "miles.rewards.math.rm_math")
    assert callable(fn) and fn.__name__ == "rm_math"
    with pytest.raises(ValueError, match="unknown rm_type 'mth'"):
        resolve_reward("mth", None)
    with pytest.raises(ValueError, match="--rm-type"):
        resolve_reward(None, None)
