"""Per-token weight versions: every output token carries the version of the weights that sampled
it, in every path (serial and overlapped steps, preemption, abort, streaming), so a request that
spans a weight update says at which token the weights changed; and the wire carries them
(``meta_info.output_token_weight_versions`` of ``/generate``, streamed or not, and ``miles.LLM``)."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from miles.engine.async_engine import AsyncEngine
from miles.engine.client import LocalEngineClient
from miles.engine.engine import Engine
from miles.engine.request import RequestOutput
from miles.engine.server import ServerConfig, create_app
from miles.engine.tensor_wire import encode_safetensors
from miles.models.loading import load_model
from miles.types import SamplingParams, WeightVersion
from tests.engine.conftest import ThreadServer, make_engine
from tests.engine.helpers import CharTokenizer, random_prompts, run_to_end, same_weights


def _params(n: int, max_new: int = 10) -> list[SamplingParams]:
    """Greedy and seeded rows, of different lengths, some stopping at EOS (93 and 47)."""
    return [
        SamplingParams(
            temperature=0.0 if i % 3 == 0 else 1.0,
            sampling_seed=None if i % 3 == 0 else 10 + i,
            max_new_tokens=max_new - i % 4,
            ignore_eos=i % 2 == 0,
        )
        for i in range(n)
    ]


def _engine(model, **kw) -> Engine:
    kw = {"num_blocks": 64, "page_size": 4, "eos_token_ids": [93, 47], "random_seed": 0, **kw}
    return make_engine(model, CharTokenizer(), **kw)


def assert_versions(out: RequestOutput, split: int, before: int, after: int) -> None:
    """``out``'s first ``split`` tokens were sampled under ``before``, the rest under ``after``."""
    n = len(out.output_ids)
    assert len(out.output_weight_versions) == len(out.output_logprobs) == n
    assert out.output_weight_versions == (before,) * min(split, n) + (after,) * max(0, n - split)
    assert all(isinstance(v, int) for v in out.output_weight_versions)
    if n:
        assert out.weight_version.step >= out.output_weight_versions[-1]


def _update_mid_run(
    engine: Engine, steps: int, version: str | None = None
) -> tuple[list[str], dict[str, int], list[RequestOutput]]:
    """Run ``steps`` steps of a batch, update the weights (same values) while it runs. Returns
    the request ids, how many tokens each unfinished one had when the update came, and the
    outputs reported before it."""
    prompts = random_prompts(5, 9, 3, 12, 7, 4, seed=1)
    rids = [engine.add_request(p, sp) for p, sp in zip(prompts, _params(len(prompts)))]
    early = [out for _ in range(steps) for out in engine.step()]
    engine.update_weights_from_tensors(same_weights(engine.model), weight_version=version)
    # After the call: an overlapped step in flight was read first, so its tokens are counted here.
    split = {r: len(engine._requests[r].output_ids) for r in rids if r in engine._requests}
    return rids, split, early


def _finals(early: list[RequestOutput], engine: Engine) -> dict[str, RequestOutput]:
    return {**{o.request_id: o for o in early if o.finished}, **run_to_end(engine)}


@pytest.mark.parametrize("overlap", [False, True], ids=["serial", "overlap"])
def test_an_update_between_two_tokens_shows_at_that_token(llama, overlap):
    engine = _engine(llama, overlap_schedule=overlap)
    rids, split, early = _update_mid_run(engine, 4)
    streamed: dict[str, list[RequestOutput]] = {r: [] for r in rids}
    done = {o.request_id: o for o in early if o.finished}
    for out in early:
        streamed[out.request_id].append(out)
    while engine.has_unfinished():
        for out in engine.step():
            streamed[out.request_id].append(out)
            if out.finished:
                done[out.request_id] = out
    assert split and any(0 < n < len(done[r].output_ids) for r, n in split.items())
    for rid in rids:
        out = done[rid]
        # A request finished before the update is not in ``split``: all its tokens are version 0.
        assert_versions(out, split.get(rid, len(out.output_ids)), 0, 1)
        for partial in streamed[rid]:  # every streamed output is aligned too
            assert len(partial.output_weight_versions) == len(partial.output_ids)
            assert partial.output_weight_versions == out.output_weight_versions[: len(partial.output_ids)]
    assert {o.weight_version for r, o in done.items() if r in split} == {WeightVersion(1)}


def test_the_version_is_the_step_of_the_version_set(llama):
    engine = _engine(llama)
    engine.update_weights_from_tensors(same_weights(llama), weight_version="3")
    rids, split, early = _update_mid_run(engine, 3, version="12")
    done = _finals(early, engine)
    for rid in rids:
        assert_versions(done[rid], split.get(rid, len(done[rid].output_ids)), 3, 12)


@pytest.mark.parametrize("overlap", [False, True], ids=["serial", "overlap"])
def test_preemption_keeps_the_versions_of_the_tokens_it_recomputes(llama, overlap):
    """A tiny KV cache preempts requests after the update: their earlier tokens are prefilled
    again under the new weights but keep the version that sampled them."""
    engine = _engine(llama, num_blocks=8, overlap_schedule=overlap)
    rids, split, early = _update_mid_run(engine, 6)
    preemptions = engine.stats().num_preemptions
    done = _finals(early, engine)
    assert engine.stats().num_preemptions > preemptions
    assert any(0 < n < len(done[r].output_ids) for r, n in split.items())
    for rid in rids:
        assert_versions(done[rid], split.get(rid, len(done[rid].output_ids)), 0, 1)


@pytest.mark.parametrize("overlap", [False, True], ids=["serial", "overlap"])
def test_abort_keeps_the_partial_tokens_versions(llama, overlap):
    engine = _engine(llama, overlap_schedule=overlap)
    params = SamplingParams(temperature=0.0, max_new_tokens=30, ignore_eos=True)
    rids = [engine.add_request(p, params) for p in random_prompts(5, 8, 6, seed=2)]
    for _ in range(4):
        engine.step()
    engine.update_weights_from_tensors(same_weights(llama))
    split = {r: len(engine._requests[r].output_ids) for r in rids}
    for _ in range(3):
        engine.step()
    engine.pause_generation("abort")
    done = run_to_end(engine)
    for rid in rids:
        out = done[rid]
        assert out.finish_reason is not None and out.finish_reason.type == "abort"
        assert 0 < split[rid] < len(out.output_ids) < 30
        assert_versions(out, split[rid], 0, 1)


# ---- the wire --------------------------------------------------------------------------------


def _meta_aligned(response: dict) -> list[int]:
    meta = response["meta_info"]
    versions = meta["output_token_weight_versions"]
    assert len(versions) == len(meta["output_token_logprobs"]) == len(response["output_ids"])
    assert all(isinstance(v, int) and not isinstance(v, bool) for v in versions)
    return list(versions)


def test_generate_meta_info_over_http_streamed_and_local(llama_dir):
    """With ``return_logprob``: one version per output token, beside ``output_token_logprobs``
    (cumulative when streamed, as they are); ``weight_version`` stays SGLang's string."""
    engine = AsyncEngine(_engine(load_model(llama_dir))).start()
    server = ThreadServer(create_app(engine, ServerConfig(llama_dir))).start()  # type: ignore[arg-type]
    try:
        body = {
            "input_ids": [[3, 4, 5, 6], [7, 8]],
            "sampling_params": {"temperature": 0.0, "max_new_tokens": 6, "ignore_eos": True},
        }
        with httpx.Client(base_url=server.url, timeout=60) as http:
            plain = http.post("/generate", json=body).json()
            assert all("output_token_weight_versions" not in r["meta_info"] for r in plain)
            for r in http.post("/generate", json={**body, "return_logprob": True}).json():
                assert _meta_aligned(r) == [0] * 6 and r["meta_info"]["weight_version"] == "0"
            local = asyncio.run(LocalEngineClient(engine).generate({**body, "return_logprob": True}))
            assert [_meta_aligned(r) for r in local] == [[0] * 6] * 2
            tensors = encode_safetensors(same_weights(engine.engine.model))
            update = http.post("/update_weights_from_tensor", json={"serialized_named_tensors": [tensors]})
            assert update.json()["weight_version"] == "1", update.text
            one = {**body, "input_ids": [3, 4, 5], "return_logprob": True, "stream": True}
            with http.stream("POST", "/generate", json=one) as r:
                lines = [line for line in r.iter_lines() if line]
            assert lines[-1] == "data: [DONE]"
            chunks = [json.loads(line[len("data: ") :]) for line in lines[:-1]]
            assert [len(_meta_aligned(c)) for c in chunks] == list(range(1, 7))
            assert _meta_aligned(chunks[-1]) == [1] * 6 and chunks[-1]["meta_info"]["weight_version"] == "1"
    finally:
        server.stop()
        engine.close()
