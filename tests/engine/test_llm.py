"""``miles.LLM`` offline generation: prompt forms, result shape, parity with ``generate_ids``."""

from __future__ import annotations

import pytest
import torch

import miles
from miles.engine.llm import LLM
from miles.models.generation import encode_prompt, generate_ids
from miles.models.loading import load_model
from tests.models.conftest import save_case


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = save_case("qwen3", tmp_path_factory.mktemp("llm_qwen3"))
    return path


def test_lazy_export():
    assert miles.LLM is LLM


def test_tiny_generate_ids_and_meta(tiny):
    llm = LLM(str(tiny), skip_tokenizer_init=True, page_size=4, random_seed=0)
    assert llm.engine.allocator.num_blocks == 256 * 256 // 4  # capped by the running requests
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 128, (n,), generator=gen).tolist() for n in (3, 11, 7)]
    outs = llm.generate(
        prompts, {"max_new_tokens": 9, "temperature": 0, "ignore_eos": True}, return_logprob=True
    )
    assert [o["output_ids"] for o in outs] == generate_ids(load_model(tiny), prompts, 9)
    meta = outs[1]["meta_info"]
    assert meta["finish_reason"] == {"type": "length", "length": 9}
    assert (meta["prompt_tokens"], meta["completion_tokens"], meta["weight_version"]) == (11, 9, "0")
    lps = meta["output_token_logprobs"]
    assert [t for _, t, _ in lps] == outs[1]["output_ids"] and all(lp <= 0 and s is None for lp, _, s in lps)
    assert outs[0]["text"] is None
    with pytest.raises(ValueError, match="no tokenizer"):
        llm.generate("hello", {"max_new_tokens": 2})
    with pytest.raises(ValueError, match="unknown sampling_params"):
        llm.generate(prompts, {"max_tokens": 2})
    with pytest.raises(ValueError, match="3 prompts but 1 sampling_params"):
        llm.generate(prompts, [{"max_new_tokens": 2}])


def test_meta_info_carries_each_tokens_weight_version(tiny):
    """With ``return_logprob``, one version per output token beside ``output_token_logprobs``."""
    llm = LLM(str(tiny), skip_tokenizer_init=True, page_size=4, max_total_tokens=1024)
    prompts = [[5, 6, 7], [8, 9]]
    params = {"max_new_tokens": 5, "temperature": 0, "ignore_eos": True}
    assert all("output_token_weight_versions" not in o["meta_info"] for o in llm.generate(prompts, params))
    named = [(n, p.detach().clone()) for n, p in llm.engine.model.named_parameters()]
    for version in (0, 4):
        if version:
            llm.update_weights_from_tensors(named, weight_version=str(version))
        for out in llm.generate(prompts, params, return_logprob=True):
            meta = out["meta_info"]
            assert len(meta["output_token_logprobs"]) == 5
            assert meta["output_token_weight_versions"] == [version] * 5
            assert meta["weight_version"] == str(version)


def test_smollm2_greedy_equals_generate_ids(smollm2):
    llm = LLM(smollm2, max_total_tokens=64 * 16)
    tok = llm.tokenizer
    prompts = ["The capital of France is", "def fibonacci(n):"]
    chat = [{"role": "user", "content": "Say hello."}]
    outs = llm.generate(prompts, {"max_new_tokens": 12, "temperature": 0, "ignore_eos": True})
    ids = [encode_prompt(tok, p, False) for p in prompts]
    ref = generate_ids(llm.engine.model, ids, 12)
    assert [o["output_ids"] for o in outs] == ref
    assert [o["text"] for o in outs] == [tok.decode(r, skip_special_tokens=True) for r in ref]
    chat_out = llm.generate(chat, {"max_new_tokens": 8, "temperature": 0})
    chat_ids = encode_prompt(tok, chat, True)
    eos = tuple(llm.engine.eos_token_ids)
    assert chat_out[0]["output_ids"] == generate_ids(llm.engine.model, [chat_ids], 8, stop_token_ids=eos)[0]
    assert chat_out[0]["meta_info"]["prompt_tokens"] == len(chat_ids)
