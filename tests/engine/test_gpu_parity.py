"""On CUDA: engine greedy output equals transformers' greedy generate; release/resume frees memory
and restores identical outputs. Run with `pytest -m gpu` on a machine with a GPU."""

from __future__ import annotations

import pytest
import torch

from miles.models.loading import load_model
from miles.types import SamplingParams
from tests.engine.conftest import make_engine
from tests.engine.helpers import same_weights
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


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_an_engine_on_its_own_stream_generates_the_same_beside_a_busy_thread(tmp_path):
    """Asynchronous RL on one GPU: the engine thread queues on its own CUDA stream while another
    thread (the trainer's) keeps the default stream busy; greedy outputs are unchanged, and a
    weight update handed over between the threads (synchronized as LocalPlacement does) lands."""
    import asyncio
    import threading

    from miles.engine.async_engine import AsyncEngine, RequestSpec

    prefix, kwargs = CASES["llama"]
    make_hf_model(prefix, kwargs).save_pretrained(tmp_path)
    model = load_model(tmp_path, device="cuda")
    prompts = [[1, 5, 9, 3, 7], [7, 2], list(range(1, 30))]
    params = SamplingParams(max_new_tokens=24, temperature=0, ignore_eos=True)
    want = [
        list(o.output_ids)
        for o in make_engine(model, None, num_blocks=64, page_size=16).generate(prompts, params)
    ]
    engine = AsyncEngine(make_engine(model, None, num_blocks=64, page_size=16), own_stream=True).start()
    stop = threading.Event()

    def busy() -> None:  # the trainer's work on the default stream
        a = torch.randn(2048, 2048, device="cuda")
        while not stop.is_set():
            a = (a @ a).clamp(-1, 1)
        torch.cuda.synchronize()

    worker = threading.Thread(target=busy)
    worker.start()
    try:
        outs = asyncio.run(engine.generate([RequestSpec(p, params) for p in prompts]))
        assert [list(o.output_ids) for o in outs] == want
        same = same_weights(model)
        torch.cuda.current_stream().synchronize()
        asyncio.run(engine.call(lambda e: e.update_weights_from_tensors(same, weight_version="1")))
        outs = asyncio.run(engine.generate([RequestSpec(p, params) for p in prompts]))
        assert [list(o.output_ids) for o in outs] == want and outs[0].weight_version.step == 1
    finally:
        stop.set()
        worker.join()
        engine.close()
