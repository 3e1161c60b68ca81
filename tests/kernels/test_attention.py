"""The padded one-call varlen attention (the trainer's CUDA path) against the per-sequence
reference: outputs and gradients, GQA, empty sequences; on a GPU, through the trainer's context."""

from __future__ import annotations

import pytest
import torch

from miles.kernels.attention import (
    flash_varlen_causal_attention,
    flash_varlen_supported,
    padded_varlen_causal_attention,
    padded_varlen_plan,
    varlen_causal_attention,
)
from miles.models.attention import VarlenContext


@pytest.mark.parametrize("bounds", [[0, 7], [0, 3, 3, 12, 13], [0, 1, 40, 41, 41]])
@pytest.mark.parametrize("heads", [(4, 4), (6, 2)])
def test_padded_varlen_equals_the_reference_with_gradients(bounds, heads):
    hq, hkv = heads
    t = bounds[-1]
    gen = torch.Generator().manual_seed(0)
    q0, k0, v0 = (torch.randn(t, h, 16, generator=gen, dtype=torch.float64) for h in (hq, hkv, hkv))
    grad = torch.randn(t, hq, 16, generator=gen, dtype=torch.float64)
    outs = []
    for fn in ("reference", "padded"):
        q, k, v = (x.clone().requires_grad_() for x in (q0, k0, v0))
        cu = torch.tensor(bounds)
        if fn == "reference":
            out = varlen_causal_attention(q, k, v, cu, 0.25)
        else:
            out = padded_varlen_causal_attention(q, k, v, padded_varlen_plan(bounds, q.device), 0.25)
        out.backward(grad)
        outs.append((out.detach(), q.grad, k.grad, v.grad))
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_varlen_context_checks_the_token_count_once():
    ctx = VarlenContext(torch.tensor([0, 2, 5]))
    assert ctx.bounds == [0, 2, 5]
    q = torch.randn(4, 2, 8)
    with pytest.raises(ValueError, match="covers 5 tokens but the forward has 4"):
        ctx.attend(0, q, q, q, 0.5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_varlen_context_uses_the_padded_path(dtype, monkeypatch):
    import miles.kernels.attention as attention

    if dtype != torch.float32:  # bf16 takes the varlen flash kernel unless it is given up
        monkeypatch.setattr(attention, "_flash_failed", ["off for this test"])
    bounds = [0, 100, 357, 358, 1024]
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1024, 8, 64, generator=gen).to("cuda", dtype)
    k = torch.randn(1024, 2, 64, generator=gen).to("cuda", dtype)
    v = torch.randn(1024, 2, 64, generator=gen).to("cuda", dtype)
    ctx = VarlenContext(torch.tensor(bounds, device="cuda"))
    out = ctx.attend(0, q, k, v, 0.125)
    assert ctx._padded_plan is not None
    ref = varlen_causal_attention(q.float(), k.float(), v.float(), torch.tensor(bounds), 0.125)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.float(), ref, rtol=tol, atol=tol)


def test_flash_varlen_only_for_half_precision_cuda():
    q, k = torch.randn(4, 6, 64), torch.randn(4, 2, 64)
    assert not flash_varlen_supported(q, k)  # CPU
    assert not flash_varlen_supported(q.bfloat16(), k.bfloat16())
    if torch.cuda.is_available():
        assert flash_varlen_supported(q.cuda().bfloat16(), k.cuda().bfloat16())
        assert not flash_varlen_supported(q.cuda(), k.cuda())  # fp32: the padded SDPA path
        assert not flash_varlen_supported(q.cuda().bfloat16(), k[:, :1].expand(4, 4, 64).cuda().bfloat16())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("bounds", [[0, 7], [0, 3, 3, 12, 13], [0, 1, 400, 401, 401, 1000]])
@pytest.mark.parametrize("heads", [(4, 4), (9, 3)])
def test_flash_varlen_equals_the_reference_with_gradients(bounds, heads):
    """The trainer's bf16 CUDA path (through its context) against the fp32 per-sequence reference."""
    hq, hkv = heads
    t = bounds[-1]
    gen = torch.Generator().manual_seed(0)
    q0, k0, v0 = (torch.randn(t, h, 64, generator=gen) for h in (hq, hkv, hkv))
    grad = torch.randn(t, hq, 64, generator=gen)
    outs = []
    for fn in ("reference", "flash"):
        dtype = torch.float32 if fn == "reference" else torch.bfloat16
        q, k, v = (x.to("cuda", dtype).requires_grad_() for x in (q0, k0, v0))
        cu = torch.tensor(bounds, device="cuda")
        if fn == "reference":
            out = varlen_causal_attention(q, k, v, cu, 0.125)
        else:
            ctx = VarlenContext(cu)
            out = ctx.attend(0, q, k, v, 0.125)
            assert ctx._padded_plan is None  # not the padded fallback
            direct = flash_varlen_causal_attention(q, k, v, cu, ctx.max_len, 0.125)
            assert torch.equal(out, direct)
        out.backward(grad.to("cuda", dtype))
        outs.append((out.detach(), q.grad, k.grad, v.grad))
    for a, b in zip(*outs):
        torch.testing.assert_close(b.float(), a.float(), rtol=3e-2, atol=3e-2)
