"""Shared records: validation messages and invariants."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from miles.types import Group, Sample, SampleStatus, SamplingParams, TrainBatch, WeightVersion


def test_sampling_params_defaults_and_greedy():
    p = SamplingParams(temperature=0)
    assert p.greedy and p.top_k == -1 and p.stop == ()
    assert SamplingParams(stop="###").stop == ("###",)
    assert SamplingParams(stop=["a", "b"], stop_token_ids=[2]).to_dict()["stop"] == ["a", "b"]


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("temperature", -0.1, "temperature must be a number >= 0"),
        ("temperature", float("nan"), "temperature must be a number >= 0"),
        ("top_p", 0.0, r"top_p must be a number in \(0, 1\]"),
        ("top_k", 0, "top_k must be -1 or an integer >= 1"),
        ("min_p", 1.5, r"min_p must be a number in \[0, 1\]"),
        ("max_new_tokens", -1, "max_new_tokens must be an integer >= 0"),
        ("max_new_tokens", 2.5, "max_new_tokens must be an integer >= 0"),
        ("repetition_penalty", 0, "repetition_penalty must be a number > 0"),
        ("frequency_penalty", 3, r"frequency_penalty must be a number in \[-2, 2\]"),
        ("presence_penalty", -3, r"presence_penalty must be a number in \[-2, 2\]"),
        ("n", 0, "n must be an integer >= 1"),
        ("stop", [""], "stop must be a list of non-empty strings"),
        ("stop_token_ids", [-1], "stop_token_ids must be a list of token ids >= 0"),
        ("sampling_seed", "x", "sampling_seed must be an integer or null"),
        ("temperature", True, "temperature must be a number >= 0"),
    ],
)
def test_sampling_params_validation_names_the_field(field, value, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**{field: value})


def test_min_new_tokens_above_max():
    with pytest.raises(ValueError, match=r"min_new_tokens \(5\) exceeds max_new_tokens \(3\)"):
        SamplingParams(min_new_tokens=5, max_new_tokens=3)


def test_sampling_params_from_dict_rejects_unknown_fields():
    assert SamplingParams.from_dict({"temperature": 0.5, "max_new_tokens": 4}).temperature == 0.5
    with pytest.raises(ValueError, match="unknown sampling_params field.*: max_tokens"):
        SamplingParams.from_dict({"max_tokens": 4})


def test_sampling_params_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        SamplingParams().temperature = 2.0  # type: ignore[misc]


def test_weight_version_round_trip():
    v = WeightVersion().next().next()
    assert str(v) == "2" and WeightVersion.parse("2") == v and WeightVersion.parse(3) > v
    for bad in ("abc", "-1", None):
        with pytest.raises(ValueError, match="weight_version must be a non-negative integer"):
            WeightVersion.parse(bad)  # type: ignore[arg-type]


def test_sample_lengths_and_check():
    s = Sample(prompt_ids=[1, 2], response_ids=[3, 4, 5], rollout_logprobs=[-0.1, -0.2, -0.3])
    assert s.response_len == 3 and s.total_len == 5 and s.effective_loss_mask() == [1, 1, 1]
    s.check()
    s.loss_mask = [1, 0]
    with pytest.raises(ValueError, match="loss_mask has 2 entries, response_ids has 3"):
        s.check()
    s.loss_mask, s.rollout_logprobs = None, [0.0]
    with pytest.raises(ValueError, match="rollout_logprobs has 1 entries, response_ids has 3"):
        s.check()
    assert SampleStatus.TRUNCATED.trainable and not SampleStatus.FAILED.trainable


def test_group_needs_samples():
    g = Group(index=0, samples=(Sample(reward=1.0), Sample(reward=0.0)))
    assert g.rewards == [1.0, 0.0] and len(g) == 2
    with pytest.raises(ValueError, match="group 3 has no samples"):
        Group(index=3, samples=())


def _batch(**over):
    t = torch.zeros(5)
    fields = dict(
        input_ids=torch.zeros(5, dtype=torch.long),
        positions=torch.tensor([0, 1, 2, 0, 1]),
        cu_seqlens=torch.tensor([0, 3, 5], dtype=torch.int32),
        loss_mask=t,
        rollout_logprobs=t,
        advantages=t,
        rewards=torch.zeros(2),
        response_lens=torch.tensor([1, 1]),
        sample_indices=(0, 1),
    )
    fields.update(over)
    return TrainBatch(**fields)


def test_train_batch_check():
    b = _batch()
    b.check()
    assert b.num_sequences == 2 and b.num_tokens == 5
    with pytest.raises(ValueError, match="TrainBatch.advantages has 4 entries, input_ids has 5"):
        _batch(advantages=torch.zeros(4)).check()
    with pytest.raises(ValueError, match="TrainBatch.rewards has 3 entries for 2 sequences"):
        _batch(rewards=torch.zeros(3)).check()
    with pytest.raises(ValueError, match="sample_indices has 1 entries for 2 sequences"):
        _batch(sample_indices=(0,)).check()
    with pytest.raises(ValueError, match="cu_seqlens ends at 4, input_ids has 5"):
        _batch(cu_seqlens=torch.tensor([0, 3, 4], dtype=torch.int32)).check()
