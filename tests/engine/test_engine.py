"""Engine end to end on tiny random models (CPU, fp32): parity, prefix reuse, seeding, logprobs,
preemption, chunked prefill, abort, finish reasons and input errors."""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch

from miles.engine.engine import Engine, EngineStateError
from miles.models.generation import generate_ids
from miles.models.loading import load_model
from miles.types import SamplingParams
from tests.engine.conftest import make_engine
from tests.engine.helpers import CharTokenizer, random_prompts
from tests.models.conftest import CASES, make_hf_model
from tests.tolerance import logprob_tol

GREEDY = SamplingParams(temperature=0.0, max_new_tokens=10, ignore_eos=True)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """name -> (transformers model, Miles model) for the families the engine is tested on."""
    out = {}
    for name in ("llama", "qwen3", "qwen3_moe"):
        prefix, kwargs = CASES[name]
        hf = make_hf_model(prefix, kwargs)
        path = tmp_path_factory.mktemp(f"engine_{name}")
        hf.save_pretrained(path)
        out[name] = (hf, load_model(path))
    return out


@pytest.fixture
def llama(models):
    return models["llama"][1]


def _engine(model, **kw) -> Engine:
    kw.setdefault("num_blocks", 128)
    kw.setdefault("page_size", 4)
    return make_engine(model, **kw)


def _ids(outs) -> list[list[int]]:
    return [list(o.output_ids) for o in outs]


# ---- greedy parity ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["llama", "qwen3", "qwen3_moe"])
def test_greedy_equals_reference_generation(models, name):
    model = models[name][1]
    system = random_prompts(9, seed=5)[0]
    prompts = random_prompts(5, 17, 1, 30) + [system + p for p in random_prompts(3, 6, seed=6)]
    ref = generate_ids(model, prompts, 10)
    outs = _engine(model).generate(prompts, GREEDY)
    assert _ids(outs) == ref
    assert all(o.finish_reason is not None and o.finish_reason.type == "length" for o in outs)


def test_greedy_equals_transformers_generate(models):
    hf, model = models["llama"]
    prompts = random_prompts(6, 11)
    outs = _engine(model).generate(prompts, GREEDY)
    for p, out in zip(prompts, outs):
        ids = hf.generate(
            torch.tensor([p]), max_new_tokens=10, do_sample=False, eos_token_id=None, pad_token_id=0
        )[0, len(p) :].tolist()
        assert list(out.output_ids) == ids


# ---- prefix reuse ----------------------------------------------------------------------------


def test_group_samples_share_their_prompt(llama):
    prompt = random_prompts(13)[0]  # 3 full blocks of 4 + 1 token
    engine = _engine(llama)
    ids = [engine.add_request(prompt, GREEDY) for _ in range(4)]
    peak, done = 0, {}
    while engine.has_unfinished():
        for out in engine.step():
            done[out.request_id] = out
        peak = max(peak, engine.allocator.num_used_blocks)
    outs = [done[i] for i in ids]
    assert [o.cached_tokens for o in outs] == [0, 12, 12, 12]
    assert _ids(outs) == generate_ids(llama, [prompt] * 4, 10)
    # Unshared, each sample needs ceil(23 / 4) = 6 blocks; shared, the 3 prompt blocks count once.
    assert peak == 3 + 4 * 3 < 4 * 6
    # A repeated system prompt after the first requests finished is served from the cache.
    again = engine.generate([[*prompt, 1, 2, 3]], GREEDY)[0]
    assert again.cached_tokens == 12
    assert engine.stats().total_cached_tokens == 48


def test_prefix_caching_can_be_disabled(llama):
    outs = _engine(llama, disable_radix_cache=True).generate([random_prompts(13)[0]] * 3, GREEDY)
    assert [o.cached_tokens for o in outs] == [0, 0, 0]


def test_flush_cache_only_when_idle(llama):
    engine = _engine(llama)
    prompt = random_prompts(13)[0]
    engine.generate([prompt], GREEDY)
    engine.add_request(prompt, GREEDY, request_id="busy")
    assert engine.flush_cache() is False
    engine.abort("busy")
    engine.step()
    assert engine.flush_cache() is True
    assert engine.stats().num_cached_blocks == 0
    assert engine.generate([prompt], GREEDY)[0].cached_tokens == 0


# ---- sampling ----------------------------------------------------------------------------------


def test_seeded_sampling_is_batch_invariant(llama):
    params = SamplingParams(temperature=0.9, top_p=0.95, top_k=50, max_new_tokens=12, sampling_seed=1234)
    target = random_prompts(7, seed=3)[0]
    alone = _engine(llama, random_seed=0).generate([target], params)[0]
    others = random_prompts(3, 20, 9, 14, 5, seed=4)
    unseeded = SamplingParams(temperature=1.0, max_new_tokens=15)
    mixed = _engine(llama, random_seed=1, max_prefill_tokens=8).generate(
        [*others[:2], target, *others[2:]], [unseeded, unseeded, params, unseeded, unseeded, unseeded]
    )[2]
    assert mixed.output_ids == alone.output_ids
    # Another batch sums in another order: equal to rounding (tests/tolerance.py), tokens exactly.
    tol = logprob_tol(llama, len(target) + len(alone.output_ids))
    assert mixed.output_logprobs == pytest.approx(alone.output_logprobs, abs=tol)
    other_seed = _engine(llama).generate([target], SamplingParams(**{**params.to_dict(), "sampling_seed": 9}))
    assert other_seed[0].output_ids != alone.output_ids


def _expected_logprobs(model, prompt, out, params: SamplingParams) -> list[float]:
    """Recompute each output token's logprob from one full forward, per the sampler contract."""
    ids = torch.tensor(prompt + list(out.output_ids), device=model.device)
    cu = torch.tensor([0, len(ids)], dtype=torch.int32, device=model.device)
    with torch.no_grad():
        logits = model.forward_packed(ids, cu).float()[len(prompt) - 1 : -1]
    expected = []
    for row, tok in zip(logits, out.output_ids):
        if params.greedy:
            expected.append(float(torch.log_softmax(row, -1)[tok]))
            continue
        x = row / params.temperature
        probs, order = x.softmax(-1).sort(descending=True)
        keep = torch.ones_like(probs, dtype=torch.bool)
        if params.top_k > 0:
            keep[params.top_k :] = False
        keep &= (probs.cumsum(-1) - probs) <= params.top_p
        kept = order[keep].cpu()
        assert tok in kept.tolist()
        lse = torch.logsumexp(x[kept.to(x.device)], -1)
        expected.append(float(x[tok] - lse))
    return expected


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=0.0, max_new_tokens=8, ignore_eos=True),
        SamplingParams(temperature=0.7, max_new_tokens=8, ignore_eos=True, sampling_seed=1),
        SamplingParams(temperature=1.3, top_k=5, max_new_tokens=8, ignore_eos=True, sampling_seed=2),
        SamplingParams(temperature=0.8, top_p=0.6, max_new_tokens=8, ignore_eos=True, sampling_seed=3),
        SamplingParams(temperature=1.0, top_k=20, top_p=0.8, max_new_tokens=8, ignore_eos=True),
    ],
)
def test_logprobs_are_those_of_the_sampled_distribution(llama, params):
    prompts = random_prompts(5, 12, seed=8)
    outs = _engine(llama).generate(prompts, params)
    for prompt, out in zip(prompts, outs):
        got = torch.tensor(out.output_logprobs)
        want = torch.tensor(_expected_logprobs(llama, prompt, out, params))
        assert (got - want).abs().max().item() <= 1e-5


def test_prompt_logprobs_and_top_logprobs(llama):
    prompt = random_prompts(11)[0]
    engine = _engine(llama, max_prefill_tokens=4)
    engine.generate([prompt], GREEDY)  # warm the prefix cache: prompt logprobs must ignore it
    rid = engine.add_request(prompt, GREEDY, return_prompt_logprobs=True, top_logprobs_num=3)
    while engine.has_unfinished():
        outs = [o for o in engine.step() if o.request_id == rid and o.finished]
    out = outs[0]
    with torch.no_grad():
        logits = llama.forward_packed(torch.tensor(prompt), torch.tensor([0, 11], dtype=torch.int32))
    want = torch.log_softmax(logits.float(), -1)[:-1].gather(1, torch.tensor(prompt[1:])[:, None])[:, 0]
    assert out.prompt_logprobs is not None and out.cached_tokens == 0
    assert (torch.tensor(out.prompt_logprobs) - want).abs().max().item() <= 1e-5
    assert out.output_top_logprobs is not None and len(out.output_top_logprobs) == 10
    assert all(top[0][0] == tok for top, tok in zip(out.output_top_logprobs, out.output_ids))


# ---- scheduling ------------------------------------------------------------------------------


def test_preemption_keeps_greedy_outputs(llama):
    prompts = random_prompts(6, 9, 3, 11, 7)
    params = SamplingParams(temperature=0.0, max_new_tokens=16, ignore_eos=True)
    engine = _engine(llama, num_blocks=10)  # 40 slots for 5 requests needing up to 27 each
    outs = engine.generate(prompts, params)
    assert engine.stats().num_preemptions > 0
    assert _ids(outs) == generate_ids(llama, prompts, 16)
    assert engine.allocator.num_used_blocks == 0


def test_chunked_prefill_keeps_outputs(llama):
    prompts = random_prompts(23, 5, 17)
    engine = _engine(llama, max_prefill_tokens=5)
    assert _ids(engine.generate(prompts, GREEDY)) == generate_ids(llama, prompts, 10)


def test_running_cap(llama):
    engine = _engine(llama, max_running_requests=2)
    for p in random_prompts(4, 4, 4, 4):
        engine.add_request(p, GREEDY)
    engine.step()
    assert (engine.stats().num_running, engine.stats().num_waiting) == (2, 2)


def test_request_alone_filling_the_cache_ends_with_length(llama):
    engine = _engine(llama, num_blocks=3)
    out = engine.generate(
        [random_prompts(5)[0]], SamplingParams(temperature=0, max_new_tokens=50, ignore_eos=True)
    )[0]
    assert out.finish_reason is not None and out.finish_reason.type == "length"
    assert out.completion_tokens == 12 - 5 + 1  # 12 slots hold 12 fed tokens; the last is sampled


def test_abort_returns_every_block(llama):
    engine = _engine(llama, num_blocks=32)
    ids = [engine.add_request(p, GREEDY) for p in random_prompts(9, 9, 14, 3)]
    engine.step()
    engine.step()
    assert engine.abort(ids[1]) == [ids[1]]
    outs = {o.request_id: o for o in engine.step()}
    assert outs[ids[1]].finish_reason is not None and outs[ids[1]].finish_reason.type == "abort"
    assert sorted(engine.abort()) == sorted([ids[0], ids[2], ids[3]])
    assert not engine.has_unfinished()
    assert engine.allocator.num_used_blocks == 0 and engine.stats().num_free_blocks == 32
    assert all(o.finish_reason.type == "abort" for o in engine.step() if o.finish_reason)
    assert engine.abort("nope") == []


# ---- finish reasons --------------------------------------------------------------------------


def test_stop_token_ids_eos_ignore_eos_and_min_new_tokens(llama):
    prompt = random_prompts(8)[0]
    ref = generate_ids(llama, [prompt], 10)[0]
    stop = ref[3]
    first = ref.index(stop)
    p = dict(temperature=0.0, max_new_tokens=10)
    by_id = _engine(llama).generate([prompt], SamplingParams(stop_token_ids=(stop,), **p))[0]
    assert list(by_id.output_ids) == ref[: first + 1]
    assert by_id.finish_reason is not None and by_id.finish_reason.to_dict() == {
        "type": "stop",
        "matched": stop,
    }
    by_eos = _engine(llama, eos_token_ids=[stop]).generate([prompt], SamplingParams(**p))[0]
    assert list(by_eos.output_ids) == ref[: first + 1]
    ignored = _engine(llama, eos_token_ids=[stop]).generate([prompt], SamplingParams(ignore_eos=True, **p))[0]
    assert list(ignored.output_ids) == ref and ignored.finish_reason.to_dict() == {
        "type": "length",
        "length": 10,
    }
    held = _engine(llama, eos_token_ids=[stop]).generate([prompt], SamplingParams(min_new_tokens=6, **p))[0]
    assert stop not in held.output_ids[:6] and len(held.output_ids) >= 6


def test_stop_strings(llama):
    tok = CharTokenizer()
    prompt = random_prompts(8)[0]
    ref = generate_ids(llama, [prompt], 10)[0]
    stop = tok.decode(ref[4:6])
    cut = tok.decode(ref).find(stop)
    p = dict(temperature=0.0, max_new_tokens=10, stop=(stop,))
    out = _engine(llama, tokenizer=tok).generate([prompt], SamplingParams(**p))[0]
    assert out.finish_reason is not None and out.finish_reason.to_dict() == {"type": "stop", "matched": stop}
    assert list(out.output_ids) == ref[: len(out.output_ids)] and len(out.output_ids) <= 6
    assert out.text == tok.decode(ref)[:cut]
    kept = _engine(llama, tokenizer=tok).generate([prompt], SamplingParams(no_stop_trim=True, **p))[0]
    assert kept.text is not None and kept.text.endswith(stop)


def test_max_new_tokens_zero_and_outputs_record(llama):
    engine = _engine(llama)
    out = engine.generate([[1, 2, 3]], SamplingParams(max_new_tokens=0))[0]
    assert out.output_ids == () and out.finish_reason is not None and out.finish_reason.type == "length"
    out = engine.generate([[1, 2, 3]], SamplingParams(max_new_tokens=2, temperature=0))[0]
    assert (out.prompt_tokens, out.completion_tokens, str(out.weight_version)) == (3, 2, "0")


# ---- input errors ----------------------------------------------------------------------------


def test_bad_input_is_rejected_with_a_reason(llama):
    engine = _engine(llama, num_blocks=4)
    with pytest.raises(ValueError, match="empty"):
        engine.add_request([], GREEDY)
    with pytest.raises(ValueError, match="token id 128 at position 1 is outside the vocabulary"):
        engine.add_request([1, 128], GREEDY)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        engine.add_request([-1], GREEDY)
    with pytest.raises(ValueError, match="KV cache holds 16 tokens"):
        engine.add_request(list(range(16)), GREEDY)
    with pytest.raises(ValueError, match="context length is 256"):
        _engine(llama).add_request([1] * 256, GREEDY)
    with pytest.raises(ValueError, match="needs an engine with a tokenizer"):
        engine.add_request([1], SamplingParams(stop=("x",)))
    engine.add_request([1], GREEDY, request_id="a")
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request([1], GREEDY, request_id="a")
    with pytest.raises(ValueError, match="2 prompts but 1 sampling_params"):
        engine.generate([[1], [2]], [GREEDY])


# ---- extreme sampling parameters ---------------------------------------------------------------


@pytest.mark.parametrize("temperature", [1e-300, 1e-45])
@pytest.mark.parametrize("seed", [None, 7])
@pytest.mark.parametrize("cut", [{}, {"top_p": 0.9, "repetition_penalty": 1.2}])  # batched, per-row
def test_tiny_temperature_generates_what_greedy_does(llama, temperature, seed, cut):
    """These gave NaN log-probs (a 500 from the server's JSON encoder) and token 0."""
    prompts = random_prompts(5, 12, seed=9)
    base = dict(max_new_tokens=8, ignore_eos=True, **cut)
    greedy = _engine(llama).generate(prompts, SamplingParams(temperature=0, **base))
    engine = _engine(llama, random_seed=3)
    tiny = SamplingParams(temperature=temperature, sampling_seed=seed, **base)
    # Mixed with an ordinary sampled request, as in a server's batch.
    outs = engine.generate([*prompts, prompts[0]], [tiny, tiny, SamplingParams(temperature=1.0, **base)])
    assert _ids(outs[:2]) == _ids(greedy)
    for out, ref in zip(outs, greedy):
        assert all(torch.isfinite(torch.tensor(out.output_logprobs)))
        tol = logprob_tol(llama, 12 + len(ref.output_ids))  # greedy ran in another batch
        assert out.output_logprobs == pytest.approx(ref.output_logprobs, abs=tol)


@pytest.mark.parametrize("penalty", [0.01, 100.0])
def test_repetition_penalty_bounds_give_finite_logprobs(llama, penalty):
    params = SamplingParams(temperature=0.7, repetition_penalty=penalty, max_new_tokens=8, ignore_eos=True)
    engine = _engine(llama)
    rid = engine.add_request(random_prompts(12, seed=2)[0], params, top_logprobs_num=5)
    done = {}
    while engine.has_unfinished():
        done.update({o.request_id: o for o in engine.step() if o.finished})
    out = done[rid]
    assert len(out.output_ids) == 8 and all(torch.isfinite(torch.tensor(out.output_logprobs)))
    assert all(torch.isfinite(torch.tensor([v for _, v in top])).all() for top in out.output_top_logprobs)


def test_top_logprobs_carry_only_tokens_that_could_be_drawn(llama):
    params = SamplingParams(temperature=1.0, top_k=2, max_new_tokens=4, ignore_eos=True, sampling_seed=0)
    engine = _engine(llama)
    rid = engine.add_request(random_prompts(6)[0], params, top_logprobs_num=5)
    while engine.has_unfinished():
        outs = [o for o in engine.step() if o.request_id == rid and o.finished]
    tops = outs[0].output_top_logprobs
    assert tops is not None and all(len(top) == 2 for top in tops)  # -inf for the rest: not JSON
    assert all(v > float("-inf") for top in tops for _, v in top)


def test_huge_max_new_tokens_stops_at_the_context_length(llama):
    out = _engine(llama, context_length=20).generate(
        [random_prompts(5)[0]], SamplingParams(temperature=0, max_new_tokens=2**31 - 1, ignore_eos=True)
    )[0]
    assert (
        out.finish_reason is not None and out.finish_reason.type == "length" and out.completion_tokens == 15
    )


# ---- admission checks ----------------------------------------------------------------------------


def test_request_arguments_the_model_bounds_are_checked_at_admission(llama):
    engine = _engine(llama, eos_token_ids=[5])
    with pytest.raises(ValueError, match=r"stop_token_ids: 128 is outside the vocabulary \[0, 128\)"):
        engine.add_request([1, 2], SamplingParams(stop_token_ids=(3, 128)))
    every = SamplingParams(min_new_tokens=1, stop_token_ids=tuple(t for t in range(128) if t != 5))
    with pytest.raises(ValueError, match="min_new_tokens bans every token"):
        engine.add_request([1, 2], every)
    engine.add_request([1, 2], dataclasses.replace(every, ignore_eos=True))  # EOS 5 stays drawable
    with pytest.raises(ValueError, match="top_logprobs_num must be in \\[0, 128\\]"):
        engine.add_request([1, 2], GREEDY, top_logprobs_num=129)
    with pytest.raises(ValueError, match="top_logprobs_num must be an integer"):
        engine.add_request([1, 2], GREEDY, top_logprobs_num=True)
    with pytest.raises(ValueError, match="return_prompt_logprobs must be true or false, got 'yes'"):
        engine.add_request([1, 2], GREEDY, return_prompt_logprobs="yes")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="sampling_params must be a SamplingParams, got dict"):
        engine.add_request([1, 2], {"temperature": 0})  # type: ignore[arg-type]
    for bad in ([1, 2.5], [1, "3"], [True, 2], [1, None]):
        with pytest.raises(ValueError, match="prompt token ids must be integers"):
            engine.add_request(bad, GREEDY)  # type: ignore[arg-type]
    assert engine.stats().num_waiting == 1
    # NumPy and torch integers are integers.
    engine.add_request(torch.tensor([1, 2, 3]), GREEDY)  # type: ignore[arg-type]
    engine.add_request(np.array([4, 5], dtype=np.int32), GREEDY)  # type: ignore[arg-type]


def test_generating_while_memory_is_released_is_refused_at_admission(llama):
    engine = _engine(llama)
    for tags in (["kv_cache"], ["weights"]):
        engine.release_memory_occupation(tags)
        for call in (
            lambda: engine.add_request([1, 2], GREEDY),
            lambda: engine.generate([[1, 2]], GREEDY),
        ):
            with pytest.raises(EngineStateError, match="memory is released.*resume_memory_occupation"):
                call()
        assert not engine.has_unfinished() and engine.step() == []
        engine.resume_memory_occupation(tags)
    assert _ids(engine.generate([[1, 2]], GREEDY)) == generate_ids(llama, [[1, 2]], 10)


# ---- CUDA ------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_engine_on_cuda(models):
    model = copy.deepcopy(models["qwen3"][1]).to("cuda")
    prompts = random_prompts(5, 17, 1, 30)
    engine = _engine(model, num_blocks=12, max_prefill_tokens=16)  # preempts and chunks
    assert _ids(engine.generate(prompts, GREEDY)) == generate_ids(model, prompts, 10)
    params = SamplingParams(temperature=0.8, top_p=0.9, top_k=30, max_new_tokens=8, sampling_seed=5)
    alone = _engine(model).generate([prompts[1]], params)[0]
    mixed = _engine(model).generate(prompts, params)[1]
    assert mixed.output_ids == alone.output_ids
    want = torch.tensor(_expected_logprobs(model, prompts[1], alone, params))
    assert (torch.tensor(alone.output_logprobs) - want).abs().max().item() <= 1e-4
