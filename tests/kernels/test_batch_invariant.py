"""Batch-invariant kernels: row 0 of every op is bitwise the same whatever the batch (M = 1..512),
and the kernels still compute the right thing (close to the reference kernels)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from miles.kernels import batch_invariant as bi
from miles.kernels.attention import prefix_causal_attention, varlen_causal_attention
from miles.models.layers import Linear, RMSNorm

SIZES = range(1, 513)
# On the GPU (where each attention call is many small kernels) every M up to 64 (all block and
# chunk boundaries), then every 15th, then 512; the CPU test takes every M.
ATTENTION_SIZES = [*range(1, 65), *range(65, 512, 15), 512]


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_plain_linear_is_not_batch_invariant_here():
    """Why the mode exists: on this CPU the BLAS changes its summation order with the row count."""
    w = torch.randn(1536, 576, generator=_gen())
    x = torch.randn(512, 576, generator=_gen(1))
    row0 = F.linear(x[:1], w)[0]
    assert any(not torch.equal(F.linear(x[:m], w)[0], row0) for m in SIZES)


def test_linear_row_zero_is_bitwise_equal_for_every_batch_size():
    w = torch.randn(384, 576, generator=_gen())
    b = torch.randn(384, generator=_gen(2))
    x = torch.randn(512, 576, generator=_gen(1))
    row0 = bi.linear(x[:1], w, b)[0]
    assert all(torch.equal(bi.linear(x[:m], w, b)[0], row0) for m in SIZES)
    # and whatever the other rows hold, wherever the row sits
    other = torch.randn(40, 576, generator=_gen(3))
    other[17] = x[0]
    assert torch.equal(bi.linear(other, w, b)[17], row0)
    torch.testing.assert_close(bi.linear(x, w, b), F.linear(x, w, b), rtol=1e-5, atol=1e-5)


def test_linear_of_no_rows_is_empty():
    """An MoE expert no token was routed to still runs (on zero rows) during training."""
    w = torch.randn(8, 4, requires_grad=True)
    out = bi.linear(torch.zeros(0, 4), w)
    assert out.shape == (0, 8)
    out.sum().backward()
    assert torch.equal(w.grad, torch.zeros(8, 4))


def test_linear_module_switches_with_the_mode():
    layer = Linear(64, 32)
    x = torch.randn(5, 64, generator=_gen())
    with bi.batch_invariant():
        assert bi.enabled()
        inv = layer(x)
    assert not bi.enabled()
    assert torch.equal(inv, bi.linear(x, layer.weight, layer.bias))
    torch.testing.assert_close(inv, layer(x), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    "op",
    [
        lambda x: torch.log_softmax(x / 0.7, dim=-1),
        RMSNorm(256, 1e-6),
        lambda x: F.silu(x) * x,
        lambda x: torch.softmax(x, dim=-1, dtype=torch.float32),
    ],
    ids=["log_softmax", "rmsnorm", "silu_mul", "router_softmax"],
)
def test_row_wise_ops_are_batch_invariant(op):
    x = torch.randn(512, 256, generator=_gen())
    row0 = op(x[:1])[0]
    assert all(torch.equal(op(x[:m])[0], row0) for m in SIZES)


def _qkv(t: int, hq: int = 6, hkv: int = 2, d: int = 16, seed: int = 0):
    g = _gen(seed)
    return (torch.randn(t, hq, d, generator=g), torch.randn(t, hkv, d, generator=g),
            torch.randn(t, hkv, d, generator=g))  # fmt: skip


def test_attention_matches_the_reference():
    q, k, v = _qkv(150)
    cu = torch.tensor([0, 37, 37, 150])
    ref = varlen_causal_attention(q, k, v, cu, 0.25)
    torch.testing.assert_close(bi.varlen_causal_attention(q, k, v, cu, 0.25), ref, rtol=1e-5, atol=1e-5)
    pos = torch.arange(100, 150)
    out = bi.causal_attention(q[100:], k, v, pos, 0.25)
    torch.testing.assert_close(out, prefix_causal_attention(q[100:], k, v, 0.25), rtol=1e-5, atol=1e-5)


def test_a_query_gets_the_same_bits_however_it_is_batched():
    """Position 70's output alone (decode), inside prefill chunks cut in different places, with
    more keys after it (the trainer's whole sequence) and with other queries in its block."""
    q, k, v = _qkv(300)
    pos = torch.arange(300)
    decode = bi.causal_attention(q[70:71], k[:71], v[:71], pos[70:71], 0.5)[0]
    assert torch.equal(bi.causal_attention(q, k, v, pos, 0.5)[70], decode)  # whole sequence
    for start, end in ((0, 71), (64, 80), (70, 71), (33, 300), (69, 75)):
        out = bi.causal_attention(q[start:end], k[:end], v[:end], pos[start:end], 0.5)
        assert torch.equal(out[70 - start], decode), (start, end)
    packed = bi.varlen_causal_attention(
        torch.cat([q[:5], q[:71]]), torch.cat([k[:5], k[:71]]), torch.cat([v[:5], v[:71]]),
        torch.tensor([0, 5, 76]), 0.5,
    )  # fmt: skip
    assert torch.equal(packed[75], decode)


def test_attention_row_zero_is_bitwise_equal_for_every_number_of_queries():
    q, k, v = _qkv(512, hq=2, hkv=1, d=8)
    pos = torch.arange(512)
    row0 = bi.causal_attention(q[:1], k[:1], v[:1], pos[:1], 0.3)[0]
    for m in SIZES:
        assert torch.equal(bi.causal_attention(q[:m], k[:m], v[:m], pos[:m], 0.3)[0], row0), m


def test_logprobs_follow_the_samplers_op_sequence():
    hidden = torch.randn(9, 32, generator=_gen())
    weight = torch.randn(100, 32, generator=_gen(1))
    targets = torch.randint(0, 100, (9,), generator=_gen(2))
    logp, entropy = bi.logprobs_and_entropy(hidden, weight, targets, 0.7, chunk_size=4)
    for i in range(9):
        row = torch.log_softmax(bi.linear(hidden[i : i + 1], weight)[0].float().clone() / 0.7, dim=-1)
        assert torch.equal(logp[i], row[targets[i]])
    ref = torch.log_softmax(hidden @ weight.T / 0.7, -1)
    torch.testing.assert_close(entropy, -(ref.exp() * ref).sum(-1), rtol=1e-5, atol=1e-5)


def test_attention_rejects_queries_past_the_keys():
    q, k, v = _qkv(10)
    with pytest.raises(ValueError, match="needs keys up to it"):
        bi.causal_attention(q, k[:5], v[:5], torch.arange(10), 1.0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bf16_row_zero_is_bitwise_equal_for_every_batch_size():
    dev, bf = "cuda", torch.bfloat16
    w = torch.randn(1536, 576, device=dev, dtype=bf)
    x = torch.randn(512, 576, device=dev, dtype=bf)
    plain0 = F.linear(x[:1], w)[0]
    plain_variant = sum(not torch.equal(F.linear(x[:m], w)[0], plain0) for m in SIZES)
    print(f"plain cuBLAS: row 0 differs for {plain_variant} of 512 batch sizes")
    ops = {
        "linear": lambda t: bi.linear(t, w),
        "rmsnorm": lambda t: bi.rowwise(RMSNorm(576, 1e-6).to(dev, bf)._norm, t),
        "log_softmax": lambda t: bi.log_softmax(t.float() / 0.7),
    }
    for name, op in ops.items():
        row0 = op(x[:1])[0]
        bad = [m for m in SIZES if not torch.equal(op(x[:m])[0], row0)]
        assert not bad, (name, bad[:5])
    q, k, v = (torch.randn(512, h, 64, device=dev, dtype=bf) for h in (8, 2, 2))
    pos = torch.arange(512, device=dev)
    row0 = bi.causal_attention(q[:1], k[:1], v[:1], pos[:1], 0.125)[0]
    for m in ATTENTION_SIZES:
        assert torch.equal(bi.causal_attention(q[:m], k[:m], v[:m], pos[:m], 0.125)[0], row0), m
