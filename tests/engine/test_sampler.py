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


# ---- never a NaN or an infinite log-probability ------------------------------------------------

TINY = (1e-300, 1e-45, 5e-324, 1e-7)


@pytest.mark.parametrize("temperature", TINY)
@pytest.mark.parametrize("seed", [None, 11])
def test_tiny_temperature_is_greedy_on_both_paths(temperature, seed):
    """Dividing fp32 logits by these gave inf, then NaN log-probs (a 500 from the JSON encoder)
    and token 0 (argmax of NaN)."""
    logits = torch.randn(4, 300, generator=torch.Generator().manual_seed(5)) * 4
    greedy = Sampler().sample(logits[:3], [_req(temperature=0.0) for _ in range(3)], [4] * 3)
    tiny = [_req(temperature=temperature, sampling_seed=seed, top_p=0.5 if i else 1.0) for i in range(3)]
    batched = Sampler().sample(logits[:3], tiny, [4] * 3)
    # A fourth row with a top-p cut sends the whole batch through the per-row path.
    per_row = Sampler().sample(logits, [*tiny, _req(temperature=0.9, top_p=0.5, sampling_seed=3)], [4] * 4)
    for out in (batched, per_row):
        assert out.token_ids[:3] == greedy.token_ids == logits[:3].argmax(-1).tolist()
        assert out.logprobs[:3] == greedy.logprobs and all(math.isfinite(lp) for lp in out.logprobs)
        assert out.top_logprobs[:3] == greedy.top_logprobs


@pytest.mark.parametrize("penalty", [0.01, 100.0])
def test_repetition_penalty_at_its_bounds_stays_finite(penalty):
    logits = torch.tensor([3e4, -3e4, 1.0, -1.0, 0.0])
    req = _req(prompt=(0, 1, 2, 3), out=(4,), repetition_penalty=penalty, temperature=0.5, top_k=3)
    logp, _ = Sampler().process(logits, req)
    assert not torch.isnan(logp).any() and torch.isfinite(logp).sum() == 3
    out = Sampler(generator=torch.Generator().manual_seed(0)).sample(logits[None], [req], [5])
    assert math.isfinite(out.logprobs[0])


# A (seed, column) whose hashed noise was exactly 0: in fp32 the hash's largest uniform,
# (2**24 - 0.5) / 2**24, rounds to 1 (found by a search over seeds at index 0).
ZERO_NOISE_SEED, ZERO_NOISE_COLUMN = 6119, 106


def test_noise_that_rounded_to_zero_no_longer_picks_a_masked_token():
    from miles.engine.sampler import hashed_exponential

    noise = hashed_exponential(torch.tensor([seed_for(ZERO_NOISE_SEED, 0)]), 128)[0]
    assert float(noise[ZERO_NOISE_COLUMN]) == 2.0**-25 == float(noise.min())  # the floor
    logits = torch.linspace(4.0, 0.0, 128)
    logits[ZERO_NOISE_COLUMN] = -1e4  # probability 0 in fp32: 0 / 0 was a NaN, argmax's pick
    for kw in (dict(top_k=5), {}):  # per-row path (a cut: logprob -inf), batched path
        out = Sampler().sample(logits[None], [_req(temperature=1.0, sampling_seed=ZERO_NOISE_SEED, **kw)])
        assert out.token_ids[0] != ZERO_NOISE_COLUMN and math.isfinite(out.logprobs[0])


def test_top_logprobs_leave_out_tokens_outside_the_distribution():
    """A top-k cut's tokens have log-probability -inf, which JSON cannot carry."""
    out = Sampler().sample(LOGITS[None], [_req(temperature=1.0, top_k=2, sampling_seed=1)], [5])
    assert [t for t, _ in out.top_logprobs[0]] == [0, 1]
    assert all(math.isfinite(v) for _, v in out.top_logprobs[0])
    banned = Sampler(eos_token_ids=[0]).sample(LOGITS[None], [_req(temperature=0, min_new_tokens=1)], [6])
    assert [t for t, _ in banned.top_logprobs[0]] == [1, 2, 3, 4, 5]
