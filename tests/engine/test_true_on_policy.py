"""True-on-policy mode on CPU (fp32): the engine's sampling log-probs equal the trainer's
recomputed log-probs bit for bit, and a request's tokens and log-probs do not depend on what else
is in the batch (1, 7 or 64 requests, prefix-cache hits, chunked-prefill cuts, preemption)."""

from __future__ import annotations

import copy

import pytest
import torch

from miles.buffer.batching import build_train_batch
from miles.kernels.batch_invariant import batch_invariant
from miles.models.loading import load_model
from miles.train.packing import batch_to
from miles.train.steps import packed_logprobs
from miles.types import Group, Sample, SampleStatus, SamplingParams
from tests.engine.conftest import make_engine
from tests.models.conftest import save_case

TEMPERATURE = 0.9


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    out = {}
    for name in ("llama", "qwen3", "qwen3_moe"):
        path = save_case(name, tmp_path_factory.mktemp(f"top_{name}"))
        out[name] = load_model(path)
    return out


def _prompts(*lengths: int, seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 128, (n,), generator=gen).tolist() for n in lengths]


def _params(seed: int, n: int = 8) -> SamplingParams:
    return SamplingParams(temperature=TEMPERATURE, max_new_tokens=n, ignore_eos=True, sampling_seed=seed)


def _generate(model, prompts, seeds, **engine_kw):
    engine_kw.setdefault("num_blocks", 256)
    engine_kw.setdefault("page_size", 4)
    engine = make_engine(model, **engine_kw)
    with batch_invariant():
        outs = engine.generate(prompts, [_params(s) for s in seeds])
    return engine, outs


PROMPT_LENGTHS = (3, 9, 17, 30, 5, 64, 12)


def _rollout_then_trainer_logprobs(engine_model):
    """Sample 7 prompts in the mode, pack them as the loop does, score them with the trainer's own
    copy of the model (training mode): ``(engine outputs, batch, trainer model, log-probs [T])``."""
    prompts = _prompts(*PROMPT_LENGTHS)
    _, outs = _generate(engine_model, prompts, range(len(prompts)), max_prefill_tokens=40)
    samples = [
        Sample(prompt_ids=p, response_ids=list(o.output_ids), rollout_logprobs=list(o.output_logprobs),
               reward=0.0, status=SampleStatus.COMPLETED, index=i)
        for i, (p, o) in enumerate(zip(prompts, outs))
    ]  # fmt: skip
    batch = batch_to(build_train_batch([Group(0, tuple(samples))]), engine_model.device)
    trainer_model = copy.deepcopy(engine_model).train()
    with batch_invariant():
        logp, _ = packed_logprobs(
            trainer_model, batch, temperature=TEMPERATURE, chunk_size=16, vocab_chunk_size=None,
            need_entropy_grad=False,
        )  # fmt: skip
    return outs, batch, trainer_model, logp


@pytest.mark.parametrize("family", ["llama", "qwen3", "qwen3_moe"])
def test_engine_logprobs_equal_the_trainers_bit_for_bit(models, family):
    engine_model = models[family]
    _, batch, trainer_model, logp = _rollout_then_trainer_logprobs(engine_model)
    mask = batch.loss_mask.bool()
    assert mask.sum() == 7 * 8
    assert torch.equal(logp[mask], batch.rollout_logprobs[mask])
    # the default kernels are merely close: the equality above is the mode's doing
    plain, _ = packed_logprobs(
        trainer_model, batch, temperature=TEMPERATURE, chunk_size=16, vocab_chunk_size=None,
        need_entropy_grad=False,
    )  # fmt: skip
    torch.testing.assert_close(plain[mask], batch.rollout_logprobs[mask], rtol=0, atol=1e-4)


def _by_id(outs):
    return [(tuple(o.output_ids), tuple(o.output_logprobs)) for o in outs]


def test_a_request_does_not_depend_on_its_batch(models):
    model = models["qwen3_moe"]
    target = _prompts(23, seed=5)[0]
    _, (alone,) = _generate(model, [target], [7])
    want = (tuple(alone.output_ids), tuple(alone.output_logprobs))
    others = _prompts(*[3 + (5 * i) % 41 for i in range(63)], seed=9)
    for n in (7, 64):
        batch = [*others[: n // 2], target, *others[n // 2 : n - 1]]
        seeds = list(range(100, 100 + n))
        seeds[n // 2] = 7
        _, outs = _generate(model, batch, seeds)
        assert _by_id(outs)[n // 2] == want, f"{n} requests"
    # prefix-cache hit: the same prompt again in the same engine (its blocks are reused)
    engine, _ = _generate(model, [target], [1])
    with batch_invariant():
        (again,) = engine.generate([target], [_params(7)])
    assert again.cached_tokens > 0 and _by_id([again])[0] == want
    # chunked prefill cut in different places
    for budget in (5, 11, 16):
        _, outs = _generate(model, [others[0], target], [100, 7], max_prefill_tokens=budget)
        assert _by_id(outs)[1] == want, f"prefill budget {budget}"
    # preemption: too few blocks for all requests at once
    engine, outs = _generate(model, [*others[:6], target], [*range(100, 106), 7], num_blocks=24)
    assert engine.stats().num_preemptions > 0
    assert _by_id(outs)[6] == want


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("family", ["llama", "qwen3", "qwen3_moe"])
def test_cuda_bf16_engine_logprobs_equal_the_trainers(tmp_path, family):
    """The same guarantee on a GPU in bf16 (dense and MoE), and batch independence there."""
    save_case(family, tmp_path)
    engine_model = load_model(tmp_path, dtype="bfloat16", device="cuda")
    outs, batch, _, logp = _rollout_then_trainer_logprobs(engine_model)
    mask = batch.loss_mask.bool()
    assert torch.equal(logp[mask], batch.rollout_logprobs[mask])
    # the 4th request alone, and among 64
    fourth = _prompts(*PROMPT_LENGTHS)[3]
    _, (alone,) = _generate(engine_model, [fourth], [3])
    assert (alone.output_ids, alone.output_logprobs) == (outs[3].output_ids, outs[3].output_logprobs)
    many = _prompts(*[3 + (7 * i) % 50 for i in range(63)], seed=4)
    _, outs64 = _generate(
        engine_model, [*many[:20], fourth, *many[20:]], [*range(100, 120), 3, *range(120, 163)]
    )
    assert (outs64[20].output_ids, outs64[20].output_logprobs) == (alone.output_ids, alone.output_logprobs)
