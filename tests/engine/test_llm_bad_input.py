"""``miles.LLM`` with bad or extreme sampling parameters and in the wrong state: a clear
``ValueError`` naming the field, or ``EngineStateError`` saying what to do, before anything runs;
extreme but valid values generate with finite log-probabilities."""

from __future__ import annotations

import math

import pytest

from miles.engine.engine import EngineStateError
from miles.engine.llm import LLM
from tests.models.conftest import save_case


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    path = save_case("llama", tmp_path_factory.mktemp("llm_bad_input"))
    return LLM(str(path), skip_tokenizer_init=True, max_total_tokens=64 * 4, page_size=4, random_seed=0)


PROMPTS = [[3, 1, 4, 1, 5], [9, 2, 6]]


@pytest.mark.parametrize(
    ("params", "match"),
    [
        ({"ignore_eos": "yes"}, "sampling_params.ignore_eos must be true or false, got 'yes'"),
        ({"skip_special_tokens": 0}, "sampling_params.skip_special_tokens must be true or false"),
        ({"n": 10**30}, r"sampling_params.n must be an integer in \[1, 1024\]"),
        ({"n": 10**12}, r"sampling_params.n must be an integer in \[1, 1024\]"),
        ({"temperature": float("inf")}, "sampling_params.temperature must be a finite number"),
        ({"repetition_penalty": 1e-300}, "sampling_params.repetition_penalty must be a number in"),
        ({"max_new_tokens": "16"}, "sampling_params.max_new_tokens must be an integer"),
        ({"stop_token_ids": [1] * 2000}, "sampling_params.stop_token_ids must be a list of at most 1024"),
        ({"stop_token_ids": [500]}, r"stop_token_ids: 500 is outside the vocabulary \[0, 128\)"),
        ({"sampling_seed": 2**64}, "sampling_params.sampling_seed must be null or an integer"),
        ({"max_tokens": 4}, "unknown sampling_params field.*max_tokens"),
        ("temperature", "sampling_params must be a dict"),
        ([{"n": 2}, 5], "sampling_params must be a dict or a SamplingParams, got int"),
    ],
)
def test_bad_sampling_params_are_refused_naming_the_field(llm, params, match):
    with pytest.raises(ValueError, match=match):
        llm.generate(PROMPTS, params)
    assert not llm.engine.has_unfinished()


@pytest.mark.parametrize("temperature", [1e-300, 1e-45])
def test_tiny_temperature_generates_greedily_with_finite_logprobs(llm, temperature):
    base = {"max_new_tokens": 6, "ignore_eos": True}
    greedy = llm.generate(PROMPTS, {**base, "temperature": 0}, return_logprob=True)
    for seed in (None, 5):
        outs = llm.generate(
            PROMPTS, {**base, "temperature": temperature, "sampling_seed": seed}, return_logprob=True
        )
        assert [o["output_ids"] for o in outs] == [o["output_ids"] for o in greedy]
        for out in outs:
            assert all(math.isfinite(lp) for lp, _, _ in out["meta_info"]["output_token_logprobs"])


def test_n_gives_n_results_per_prompt_in_prompt_order(llm):
    outs = llm.generate(PROMPTS, [{"n": 3, "max_new_tokens": 2}, {"n": 1, "max_new_tokens": 2}])
    assert len(outs) == 4
    greedy = llm.generate(PROMPTS, {"n": 2, "max_new_tokens": 3, "temperature": 0})
    assert [o["output_ids"] for o in greedy[:2]] == [greedy[0]["output_ids"]] * 2
    assert (
        greedy[2]["output_ids"]
        == llm.generate([PROMPTS[1]], {"max_new_tokens": 3, "temperature": 0})[0]["output_ids"]
    )


def test_generate_while_memory_is_released_says_to_resume(llm):
    llm.release_memory_occupation(["kv_cache"])
    try:
        with pytest.raises(
            EngineStateError, match=r"memory is released \(kv_cache\).*resume_memory_occupation"
        ):
            llm.generate(PROMPTS, {"max_new_tokens": 2})
        assert not llm.engine.has_unfinished()
    finally:
        llm.resume_memory_occupation(["kv_cache"])
    assert len(llm.generate(PROMPTS, {"max_new_tokens": 2})) == 2
