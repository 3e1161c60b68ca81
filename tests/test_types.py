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
        ("temperature", -0.1, "temperature must be a finite number >= 0"),
        ("temperature", float("nan"), "temperature must be a finite number >= 0"),
        ("temperature", float("inf"), "temperature must be a finite number >= 0"),  # JSON 1e999
        ("temperature", 10**400, "temperature must be a finite number >= 0, got an integer of 1329 bits"),
        ("top_p", 0.0, r"top_p must be a number in \(0, 1\]"),
        ("top_p", float("nan"), r"top_p must be a number in \(0, 1\]"),
        ("top_k", 0, r"top_k must be -1 or an integer in \[1, 2147483647\]"),
        ("top_k", -1.0, r"top_k must be -1 or an integer"),
        ("top_k", 2**31, r"top_k must be -1 or an integer"),
        ("min_p", 1.5, r"min_p must be a number in \[0, 1\]"),
        ("max_new_tokens", -1, r"max_new_tokens must be an integer in \[0, 2147483647\]"),
        ("max_new_tokens", 2.5, r"max_new_tokens must be an integer in \[0, 2147483647\]"),
        ("max_new_tokens", 10**30, r"max_new_tokens must be an integer in \[0, 2147483647\]"),
        ("max_new_tokens", "16", r"max_new_tokens must be an integer"),
        ("min_new_tokens", True, r"min_new_tokens must be an integer"),
        ("repetition_penalty", 0, r"repetition_penalty must be a number in \[0.01, 100\]"),
        ("repetition_penalty", 1e-300, r"repetition_penalty must be a number in \[0.01, 100\]"),
        ("repetition_penalty", 1e-45, r"repetition_penalty must be a number in \[0.01, 100\]"),
        ("repetition_penalty", 1e300, r"repetition_penalty must be a number in \[0.01, 100\]"),
        ("frequency_penalty", 3, r"frequency_penalty must be a number in \[-2, 2\]"),
        ("presence_penalty", -3, r"presence_penalty must be a number in \[-2, 2\]"),
        ("n", 0, r"n must be an integer in \[1, 1024\]"),
        ("n", 10**30, r"n must be an integer in \[1, 1024\], got an integer of 100 bits"),
        ("n", 10**12, r"n must be an integer in \[1, 1024\]"),
        ("n", 2.0, r"n must be an integer in \[1, 1024\]"),
        ("stop", [""], "stop must be a string or a list of at most 64 non-empty strings"),
        ("stop", ["x"] * 65, "stop must be a string or a list of at most 64"),
        ("stop", ["x" * 1025], "stop must be .* of at most 1024 characters"),
        ("stop", {"a": 1}, "stop must be a string or a list"),
        ("stop", 7, "stop must be a string or a list"),
        ("stop", [1], "stop must be a string or a list"),
        (
            "stop_token_ids",
            [-1],
            r"stop_token_ids must be a list of at most 1024 token ids in \[0, 2147483647\]",
        ),
        ("stop_token_ids", [2**31], "stop_token_ids must be a list"),
        ("stop_token_ids", list(range(1025)), "stop_token_ids must be a list of at most 1024"),
        ("stop_token_ids", 5, "stop_token_ids must be a list"),
        ("stop_token_ids", "12", "stop_token_ids must be a list"),
        ("stop_token_ids", [True], "stop_token_ids must be a list"),
        ("sampling_seed", "x", r"sampling_seed must be null or an integer in \[-2\*\*63, 2\*\*64\)"),
        ("sampling_seed", 2**64, "sampling_seed must be null or an integer"),
        ("sampling_seed", -(2**63) - 1, "sampling_seed must be null or an integer"),
        ("sampling_seed", 1.5, "sampling_seed must be null or an integer"),
        ("temperature", True, "temperature must be a finite number >= 0"),
        ("ignore_eos", "yes", "ignore_eos must be true or false, got 'yes'"),
        ("ignore_eos", 1, "ignore_eos must be true or false"),
        ("skip_special_tokens", "false", "skip_special_tokens must be true or false"),
        ("spaces_between_special_tokens", None, "spaces_between_special_tokens must be true or false"),
        ("no_stop_trim", 0, "no_stop_trim must be true or false"),
    ],
)
def test_sampling_params_validation_names_the_field(field, value, message):
    with pytest.raises(ValueError, match=f"sampling_params.{message}"):
        SamplingParams(**{field: value})


def test_sampling_params_bounds_accept_their_edges():
    p = SamplingParams(
        n=1024,
        max_new_tokens=2**31 - 1,
        min_new_tokens=2**31 - 1,
        top_k=2**31 - 1,
        repetition_penalty=100,
        stop=["y" * 1024] * 64,
        stop_token_ids=list(range(1024)),
        sampling_seed=2**64 - 1,
    )
    assert p.n == 1024 and len(p.stop) == 64 and p.stop_token_ids == tuple(range(1024))
    assert SamplingParams(sampling_seed=-(2**63), repetition_penalty=0.01).sampling_seed == -(2**63)
    assert SamplingParams(temperature=1e300).temperature == 1e300  # large is finite: near uniform


def test_tiny_temperatures_are_greedy():
    """Dividing fp32 logits by these overflows to inf (NaN log-probs); below the threshold the
    request is greedy, as temperature 0 is."""
    for t in (0, 0.0, 1e-300, 1e-45, 5e-324, 9.99e-7):
        assert SamplingParams(temperature=t).greedy, t
    for t in (1e-6, 0.01, 1.0):
        assert not SamplingParams(temperature=t).greedy, t


def test_from_dict_refuses_wrong_json_types():
    with pytest.raises(ValueError, match="sampling_params.ignore_eos must be true or false, got 'yes'"):
        SamplingParams.from_dict({"ignore_eos": "yes"})
    with pytest.raises(ValueError, match="unknown sampling_params field.*: xxxxx.*\\.\\.\\."):
        SamplingParams.from_dict({"x" * 10_000: 1})


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
