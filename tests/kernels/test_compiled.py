"""The trainer's compiled elementwise chains (``miles.kernels.compiled``): who gets them, and (GPU)
that they compute the eager functions' values and gradients."""

from __future__ import annotations

import pytest
import torch

from miles.kernels import batch_invariant, compiled
from miles.models.layers import rms_norm, silu_mul
from miles.models.loading import load_model
from miles.models.rope import apply_rotary
from tests.models.conftest import save_case

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def test_only_cuda_training_forwards_compile(monkeypatch):
    x = torch.randn(3, 4)
    assert not compiled.enabled_for(x)  # CPU
    if torch.cuda.is_available():
        y = x.cuda()
        assert compiled.enabled_for(y)
        with torch.no_grad():
            assert not compiled.enabled_for(y)  # the engine's forwards: its own kernels
        with batch_invariant.batch_invariant():
            assert not compiled.enabled_for(y)  # deterministic mode: the invariant path
        monkeypatch.setenv("MILES_COMPILE", "0")
        assert not compiled.enabled_for(y)


def _grads(fn, args):
    leaves = [a.detach().clone().requires_grad_(a.is_floating_point()) for a in args]
    out = fn(*leaves)
    out.float().square().sum().backward()
    return out.detach(), [leaf.grad for leaf in leaves if leaf.grad is not None]


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_functions_match_eager_values_and_gradients(dtype):
    gen = torch.Generator().manual_seed(0)

    def r(*shape):
        return torch.randn(*shape, generator=gen).to("cuda", dtype)

    cases = [
        (lambda x, w: rms_norm(x, w, 1e-6), (r(37, 256), r(256))),
        (apply_rotary, (r(37, 4, 64), r(37, 64), r(37, 64))),
        (silu_mul, (r(37, 300), r(37, 300))),
    ]
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    for fn, args in cases:
        for n in (37, 5):  # a second token count: dynamic shapes, no recompilation per size
            args_n = tuple(a[:n] if a.shape[0] == 37 else a for a in args)
            want, want_grads = _grads(fn, args_n)
            got, got_grads = _grads(lambda *a, fn=fn: compiled.call(fn, *a), args_n)
            torch.testing.assert_close(got, want, rtol=tol, atol=tol)
            for g, w in zip(got_grads, want_grads):
                torch.testing.assert_close(g, w, rtol=tol, atol=tol * max(1.0, float(w.abs().max())))
    assert not compiled._failed, compiled._failed


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("case", ["qwen3", "qwen2_rope_yarn", "qwen3_moe"])
def test_model_gradients_with_and_without_compile(case, tmp_path, monkeypatch):
    from miles.models.attention import VarlenContext

    save_case(case, tmp_path)
    ids = torch.randint(0, 100, (29,), generator=torch.Generator().manual_seed(1)).cuda()

    def grads():
        model = load_model(tmp_path, device="cuda")
        ctx = VarlenContext.single(len(ids), ids.device)
        model.compute_logits(model(ids, torch.arange(len(ids), device="cuda"), ctx)).float().logsumexp(
            -1
        ).sum().backward()
        return {n: p.grad for n, p in model.named_parameters()}

    fused = grads()
    monkeypatch.setenv("MILES_COMPILE", "0")
    eager = grads()
    for name, g in eager.items():
        torch.testing.assert_close(fused[name], g, rtol=1e-4, atol=1e-5, msg=name)


def test_the_lm_head_compiles_without_autograd_too(monkeypatch):
    x = torch.randn(3, 4)
    assert not compiled.fusable(x)  # CPU
    if torch.cuda.is_available():
        y = x.cuda()
        with torch.no_grad():  # the old log-probs' forward is trainer work: fused
            assert compiled.fusable(y)
        with batch_invariant.batch_invariant():
            assert not compiled.fusable(y)
        monkeypatch.setenv("MILES_COMPILE", "0")
        assert not compiled.fusable(y)
