"""Sampler: kept sets, penalties, min_new_tokens, seeding, and the logprob contract."""

from __future__ import annotations

import math

import pytest
import torch

from miles.engine.request import Request
from miles.engine.sampler import Sampler, seed_for
from miles.types import SamplingParams


def _req(prompt=(1, 2), out=(), **kw) -> Request:
    r = Request("r", list(prompt), SamplingParams(**kw))
    r.output_ids = list(out)
    return r


LOGITS = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])


def test_greedy_takes_argmax_with_raw_logprob():
    out = Sampler().sample(LOGITS[None], [_req(temperature=0.0)])
    assert out.token_ids == [0]
    assert out.logprobs[0] == pytest.approx(float(torch.log_softmax(LOGITS, -1)[0]), abs=1e-6)


@pytest.mark.parametrize(
    ("kw", "kept"),
    [
        (dict(top_k=2), [0, 1]),
        (dict(top_p=0.6), [0, 1]),  # p = .56, .21, .13, ...: mass before token 1 is .56 <= .6
        (dict(top_p=0.5), [0]),
        (dict(min_p=0.1), [0, 1]),  # at T = 0.5, p / p_max = 1, e^-2, e^-3, ...
        (dict(top_k=3, top_p=0.99), [0, 1, 2]),
    ],
)
def test_kept_sets_and_renormalised_logprobs(kw, kept):
    temperature = 0.5 if "min_p" in kw else 1.0
    logp, greedy = Sampler().process(LOGITS, _req(temperature=temperature, **kw))
    assert not greedy
    x = LOGITS / temperature
    expect = torch.full_like(x, float("-inf"))
    expect[kept] = torch.log_softmax(x[kept], -1)
    assert torch.isfinite(logp).nonzero().flatten().tolist() == kept
    assert torch.allclose(logp[kept], expect[kept], atol=1e-6)


def test_penalties():
    req = _req(
        prompt=(0,), out=(1, 1, 3), repetition_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.25
    )
    logp, _ = Sampler().process(LOGITS, req)
    x = LOGITS.clone()
    x[[0, 1, 3]] = torch.tensor([1.0, 0.5, 0.0])  # positive / 2 (0.0 * 2 = 0.0)
    x[1] -= 0.5 * 2 + 0.25
    x[3] -= 0.5 * 1 + 0.25
    assert torch.allclose(logp, torch.log_softmax(x, -1), atol=1e-6)


def test_min_new_tokens_masks_eos_and_stop_ids():
    sampler = Sampler(eos_token_ids=[0])
    logp, _ = sampler.process(LOGITS, _req(out=(5,), min_new_tokens=2, stop_token_ids=(1,), temperature=0))
    assert logp[0] == -math.inf and logp[1] == -math.inf
    logp, _ = sampler.process(LOGITS, _req(out=(5, 5), min_new_tokens=2, temperature=0))
    assert math.isfinite(logp[0])
    logp, _ = sampler.process(LOGITS, _req(min_new_tokens=2, ignore_eos=True, temperature=0))
    assert math.isfinite(logp[0])


def test_seeded_rows_ignore_the_rest_of_the_batch():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 50, generator=gen)
    reqs = [_req(temperature=1.0, sampling_seed=7) for _ in range(6)]
    together = Sampler(generator=torch.Generator().manual_seed(1)).sample(logits, reqs)
    for i in range(6):
        alone = Sampler(generator=torch.Generator().manual_seed(99)).sample(logits[i : i + 1], [reqs[i]])
        assert alone.token_ids[0] == together.token_ids[i]
        assert alone.logprobs[0] == together.logprobs[i]
    assert seed_for(7, 0) != seed_for(7, 1) and seed_for(7, 0) != seed_for(8, 0)
    assert 0 <= seed_for(-3, 10**6) < 2**63


def test_exponential_race_samples_the_distribution():
    probs = torch.tensor([0.6, 0.3, 0.1])
    logits = probs.log()[None]
    sampler = Sampler(generator=torch.Generator().manual_seed(0))
    counts = torch.zeros(3)
    for _ in range(3000):
        counts[sampler.sample(logits, [_req(temperature=1.0)]).token_ids[0]] += 1
    assert torch.allclose(counts / 3000, probs, atol=0.03)


def test_top_logprobs():
    out = Sampler().sample(LOGITS[None], [_req(temperature=0)], [3])
    ids = [t for t, _ in out.top_logprobs[0]]
    assert ids == [0, 1, 2]


def test_batched_plain_rows_equal_the_per_row_path():
    """Rows with no penalty or cut are sampled in one batched op; a row that needs the per-row
    path (top-p here) sends the whole batch there. Both give the same bits for a plain row."""
    logits = torch.randn(5, 300, generator=torch.Generator().manual_seed(3))
    for temps in ([0.7] * 4, [0.7, 1.0, 0.0, 1.3]):
        plain = [_req(temperature=t, sampling_seed=i) for i, t in enumerate(temps)]
        batched = Sampler().sample(logits[:4], plain)
        mixed = Sampler().sample(logits, [*plain, _req(temperature=0.9, top_p=0.5, sampling_seed=9)])
        assert batched.token_ids == mixed.token_ids[:4]
        assert batched.logprobs == mixed.logprobs[:4]
        for i, req in enumerate(plain):
            logp, _ = Sampler().process(logits[i], req)
            assert batched.logprobs[i] == float(logp[batched.token_ids[i]])


def test_hashed_exponential_is_exp1_and_a_function_of_key_and_column():
    from miles.engine.sampler import hashed_exponential

    keys = torch.tensor([seed_for(s, i) for s in range(50) for i in range(4)])
    e = hashed_exponential(keys, 2000)
    assert e.shape == (200, 2000) and e.dtype == torch.float32 and bool((e > 0).all())
    # Exp(1): mean 1, variance 1, P(E > 1) = 1/e (400k draws: a few thousandths of noise).
    assert abs(float(e.mean()) - 1) < 0.01 and abs(float(e.var()) - 1) < 0.02
    assert abs(float((e > 1).float().mean()) - math.exp(-1)) < 0.005
    # Neighbouring keys and columns are uncorrelated.
    flat = e - 1
    assert abs(float((flat[:-1] * flat[1:]).mean())) < 0.01
    assert abs(float((flat[:, :-1] * flat[:, 1:]).mean())) < 0.01
    # Row i depends on keys[i] only; shorter vocabularies are prefixes.
    alone = hashed_exponential(keys[7:8], 1000)
    assert torch.equal(alone[0], e[7, :1000])


def test_seeded_race_samples_the_distribution():
    probs = torch.tensor([0.6, 0.3, 0.1])
    counts = torch.zeros(3)
    sampler = Sampler()
    for s in range(3000):
        counts[sampler.sample(probs.log()[None], [_req(temperature=1.0, sampling_seed=s)]).token_ids[0]] += 1
    assert torch.allclose(counts / 3000, probs, atol=0.03)
