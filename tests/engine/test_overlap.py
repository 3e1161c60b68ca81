"""The overlapped decode schedule (``miles.engine.overlap``) on the CPU: forced on, it must give
the very tokens and log-probs of the serial schedule (batch-invariant kernels, so a row's bits
do not depend on the extra rows overlap runs), whatever happens between steps."""

from __future__ import annotations

import pytest
import torch

from miles.engine.engine import Engine
from miles.engine.model_runner import ModelRunner
from miles.kernels.batch_invariant import batch_invariant
from miles.models.loading import load_model
from miles.types import SamplingParams
from tests.engine.conftest import make_engine
from tests.engine.helpers import CharTokenizer, random_prompts
from tests.models.conftest import save_case


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    path = save_case("llama", tmp_path_factory.mktemp("overlap_llama"))
    return load_model(path)


def _params(n: int) -> list[SamplingParams]:
    """Greedy and seeded temperature-1 rows, lengths 3..14, half stopping at EOS (93 and 47, which they sample)."""
    out = []
    for i in range(n):
        seed = None if i % 3 == 0 else 100 + i
        out.append(
            SamplingParams(
                temperature=0.0 if seed is None else 1.0,
                sampling_seed=seed,
                max_new_tokens=3 + (5 * i) % 12,
                ignore_eos=i % 2 == 0,
            )
        )
    return out


def _engine(model, overlap: bool, **kw) -> Engine:
    kw = {"num_blocks": 64, "page_size": 4, "eos_token_ids": [93, 47], **kw}
    return make_engine(model, CharTokenizer(), overlap_schedule=overlap, random_seed=0, **kw)


def _same(a, b, same_ids: bool = True) -> None:
    assert len(a) == len(b)
    if same_ids:
        assert [o.request_id for o in a] == [o.request_id for o in b]
    for x, y in zip(a, b):
        assert x.output_ids == y.output_ids, x.request_id
        assert torch.equal(torch.tensor(x.output_logprobs), torch.tensor(y.output_logprobs)), x.request_id
        assert x.finish_reason == y.finish_reason
        assert x.text == y.text


class _Spy(ModelRunner):
    """The real runner, counting the forwards that took some inputs from the device."""

    def __init__(self, runner: ModelRunner) -> None:
        super().__init__(runner.model, runner.kv_cache, runner.routing, runner.graphs)
        self.with_device_tokens = 0

    def run(self, batch, pending=None):
        self.with_device_tokens += pending is not None
        return super().run(batch, pending)


@pytest.mark.parametrize(
    "kw",
    [
        {},  # everything fits: after the prefill every step is overlapped
        {"max_running_requests": 3},  # a waiting queue: admissions interleave with decode
        {"num_blocks": 8},  # a small cache: preemptions (each falls back to the serial step)
    ],
    ids=["plain", "queue", "preempt"],
)
def test_overlap_gives_the_serial_tokens_and_logprobs(llama, kw):
    prompts = random_prompts(5, 9, 3, 12, 7, 4, seed=1)
    params = _params(len(prompts))
    with batch_invariant():
        serial = _engine(llama, False, **kw).generate(prompts, params)
        engine = _engine(llama, True, **kw)
        spy = engine.runner = _Spy(engine.runner)
        overlapped = engine.generate(prompts, params)
    _same(overlapped, serial)
    assert spy.with_device_tokens > 0  # the overlapped path really ran
    assert {o.finish_reason.type for o in serial} == {"stop", "length"}
    if "num_blocks" in kw:
        assert engine.stats().num_preemptions > 0


def test_overlap_with_stop_strings_top_logprobs_and_streaming(llama):
    prompts = random_prompts(6, 8, 5, seed=2)
    params = [
        SamplingParams(temperature=0.0, max_new_tokens=12, stop=["A"], ignore_eos=True),
        SamplingParams(temperature=1.0, sampling_seed=5, max_new_tokens=9, ignore_eos=True),
        SamplingParams(temperature=0.0, max_new_tokens=10, ignore_eos=True),
    ]

    def run(overlap: bool):
        engine = _engine(llama, overlap)
        ids = [engine.add_request(p, sp, top_logprobs_num=2) for p, sp in zip(prompts, params)]
        seen: dict[str, list] = {i: [] for i in ids}
        while engine.has_unfinished():
            for out in engine.step():
                seen[out.request_id].append(out)
        engine.step()  # nothing left: reads (and drops) the step still in flight
        assert engine._inflight is None
        return seen

    with batch_invariant():
        serial, overlapped = run(False), run(True)
    for rid in serial:
        a, b = overlapped[rid], serial[rid]
        # A streamed request gets every prefix of its output, once each, in both schedules.
        assert [o.output_ids for o in a] == [o.output_ids for o in b]
        _same([a[-1]], [b[-1]])
        assert a[-1].output_top_logprobs == b[-1].output_top_logprobs


def test_abort_pause_and_release_with_a_step_in_flight(llama):
    prompts = random_prompts(5, 6, 7, seed=3)
    params = SamplingParams(temperature=0.0, max_new_tokens=12, ignore_eos=True)
    with batch_invariant():
        serial = _engine(llama, False).generate(prompts, params)
        engine = _engine(llama, True)
        ids = [engine.add_request(p, params, stream=False) for p in prompts]
        for _ in range(4):  # a prefill, then decode steps: one is in flight now
            engine.step()
        assert engine._inflight is not None
        engine.abort(ids[0])  # the in-flight token is appended first, then the request ends
        engine.pause_generation("in_place")
        assert engine._inflight is None
        engine.continue_generation()
        outs = {}
        while engine.has_unfinished():
            outs.update({o.request_id: o for o in engine.step() if o.finished})
    assert outs[ids[0]].finish_reason.type == "abort"
    # The aborted request kept every token it had sampled: a prefix of its serial output.
    n = len(outs[ids[0]].output_ids)
    assert n >= 3 and outs[ids[0]].output_ids == serial[0].output_ids[:n]
    _same([outs[ids[1]], outs[ids[2]]], serial[1:])
    # Finished, with the last overlapped step possibly still queued: release waits for it.
    engine.release_memory_occupation()
    assert engine._inflight is None and engine.released_tags == ("weights", "kv_cache")
    engine.resume_memory_occupation()
    with batch_invariant():
        again = engine.generate(prompts[1:], params)
    _same(again, [serial[1], serial[2]], same_ids=False)


def test_rows_outside_the_batched_sampler_fall_back_to_serial_steps(llama):
    """top-p, penalties and min_new_tokens sample per row: no overlap, same result as before."""
    prompts = random_prompts(5, 7, seed=4)
    params = [
        SamplingParams(temperature=1.0, top_p=0.9, sampling_seed=1, max_new_tokens=6, ignore_eos=True),
        SamplingParams(temperature=0.0, max_new_tokens=6, min_new_tokens=4, repetition_penalty=1.3),
    ]
    with batch_invariant():
        serial = _engine(llama, False).generate(prompts, params)
        engine = _engine(llama, True)
        spy = engine.runner = _Spy(engine.runner)
        _same(engine.generate(prompts, params), serial)
    assert spy.with_device_tokens == 0


def test_overlap_refuses_moe(tmp_path):
    save_case("qwen3_moe", tmp_path)
    moe = load_model(tmp_path)
    with pytest.raises(ValueError, match="overlap_schedule needs a dense model"):
        make_engine(moe, num_blocks=16, overlap_schedule=True)
    assert not make_engine(moe, num_blocks=16).overlap  # the default leaves it off


def test_overlap_is_off_by_default_on_the_cpu(llama):
    assert not make_engine(llama, num_blocks=16).overlap
    assert make_engine(llama, num_blocks=16, overlap_schedule=True).overlap


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("max_running", [64, 4])
def test_overlap_on_cuda_with_graphs_matches_the_serial_schedule(tmp_path, max_running):
    """The default CUDA engine (decode graphs, overlap on): the serial engine's tokens; fp32
    log-probs within kernel rounding (the overlapped batches hold extra rows, so other GEMM
    shapes)."""
    save_case("llama", tmp_path)
    model = load_model(tmp_path, device="cuda")
    prompts = random_prompts(*(3 + (7 * i) % 30 for i in range(12)), seed=5)
    params = _params(len(prompts))
    kw = {"num_blocks": 256, "page_size": 16, "eos_token_ids": [93, 47], "max_running_requests": max_running}
    overlapped = make_engine(model, CharTokenizer(), random_seed=0, **kw)
    serial = make_engine(model, CharTokenizer(), random_seed=0, overlap_schedule=False, **kw)
    assert overlapped.overlap and overlapped.graphs is not None
    spy = overlapped.runner = _Spy(overlapped.runner)
    a, b = overlapped.generate(prompts, params), serial.generate(prompts, params)
    assert spy.with_device_tokens > 0 and overlapped.graphs.captured
    for x, y in zip(a, b):
        assert x.output_ids == y.output_ids and x.finish_reason == y.finish_reason
        torch.testing.assert_close(
            torch.tensor(x.output_logprobs), torch.tensor(y.output_logprobs), atol=1e-4, rtol=0
        )
