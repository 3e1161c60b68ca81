"""``apply_response``: an engine's ``/generate`` answer into a sample, per-token weight versions
included; malformed answers are refused naming the field."""

from __future__ import annotations

import pytest

from miles.rollout.generate import apply_response
from miles.types import Sample


def _answer(ids, *, versions=None, weight_version="3", reason="stop"):
    meta = {"output_token_logprobs": [[-0.5, t, None] for t in ids], "finish_reason": {"type": reason}}
    if versions is not None:
        meta["output_token_weight_versions"] = versions
    if weight_version is not None:
        meta["weight_version"] = weight_version
    return {"text": "", "output_ids": ids, "meta_info": meta}


def test_per_token_versions_are_kept_and_continue_across_calls():
    s = apply_response(Sample(prompt_ids=[1]), _answer([5, 6], versions=[3, 4], reason="abort"))
    assert s.response_versions == [3, 4] and s.weight_versions == ["3", "4"]
    s = apply_response(s, _answer([7], versions=[4]))  # a partial rollout continued
    assert (
        s.response_versions == [3, 4, 4]
        and s.weight_versions == ["3", "4"]
        and s.token_versions() == [3, 4, 4]
    )


def test_a_request_version_stands_for_every_token_when_no_per_token_list_comes():
    s = apply_response(Sample(prompt_ids=[1]), _answer([5, 6], weight_version="7"))
    assert s.response_versions == [7, 7]
    # SGLang's default version is not a step count: versions unknown, the string still kept.
    s = apply_response(Sample(prompt_ids=[1]), _answer([5], weight_version="default"))
    assert s.response_versions is None and s.weight_versions == ["default"]


def test_tokens_a_hook_appended_make_the_versions_unknown_not_misaligned():
    s = apply_response(Sample(prompt_ids=[1]), _answer([5], versions=[1]))
    s.response_ids.append(99)  # a tool's output, appended by a custom generate function
    s.rollout_logprobs.append(0.0)
    assert s.token_versions() is None
    s = apply_response(s, _answer([6], versions=[2]))
    assert s.response_versions is None and s.token_versions() is None


@pytest.mark.parametrize(
    ("versions", "message"),
    [([3], "output_token_weight_versions is 1 long"), ("3,4", "not a list"), ([3, -1], "non-negative integers"),
     ([3, True], "non-negative integers"), ([3, 2.0], "non-negative integers")],
)  # fmt: skip
def test_malformed_versions_are_refused_and_the_sample_is_left_as_it_was(versions, message):
    s = apply_response(Sample(prompt_ids=[1]), _answer([4], versions=[3]))
    with pytest.raises(ValueError, match=message):
        apply_response(s, _answer([5, 6], versions=versions))
    assert s.response_ids == [4] and s.response_versions == [3] and s.rollout_logprobs == [-0.5]
