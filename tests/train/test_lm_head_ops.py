"""The trainer's fused LM-head slice ops (GPU: Triton statistics, compiled gradient) against the
eager ones, through the whole chunked log-prob function, values and gradients."""

from __future__ import annotations

import pytest
import torch

from miles.algo.logprobs import logprobs_and_entropy_from_hidden
from miles.kernels import compiled
from miles.train.lm_head_ops import FUSED, slice_ops_for

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def test_fused_ops_only_where_the_trainer_fuses(monkeypatch):
    assert slice_ops_for(torch.zeros(2, 3)) is None  # CPU: the eager default
    if torch.cuda.is_available():
        assert slice_ops_for(torch.zeros(2, 3, device="cuda")) is FUSED
        monkeypatch.setenv("MILES_COMPILE", "0")
        assert slice_ops_for(torch.zeros(2, 3, device="cuda")) is None


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("vocab", [2000, 9000, 20011])  # under, over and not a multiple of a block
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_softmax_stats_kernel_matches_torch(dtype, vocab, temperature):
    from miles.kernels.triton.lm_head import softmax_stats

    gen = torch.Generator().manual_seed(vocab)
    z = (torch.randn(37, vocab, generator=gen) * 4).to("cuda", dtype)
    m, s, sx = softmax_stats(z, temperature)
    x = z.float() / temperature
    want_m = x.amax(-1)
    e = torch.exp(x - want_m[:, None])
    assert torch.equal(m, want_m)
    torch.testing.assert_close(s, e.sum(-1), rtol=1e-5, atol=0)
    torch.testing.assert_close(sx, (e * x).sum(-1), rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("vocab_chunk", [None, 700])
def test_fused_lm_head_matches_eager_values_and_gradients(dtype, vocab_chunk):
    gen = torch.Generator().manual_seed(1)
    hidden = torch.randn(300, 64, generator=gen).to("cuda", dtype)
    weight = (torch.randn(2000, 64, generator=gen) * 0.3).to("cuda", dtype)
    target = torch.randint(0, 2000, (300,), generator=gen).cuda()
    g_lp, g_ent = torch.randn(300, generator=gen).cuda(), torch.randn(300, generator=gen).cuda()
    results = []
    for ops in (None, FUSED):
        h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
        lp, ent = logprobs_and_entropy_from_hidden(
            h, w, target, temperature=0.8, chunk_size=128, vocab_chunk_size=vocab_chunk, ops=ops
        )
        grads = torch.autograd.grad((lp * g_lp).sum() + (ent * g_ent).sum(), (h, w))
        results.append((lp, ent, *grads))
    assert not compiled._failed, compiled._failed
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    for got, want in zip(results[1], results[0]):
        torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol)


@pytest.mark.gpu
@cuda
def test_a_failing_statistics_kernel_falls_back_to_the_compiled_ones(monkeypatch):
    import miles.train.lm_head_ops as lm_head_ops
    from miles.kernels.triton_loader import triton_module

    kernels = triton_module("lm_head", "MILES_LM_HEAD_KERNEL")
    if kernels is None:
        pytest.skip("no Triton")

    def broken(*args):
        raise RuntimeError("no kernel today")

    monkeypatch.setattr(kernels, "softmax_stats", broken)
    monkeypatch.setattr(lm_head_ops, "_failed", [])
    z = torch.randn(5, 300, device="cuda")
    local, inside = (
        torch.zeros(5, dtype=torch.long, device="cuda"),
        torch.ones(5, dtype=torch.bool, device="cuda"),
    )
    got = FUSED.stats(z, local, inside, 1.0)
    assert lm_head_ops._failed and "no kernel today" in lm_head_ops._failed[0]
    from miles.algo.logprobs import slice_stats

    for g, w in zip(got, slice_stats(z, local, inside, 1.0)):
        torch.testing.assert_close(g, w)
