"""The engine records every fed token's experts (rollout routing replay), whatever the schedule:
fresh, chunked prefill, prefix-cache hits, preemption, retraction; and returns them over
/generate."""

from __future__ import annotations

import asyncio

import httpx
import numpy as np
import pytest
import torch

from miles.engine.async_engine import AsyncEngine
from miles.engine.client import LocalEngineClient, decode_routed_experts
from miles.engine.engine import Engine
from miles.engine.server import ServerConfig, create_app
from miles.models.loading import load_model
from miles.types import SamplingParams
from tests.engine.conftest import ThreadServer, make_engine
from tests.engine.helpers import assert_same_expert_sets as assert_same_sets
from tests.engine.helpers import routing_reference as reference
from tests.engine.helpers import run_to_end
from tests.models.conftest import save_case

GREEDY = SamplingParams(temperature=0.0, max_new_tokens=6, ignore_eos=True)


@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory):
    # 3 layers, layer 1 dense: the record's layer axis maps onto MoE layers 0 and 2 only.
    path = save_case("qwen3_moe_sparse_step", tmp_path_factory.mktemp("routing_moe"))
    return str(path)


@pytest.fixture(scope="module")
def moe(moe_dir):
    return load_model(moe_dir)


def _prompts(*lengths: int, seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 128, (n,), generator=gen).tolist() for n in lengths]


def _run(engine: Engine, prompts, params=GREEDY, routed=True):
    rids = [engine.add_request(p, params, return_routed_experts=routed) for p in prompts]
    done = {}
    while len(done) < len(rids):
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
    return [done[r] for r in rids]


def _check(model, prompts, outs) -> None:
    spec = model.spec
    for p, out in zip(prompts, outs):
        tokens = p + list(out.output_ids)
        assert out.routed_experts is not None and out.routed_experts.dtype == np.int32
        assert out.routed_experts.shape == (
            len(tokens) - 1,
            len(spec.moe_layer_indices),
            spec.num_experts_per_tok,
        )
        assert_same_sets(out.routed_experts, reference(model, tokens))


def test_fresh_and_chunked_prefill(moe):
    prompts = _prompts(5, 13, 9)
    _check(moe, prompts, _run(make_engine(moe, num_blocks=64, page_size=4), prompts))
    # prompts split over several steps, mixed with other requests' decode
    chunked = make_engine(moe, num_blocks=64, page_size=4, max_prefill_tokens=5)
    _check(moe, prompts, _run(chunked, prompts))


def test_prefix_cache_hit_returns_the_cached_prefix_routing(moe):
    engine = make_engine(moe, num_blocks=64, page_size=4)
    (base,) = _prompts(14)
    _run(engine, [base], routed=False)  # fills the cache; its forwards record the slots anyway
    prompts = [base, [*base[:10], 1, 2, 3]]
    outs = _run(engine, prompts)
    assert all(o.cached_tokens >= 8 for o in outs)
    _check(moe, prompts, outs)


def test_preemption_recomputes_the_record(moe):
    engine = make_engine(moe, num_blocks=12, page_size=4, max_prefill_tokens=16)
    prompts = _prompts(9, 10, 11, 7, seed=3)
    params = SamplingParams(temperature=0.0, max_new_tokens=10, ignore_eos=True)
    outs = _run(engine, prompts, params)
    assert engine.stats().num_preemptions > 0
    _check(moe, prompts, outs)


def test_no_record_unless_asked_and_prompt_only(moe):
    engine = make_engine(moe, num_blocks=64, page_size=4)
    (p,) = _prompts(6)
    assert _run(engine, [p], routed=False)[0].routed_experts is None
    # max_new_tokens=0 still runs the prompt when routing is asked for: P - 1 rows
    (out,) = _run(engine, [p], SamplingParams(max_new_tokens=0))
    assert_same_sets(out.routed_experts, reference(moe, p))


def test_dense_model_refuses(tmp_path):
    save_case("llama", tmp_path)
    engine = make_engine(load_model(str(tmp_path)), num_blocks=16, page_size=4)
    with pytest.raises(ValueError, match="MoE"):
        engine.add_request([1, 2, 3], GREEDY, return_routed_experts=True)


def test_generate_http_and_local_return_base64(moe, moe_dir):
    engine = AsyncEngine(make_engine(moe, num_blocks=64, page_size=4)).start()
    server = ThreadServer(create_app(engine, ServerConfig(moe_dir))).start()  # type: ignore[arg-type]
    try:
        (p,) = _prompts(7, seed=5)
        body = {
            "input_ids": p,
            "sampling_params": {"temperature": 0.0, "max_new_tokens": 5, "ignore_eos": True},
        }
        k, layers = moe.spec.num_experts_per_tok, len(moe.spec.moe_layer_indices)
        r = httpx.post(f"{server.url}/generate", json={**body, "return_routed_experts": True}, timeout=30)
        assert r.status_code == 200, r.text
        data = r.json()
        tokens = p + data["output_ids"]
        routed = decode_routed_experts(data["meta_info"]["routed_experts"], len(tokens), k)
        assert routed.shape == (len(tokens) - 1, layers, k)
        assert_same_sets(routed, reference(moe, tokens))
        plain = httpx.post(f"{server.url}/generate", json=body, timeout=30).json()
        assert "routed_experts" not in plain["meta_info"]
        local = asyncio.run(LocalEngineClient(engine).generate({**body, "return_routed_experts": True}))
        assert local["meta_info"]["routed_experts"] == data["meta_info"]["routed_experts"]
    finally:
        server.stop()
        engine.close()


def test_retract_takes_the_record_again_under_the_weights_loaded_then(moe_dir):
    """A retracted request is recomputed as a preempted one is. Without an update its record is
    a plain forward's; after one every row is the new weights' (they made the K/V it attends to
    from then on), not the rows recorded before the pause."""
    model = load_model(moe_dir)  # its own copy: the update below changes it
    prompts = _prompts(9, 5, 12, seed=4)
    params = SamplingParams(temperature=0.0, max_new_tokens=8, ignore_eos=True)
    gen = torch.Generator().manual_seed(0)
    perturbed = [
        (n, p.detach() + 0.3 * torch.randn(p.shape, generator=gen)) for n, p in model.named_parameters()
    ]
    for update in (False, True):
        engine = make_engine(model, num_blocks=64, page_size=4)
        rids = [engine.add_request(p, params, return_routed_experts=True) for p in prompts]
        for _ in range(4):
            engine.step()
        engine.pause_generation("retract")
        assert engine.stats().num_running == 0 and engine.allocator.num_used_blocks == 0
        at_pause = [engine._requests[r].all_token_ids for r in rids]
        assert all(len(t) > len(p) for t, p in zip(at_pause, prompts))  # every one had decoded
        old = [reference(model, t) for t in at_pause]
        if update:
            engine.update_weights_from_tensors(perturbed)
        engine.continue_generation()
        done = run_to_end(engine)
        final = [done[r] for r in rids]
        assert all(o.finish_reason.type == "length" and o.completion_tokens == 8 for o in final)
        _check(model, prompts, final)  # model holds the weights loaded now
        stale = [
            not np.array_equal(np.sort(o.routed_experts[: len(a) - 1], -1), np.sort(b, -1))
            for o, a, b in zip(final, at_pause, old)
        ]
        assert any(stale) == update  # after the update the rows before the pause changed
