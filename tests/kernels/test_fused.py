"""Fused inference kernels (RMSNorm, rotary): who gets them, and (GPU) that they compute what the
torch ops compute."""

from __future__ import annotations

import pytest
import torch

from miles.config import EngineConfig
from miles.engine.engine import Engine
from miles.kernels import batch_invariant, fused
from miles.kernels.triton_loader import triton_module
from miles.models.layers import Attention, RMSNorm, use_inference_kernels
from miles.models.loading import load_model
from miles.models.rope import apply_rotary
from tests.models.conftest import save_case


def test_only_the_engine_model_is_switched(tmp_path):
    save_case("qwen3", tmp_path)
    engine_model, trainer_model = load_model(tmp_path), load_model(tmp_path)
    Engine(engine_model, config=EngineConfig(page_size=4), num_blocks=8)
    flags = [m.inference_kernels for m in engine_model.modules() if isinstance(m, RMSNorm | Attention)]
    assert flags and all(flags)
    assert not any(m.inference_kernels for m in trainer_model.modules() if isinstance(m, RMSNorm | Attention))
    use_inference_kernels(engine_model, on=False)
    assert not any(m.inference_kernels for m in engine_model.modules() if isinstance(m, RMSNorm | Attention))


def test_no_fused_kernels_on_cpu_with_grad_or_in_deterministic_mode():
    x = torch.randn(2, 4)
    assert fused.kernels_for(x) is None  # CPU
    if torch.cuda.is_available():
        y = x.cuda()
        assert fused.kernels_for(y) is not None or triton_module("fused", "MILES_FUSED_KERNELS") is None
        with torch.enable_grad():
            assert fused.kernels_for(y) is None
        with batch_invariant.batch_invariant():
            assert fused.kernels_for(y) is None


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 16, 128), (37, 8, 128), (300, 9, 64), (5, 3, 80)])
def test_fused_rotary_has_the_bits_of_apply_rotary(shape, dtype):
    from miles.kernels.triton.fused import rotary

    gen = torch.Generator().manual_seed(0)
    t, heads, d = shape
    x = torch.randn(t, heads, d, generator=gen).to("cuda", dtype)
    cos, sin = (torch.randn(t, d, generator=gen).to("cuda", dtype) for _ in range(2))
    ref = apply_rotary(x, cos, sin)
    out = rotary(x, cos, sin)
    # Within a last-bit rounding of the torch ops (measured on an H200: bf16 differs by one ulp
    # on some elements; fp32 may contract a product and the sum into one FMA).
    tol = (2**-7, 0.07) if dtype == torch.bfloat16 else (1e-6, 1e-6)
    torch.testing.assert_close(out, ref, rtol=tol[0], atol=tol[1])


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 1024), (256, 1024), (33, 16, 128), (7, 2048)])
def test_fused_rms_norm_matches_the_module(shape, dtype):
    from miles.kernels.triton.fused import rms_norm

    gen = torch.Generator().manual_seed(0)
    norm = RMSNorm(shape[-1], 1e-6).to("cuda", dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(shape[-1], generator=gen))
    x = torch.randn(shape, generator=gen).to("cuda", dtype)
    with torch.no_grad():
        ref = norm(x)
        out = rms_norm(x, norm.weight, norm.eps)
    tol = 1e-5 if dtype == torch.float32 else 2e-2  # bf16: at most a last-bit difference
    torch.testing.assert_close(out, ref, rtol=tol, atol=tol)


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 2 * 1536), (256, 2 * 3072), (7, 2 * 80)])
def test_fused_silu_mul_matches_torch(shape, dtype):
    from miles.kernels.triton.fused import silu_mul

    x = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to("cuda", dtype) * 3
    n = shape[1] // 2
    ref = torch.nn.functional.silu(x[:, :n]) * x[:, n:]
    tol = 1e-5 if dtype == torch.float32 else 2e-2  # bf16: a last-bit difference at most
    torch.testing.assert_close(silu_mul(x), ref, rtol=tol, atol=tol)
    with pytest.raises(ValueError, match="silu_mul needs"):
        silu_mul(x[:, :-1])


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_rms_norm_reads_strided_heads(dtype):
    """The q/k heads of a packed projection are a strided view: normed in place of a copy."""
    from miles.kernels.triton.fused import rms_norm

    gen = torch.Generator().manual_seed(1)
    packed = torch.randn(9, (16 + 2 * 4) * 64, generator=gen).to("cuda", dtype)
    k = packed[:, 16 * 64 : 20 * 64].view(9, 4, 64)
    assert not k.is_contiguous()
    w = torch.randn(64, generator=gen).to("cuda", dtype)
    torch.testing.assert_close(rms_norm(k, w, 1e-6), rms_norm(k.contiguous(), w, 1e-6), rtol=0, atol=0)
