"""Decode CUDA graphs: the padded static-buffer step (CPU, eagerly), the device-tensor decode
attention, the batched sampler; on a GPU (marked): graph replay against the eager step, engine
outputs with and without graphs, release/resume and weight updates under graphs."""

from __future__ import annotations

import pytest
import torch

from miles.engine.cuda_graph import DecodeGraphs, capture_sizes
from miles.engine.engine import Engine
from miles.engine.model_runner import ModelRunner, ScheduledRequest
from miles.engine.request import Request
from miles.engine.sampler import Sampler
from miles.kernels.paged_attention import (
    paged_decode_attention,
    paged_decode_reference,
    paged_prefix_attention,
)
from miles.models.layers import pack_projections
from miles.models.loading import load_model
from miles.types import SamplingParams
from tests.engine.conftest import make_engine
from tests.models.conftest import save_case


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    path = save_case("llama", tmp_path_factory.mktemp("graph_llama"))
    return path


def test_capture_sizes():
    assert capture_sizes(1) == [1]
    assert capture_sizes(6) == [1, 2, 4, 6]
    assert capture_sizes(20) == [1, 2, 4, 8, 16, 20]
    assert capture_sizes(32) == [1, 2, 4, 8, 16, 24, 32]
    assert capture_sizes(256) == [1, 2, 4, 8, 16, 24, 32, 48, 64, 80, 96, 112, 128, 160, 192, 224, 256]


def _decode_ready_requests(engine: Engine, lengths: list[int]) -> list[Request]:
    """Requests whose prompt is in the cache, each with one sampled token still to feed."""
    gen = torch.Generator().manual_seed(0)
    params = SamplingParams(temperature=0.0, max_new_tokens=50, ignore_eos=True)
    ids = [engine.add_request(torch.randint(0, 128, (n,), generator=gen).tolist(), params) for n in lengths]
    engine.step()  # the prefill: every request samples its first token
    return [engine._requests[i] for i in ids]


@pytest.mark.parametrize("n", [1, 3, 5])
def test_padded_static_step_equals_the_eager_step(llama_dir, n):
    """The computation a graph captures, run eagerly on CPU: padding rows touch only the
    scratch block, and the real rows' logits and K/V equal the eager engine step's."""
    model = load_model(llama_dir)
    engine = make_engine(model, num_blocks=64, page_size=4)
    reqs = _decode_ready_requests(engine, [3, 9, 14, 6, 11][:n])
    batch = [ScheduledRequest(r, 1) for r in reqs]
    cache = engine.kv_cache
    # A cache with one more block than the allocator's: the scratch block.
    graph_cache = type(cache)(len(cache.k), cache.num_blocks + 1, cache.block_size, *cache.k[0].shape[2:])
    for layer in range(len(cache.k)):
        graph_cache.k[layer][: cache.num_blocks] = cache.k[layer]
        graph_cache.v[layer][: cache.num_blocks] = cache.v[layer]
    graphs = DecodeGraphs(model, graph_cache, max_bs=8, max_blocks=16, scratch_block=cache.num_blocks)
    bs = graphs.load_inputs(
        [r.token_slice(r.num_computed_tokens, r.num_computed_tokens + 1)[0] for r in reqs],
        [r.num_computed_tokens for r in reqs],
        [r.block_table[r.num_computed_tokens // 4] * 4 + r.num_computed_tokens % 4 for r in reqs],
        [r.num_computed_tokens + 1 for r in reqs],
        [r.block_table for r in reqs],
    )
    assert bs == graphs.padded_size(n) >= n
    with torch.no_grad():
        graphs.forward(bs)
    eager = ModelRunner(model, cache).run(batch).last_logits
    torch.testing.assert_close(graphs.logits[:n], eager, rtol=1e-5, atol=1e-5)
    for layer in range(len(cache.k)):  # same K/V written, and nothing outside the scratch block
        torch.testing.assert_close(
            graph_cache.k[layer][: cache.num_blocks], cache.k[layer], rtol=0, atol=1e-6
        )
        torch.testing.assert_close(
            graph_cache.v[layer][: cache.num_blocks], cache.v[layer], rtol=0, atol=1e-6
        )


def test_padding_only_step_touches_only_the_scratch_block(llama_dir):
    """What capture_all runs at start-up: every row is padding, and the cache outside the
    scratch block is left as it was."""
    model = load_model(llama_dir)
    engine = make_engine(model, num_blocks=16, page_size=4)
    _decode_ready_requests(engine, [5, 9])
    cache = engine.kv_cache
    before = [t.clone() for t in cache.k + cache.v]
    graphs = DecodeGraphs(model, cache, max_bs=8, max_blocks=8, scratch_block=15)
    graphs.load_padding(8)
    with torch.no_grad():
        graphs.forward(8)
    for old, new in zip(before, cache.k + cache.v):
        assert torch.equal(old[:15], new[:15])
    assert not torch.equal(before[0][15], cache.k[0][15])  # the scratch block was written
    assert torch.isfinite(graphs.logits[:8]).all()


def test_scratch_block_must_be_in_the_cache(llama_dir):
    model = load_model(llama_dir)
    engine = make_engine(model, num_blocks=8, page_size=4)
    with pytest.raises(ValueError, match="scratch block 8"):
        DecodeGraphs(model, engine.kv_cache, max_bs=4, max_blocks=4, scratch_block=8)
    graphs = DecodeGraphs(model, engine.kv_cache, max_bs=4, max_blocks=4, scratch_block=7)
    with pytest.raises(ValueError, match="not graph-capturable"):
        graphs.load_inputs([1] * 5, [0] * 5, [0] * 5, [1] * 5, [[0]] * 5)


def test_fingerprint_sees_a_moved_model_or_cache(llama_dir):
    """The replay guard: moving the model (every parameter reallocated) or the cache changes the
    fingerprint; an in-place weight update does not."""
    model = load_model(llama_dir)
    engine = make_engine(model, num_blocks=8, page_size=4)
    graphs = DecodeGraphs(model, engine.kv_cache, max_bs=4, max_blocks=4, scratch_block=7)
    first = graphs._fingerprint()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.5)
    assert graphs._fingerprint() == first
    for p in model.parameters():
        p.data = p.data.clone()
    moved = graphs._fingerprint()
    assert moved != first
    engine.kv_cache.k[0] = engine.kv_cache.k[0].clone()
    cache_moved = graphs._fingerprint()
    assert cache_moved != moved
    pack_projections(model)  # the packed q/k/v of the first layer is an address a graph reads
    assert graphs._fingerprint() != cache_moved


def test_cpu_engine_has_no_graphs(llama_dir):
    engine = make_engine(load_model(llama_dir), num_blocks=8, page_size=4)
    assert engine.graphs is None and engine.kv_cache.num_blocks == 8


def _random_paged(b, hq, hkv, d, page, nb=40, seed=0):
    gen = torch.Generator().manual_seed(seed)
    kc, vc = torch.randn(nb, page, hkv, d, generator=gen), torch.randn(nb, page, hkv, d, generator=gen)
    lens = torch.randint(1, 150, (b,), generator=gen)
    width = max(-(-int(n) // page) for n in lens) + 1
    tables = torch.stack([torch.randperm(nb, generator=gen)[:width] for _ in range(b)])
    return torch.randn(b, hq, d, generator=gen), kc, vc, tables, lens


@pytest.mark.parametrize("shape", [(3, 4, 2, 16, 4), (2, 6, 2, 24, 16), (4, 8, 1, 32, 16)])
def test_decode_reference_equals_the_per_sequence_reference(shape):
    q, kc, vc, tables, lens = _random_paged(*shape)
    ref = paged_prefix_attention(q, kc, vc, list(tables), [1] * len(lens), lens.tolist(), 0.3)
    out = paged_decode_attention(q, kc, vc, tables, lens, 0.3)  # CPU: the reference
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_batched_sampler_equals_the_per_row_draws():
    """Greedy, seeded and unseeded rows in one batch: seeded and greedy rows draw what the
    per-row path draws; top log-probs come back per row, as many as each asked."""
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 50, generator=gen) * 3
    reqs = [
        Request("g", [1], SamplingParams(temperature=0.0)),
        Request("s", [1], SamplingParams(temperature=0.7, sampling_seed=11)),
        Request("u", [1], SamplingParams(temperature=0.7)),
        Request("s2", [1], SamplingParams(temperature=0.7, sampling_seed=5)),
    ]
    out = Sampler(generator=torch.Generator().manual_seed(1)).sample(logits, reqs, [2, 0, 3, 1])
    per_row = Sampler(generator=torch.Generator().manual_seed(1))
    for i in (0, 1, 3):
        logp, greedy = per_row.process(logits[i], reqs[i])
        expect = int(torch.argmax(logp if greedy else logp.exp() / per_row._exponential(logp, reqs[i])))
        assert out.token_ids[i] == expect
        assert out.logprobs[i] == float(logp[expect])
    logp_u = torch.log_softmax(logits[2] / 0.7, -1)
    assert out.logprobs[2] == float(logp_u[out.token_ids[2]])
    assert [len(t) for t in out.top_logprobs] == [2, 0, 3, 1]
    vals, ids = torch.topk(torch.log_softmax(logits[0], -1), 2)
    assert out.top_logprobs[0] == list(zip(ids.tolist(), vals.tolist()))


# ---- GPU ---------------------------------------------------------------------------------------

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 16, 8, 128, 16), (7, 4, 2, 64, 16), (33, 32, 8, 64, 32)])
def test_triton_decode_kernel_matches_the_reference(shape, dtype):
    q, kc, vc, tables, lens = (t.cuda() for t in _random_paged(*shape, nb=64))
    q, kc, vc = q.to(dtype), kc.to(dtype), vc.to(dtype)
    ref = paged_decode_reference(q.float(), kc.float(), vc.float(), tables, lens, 0.125)
    out = paged_decode_attention(q, kc, vc, tables, lens, 0.125)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.float(), ref, rtol=tol, atol=tol)


def _generate(engine: Engine, prompts, max_new=24):
    params = SamplingParams(temperature=0.0, max_new_tokens=max_new, ignore_eos=True)
    return engine.generate(prompts, params)


@pytest.mark.gpu
@cuda
def test_graph_engine_matches_the_eager_engine_and_survives_release(llama_dir):
    model = load_model(llama_dir, device="cuda")
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 128, (int(n),), generator=gen).tolist() for n in torch.randint(2, 40, (11,))]
    graphed = make_engine(model, num_blocks=256, page_size=16, cuda_graph_max_bs=16)
    eager = make_engine(model, num_blocks=256, page_size=16, disable_cuda_graph=True)
    assert graphed.graphs is not None and eager.graphs is None
    a, b = _generate(graphed, prompts), _generate(eager, prompts)
    assert graphed.graphs.captured, "no decode step replayed a graph"
    for x, y in zip(a, b):  # fp32: the same tokens; log-probs within kernel rounding
        assert x.output_ids == y.output_ids
        torch.testing.assert_close(
            torch.tensor(x.output_logprobs), torch.tensor(y.output_logprobs), atol=1e-4, rtol=0
        )
    graphed.release_memory_occupation()
    assert not graphed.graphs.captured
    graphed.resume_memory_occupation()
    again = _generate(graphed, prompts)
    assert [o.output_ids for o in again] == [o.output_ids for o in a]
    assert [o.output_logprobs for o in again] == [o.output_logprobs for o in a]


@pytest.mark.gpu
@cuda
def test_graph_replay_sees_in_place_weight_updates(llama_dir):
    model = load_model(llama_dir, device="cuda")
    engine = make_engine(model, num_blocks=256, page_size=16, cuda_graph_max_bs=8)
    prompts = [[1, 2, 3, 4], [5, 6, 7]]
    before = _generate(engine, prompts)
    new = {n: p.detach() * 1.5 for n, p in model.named_parameters() if "mlp" in n}
    engine.update_weights_from_tensors(list(new.items()))
    after = _generate(engine, prompts)
    fresh = make_engine(model, num_blocks=256, page_size=16, disable_cuda_graph=True)
    expect = _generate(fresh, prompts)
    assert [o.output_ids for o in after] == [o.output_ids for o in expect]
    assert [o.output_ids for o in after] != [o.output_ids for o in before]


@pytest.mark.gpu
@cuda
def test_graph_replay_equals_its_eager_computation(llama_dir):
    """A replay computes the captured step on new inputs: the eager step's result (cuBLAS may pick
    other GEMM algorithms under capture, so within fp32 rounding, not bit for bit). This test
    caught the start-up capture running with autograd on (other kernels than every step's)."""
    model = load_model(llama_dir, device="cuda")
    engine = make_engine(model, num_blocks=256, page_size=16, cuda_graph_max_bs=8)
    assert engine.graphs is not None
    reqs = _decode_ready_requests(engine, [5, 17, 30])
    args = (
        [r.token_slice(r.num_computed_tokens, r.num_computed_tokens + 1)[0] for r in reqs],
        [r.num_computed_tokens for r in reqs],
        [r.block_table[r.num_computed_tokens // 16] * 16 + r.num_computed_tokens % 16 for r in reqs],
        [r.num_computed_tokens + 1 for r in reqs],
        [r.block_table for r in reqs],
    )
    replayed = engine.graphs.run(*args).clone()
    replayed = engine.graphs.run(*args).clone()  # the second call replays the captured graph
    bs = engine.graphs.load_inputs(*args)
    with torch.no_grad():
        engine.graphs.forward(bs)
    torch.testing.assert_close(replayed, engine.graphs.logits[:3], rtol=1e-5, atol=1e-5)
