"""Batch-invariant kernels: row 0 of every op is bitwise the same whatever the batch (M = 1..512),
and the kernels still compute the right thing (close to the reference kernels)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from miles.kernels import batch_invariant as bi
from miles.kernels.attention import prefix_causal_attention, varlen_causal_attention
from miles.models.layers import Linear, RMSNorm
from tests.tolerance import assert_reduction_close, assert_within, reduction_tol

SIZES = range(1, 513)
# On the GPU (where each attention call is many small kernels) every M up to 64 (all block and
# chunk boundaries), then every 15th, then 512; the CPU test takes every M.
ATTENTION_SIZES = [*range(1, 65), *range(65, 512, 15), 512]


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _assert_linear_close(got: torch.Tensor, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> None:
    """``got`` is ``F.linear(x, w, b)`` summed in another order (other GEMM shapes): within
    ``reduction_tol`` of its sum of ``K + 1`` terms, scaled by the largest ``sum |terms|``."""
    with torch.no_grad():
        want = F.linear(x, w, b)
        scale = float(F.linear(x.abs(), w.abs(), None if b is None else b.abs()).max())
    assert_reduction_close(got.detach(), want, x.shape[-1] + 1, scale=scale)


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
    _assert_linear_close(bi.linear(x, w, b), x, w, b)


@pytest.mark.parametrize(
    ("k", "n"), [(64, 32), (64, 64), (64, 96), (64, 128), (96, 64), (128, 64), (576, 1536), (1536, 576)]
)
def test_linear_row_does_not_depend_on_its_place_in_a_block(k, n):
    """A decode row is row 0 of its padded block; in the trainer's packed forward the same token
    sits at any row of a block. Invariance needs the BLAS to give a row the same bits wherever it
    sits in the one GEMM shape: MKL's AVX2 code path with two threads does not (rows 6..15 of a
    [16, 96] x [96, 64] GEMM sum in another order than rows 0..5; MKL_ENABLE_INSTRUCTIONS=AVX2,
    OMP_NUM_THREADS=2 shows it on an AVX-512 machine), and true on-policy breaks there."""
    w = torch.randn(n, k, generator=_gen())
    v = torch.randn(k, generator=_gen(1))
    alone = bi.linear(v[None], w)[0]
    rows = bi.blocks(torch.device("cpu"))[0]
    for r in range(rows):
        x = torch.randn(rows, k, generator=_gen(2 + r))
        x[r] = v
        assert torch.equal(bi.linear(x, w)[r], alone), f"row {r} of {rows}"


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
    _assert_linear_close(inv, x, layer.weight, layer.bias)


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


def _attention_tol(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> float:
    """How far two attentions over at most ``T = len(k)`` keys may differ when they sum in other
    orders (an online softmax over key chunks against one softmax). A score ``scale q.k`` is a sum
    of ``D`` terms adding up to at most ``scale |q|_2 |k|_2``; the softmax turns score changes of
    at most ``ds`` into weights whose changes add up to ``2 ds``, plus the rounding of its sum of
    ``T`` terms of at most 1; the output, a convex combination of values, moves by ``max|v|``
    times that, plus its own rounding over ``T`` terms."""
    t, d, vmax = k.shape[0], q.shape[-1], float(v.abs().max())
    ds = reduction_tol(scale * float(q.norm(dim=-1).max()) * float(k.norm(dim=-1).max()), d)
    return vmax * (2 * ds + reduction_tol(1.0, t)) + reduction_tol(vmax, t)


def test_attention_matches_the_reference():
    q, k, v = _qkv(150)
    cu = torch.tensor([0, 37, 37, 150])
    ref = varlen_causal_attention(q, k, v, cu, 0.25)
    tol = _attention_tol(q, k, v, 0.25)
    assert_within(bi.varlen_causal_attention(q, k, v, cu, 0.25), ref, tol, "varlen")
    pos = torch.arange(100, 150)
    out = bi.causal_attention(q[100:], k, v, pos, 0.25)
    assert_within(out, prefix_causal_attention(q[100:], k, v, 0.25), tol, "prefix")


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
    want = -(ref.exp() * ref).sum(-1)
    # A log-prob moves by twice its logits' largest change (a sum of 32 terms) plus the rounding of
    # the log-sum-exp over 100 terms of at most 1; -sum p log p then by that times sum p (|log p| + 1)
    # = H + 1, plus its own rounding over 100 terms adding up to H.
    logit_scale = float((hidden.abs() @ weight.abs().T).max()) / 0.7
    dlogp = 2 * reduction_tol(logit_scale, 32) + reduction_tol(1.0, 100)
    assert_within(entropy, want, dlogp * (want + 1) + reduction_tol(float(want.max()), 100), "entropy")


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
