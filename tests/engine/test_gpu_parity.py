"""On CUDA: engine greedy output equals transformers' greedy generate; release/resume frees memory
and restores identical outputs. Run with `pytest -m gpu` on a machine with a GPU."""

from __future__ import annotations

import pytest
import torch

from miles.models.loading import load_model
from miles.types import SamplingParams
from tests.engine.conftest import make_engine
from tests.models.conftest import CASES, make_hf_model

pytestmark = pytest.mark.gpu


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", ["llama", "qwen3", "qwen3_moe"])
def test_cuda_greedy_equals_transformers_and_release_round_trips(name, tmp_path):
    prefix, kwargs = CASES[name]
    hf = make_hf_model(prefix, kwargs).cuda()
    hf.save_pretrained(tmp_path)
    engine = make_engine(load_model(tmp_path, device="cuda"), None, num_blocks=64, page_size=16)
    prompts = [[1, 5, 9, 3, 7], [7, 2], list(range(1, 30))]
    params = SamplingParams(max_new_tokens=16, temperature=0, ignore_eos=True)
    outs = engine.generate(prompts, params)
    for prompt, out in zip(prompts, outs):
        want = hf.generate(torch.tensor([prompt], device="cuda"), max_new_tokens=16, do_sample=False,
                           min_new_tokens=16)[0, len(prompt):].tolist()  # fmt: skip
        assert list(out.output_ids) == want
    before = torch.cuda.memory_allocated()
    engine.release_memory_occupation(["weights", "kv_cache"])
    assert torch.cuda.memory_allocated() < before
    engine.resume_memory_occupation(["weights", "kv_cache"])
    again = engine.generate(prompts, params)
    assert [list(a.output_ids) for a in again] == [list(o.output_ids) for o in outs]
