import pytest
import torch

from miles.algo import (
    entropy_from_logits,
    logprobs_and_entropy_from_hidden,
    logprobs_from_hidden,
    logprobs_from_logits,
)

T, H, V = 37, 16, 50


def _inputs(dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(T, H, generator=gen, dtype=dtype).requires_grad_(True)
    weight = (torch.randn(V, H, generator=gen, dtype=dtype) * 0.5).requires_grad_(True)
    target = torch.randint(0, V, (T,), generator=gen)
    return hidden, weight, target


def test_logprobs_from_logits_matches_log_softmax():
    logits = torch.randn(5, 7, V)
    target = torch.randint(0, V, (5, 7))
    for temp in (1.0, 0.6):
        expected = torch.log_softmax(logits / temp, dim=-1).gather(-1, target[..., None]).squeeze(-1)
        torch.testing.assert_close(logprobs_from_logits(logits, target, temperature=temp), expected)


def test_entropy_from_logits():
    logits = torch.randn(9, V, dtype=torch.float64)
    for temp in (1.0, 1.7):
        logp = torch.log_softmax(logits / temp, dim=-1)
        expected = -(logp.exp() * logp).sum(-1)
        torch.testing.assert_close(entropy_from_logits(logits, temperature=temp), expected)
    # bf16 logits are scored in fp32
    assert entropy_from_logits(logits.bfloat16()).dtype == torch.float32


@pytest.mark.parametrize(
    "chunk_size,vocab_chunk_size,temperature",
    [(8, None, 1.0), (5, 7, 0.7), (64, 13, 1.3), (1, 50, 1.0), (37, 1, 0.9)],
)
def test_chunked_equals_naive_in_value_and_gradient(chunk_size, vocab_chunk_size, temperature):
    hidden, weight, target = _inputs()
    gen = torch.Generator().manual_seed(1)
    g_lp, g_ent = torch.randn(T, generator=gen), torch.randn(T, generator=gen)

    logits = hidden @ weight.t()
    lp_ref = logprobs_from_logits(logits, target, temperature)
    ent_ref = entropy_from_logits(logits, temperature)
    grads_ref = torch.autograd.grad((lp_ref * g_lp).sum() + (ent_ref * g_ent).sum(), (hidden, weight))

    lp, ent = logprobs_and_entropy_from_hidden(
        hidden,
        weight,
        target,
        temperature=temperature,
        chunk_size=chunk_size,
        vocab_chunk_size=vocab_chunk_size,
    )
    torch.testing.assert_close(lp, lp_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ent, ent_ref, atol=1e-5, rtol=1e-5)
    grads = torch.autograd.grad((lp * g_lp).sum() + (ent * g_ent).sum(), (hidden, weight))
    for got, ref in zip(grads, grads_ref):
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_logprobs_only_gradient_and_partial_requires_grad():
    hidden, weight, target = _inputs(seed=2)
    lp_ref = logprobs_from_logits(hidden @ weight.t(), target)
    g_ref = torch.autograd.grad(lp_ref.sum(), (hidden, weight))
    lp = logprobs_from_hidden(hidden, weight, target, chunk_size=6, vocab_chunk_size=11)
    g = torch.autograd.grad(lp.sum(), (hidden, weight))
    for got, ref in zip(g, g_ref):
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    # frozen LM head: only the hidden states get a gradient
    frozen = weight.detach()
    lp = logprobs_from_hidden(hidden, frozen, target, chunk_size=6)
    (gh,) = torch.autograd.grad(lp.sum(), hidden)
    torch.testing.assert_close(gh, g_ref[0], atol=1e-5, rtol=1e-5)


def test_gradcheck_float64():
    gen = torch.Generator().manual_seed(4)
    hidden = torch.randn(6, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(9, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    target = torch.randint(0, 9, (6,), generator=gen)

    def f(h, w):
        return logprobs_and_entropy_from_hidden(
            h, w, target, temperature=0.8, chunk_size=4, vocab_chunk_size=4
        )

    assert torch.autograd.gradcheck(f, (hidden, weight))


def test_bf16_close_to_fp32():
    hidden, weight, target = _inputs()
    lp32 = logprobs_from_hidden(hidden, weight, target, chunk_size=8)
    lp16 = logprobs_from_hidden(hidden.bfloat16(), weight.bfloat16(), target, chunk_size=8)
    assert lp16.dtype == torch.float32
    torch.testing.assert_close(lp16, lp32, atol=0.1, rtol=0.05)
    lp16.sum().backward()


def test_input_validation():
    hidden, weight, target = _inputs()
    with pytest.raises(ValueError, match="target_ids must lie"):
        logprobs_from_hidden(hidden, weight, torch.full((T,), V))
    with pytest.raises(ValueError, match="expected hidden"):
        logprobs_from_hidden(hidden, weight[:, :5], target)
    with pytest.raises(ValueError, match=r"shape \[T\]"):
        logprobs_from_hidden(hidden, weight, target[:3])
    empty = logprobs_from_hidden(hidden[:0], weight, target[:0])
    assert empty.shape == (0,)


def test_every_slice_goes_through_the_ops_with_the_eager_result():
    """``ops`` runs each vocabulary slice's elementwise work (the trainer passes fused ones on
    CUDA); the default ops are the eager functions."""
    from miles.algo.logprobs import SliceOps, slice_grad, slice_stats

    hidden, weight, target = _inputs(seed=5)
    seen: list[str] = []

    def stats(*args):
        seen.append("stats")
        return slice_stats(*args)

    def grad(*args):
        seen.append("grad")
        return slice_grad(*args)

    kw = dict(temperature=0.8, chunk_size=10, vocab_chunk_size=20)
    lp, ent = logprobs_and_entropy_from_hidden(hidden, weight, target, ops=SliceOps(stats, grad), **kw)
    lp_ref, ent_ref = logprobs_and_entropy_from_hidden(hidden, weight, target, **kw)
    assert torch.equal(lp, lp_ref) and torch.equal(ent, ent_ref)
    assert seen == ["stats"] * 4 * 3  # 4 token chunks x 3 vocabulary slices
    seen.clear()
    grads = torch.autograd.grad(lp.sum() + ent.sum(), (hidden, weight))
    grads_ref = torch.autograd.grad(lp_ref.sum() + ent_ref.sum(), (hidden, weight))
    assert seen == ["grad"] * 4 * 3
    assert all(torch.equal(g, r) for g, r in zip(grads, grads_ref))


def test_slice_grad_is_the_gradient_of_the_slice_stats():
    """``slice_grad`` against autograd through ``log_softmax`` on one whole-vocabulary slice."""
    from miles.algo.logprobs import slice_grad

    gen = torch.Generator().manual_seed(6)
    z = torch.randn(7, V, generator=gen, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, V, (7,), generator=gen)
    g_lp, g_ent = (
        torch.randn(7, generator=gen, dtype=torch.float64),
        torch.randn(7, generator=gen, dtype=torch.float64),
    )
    t = 0.7
    lp = logprobs_from_logits(z, y, t)
    ent = entropy_from_logits(z, t)
    (want,) = torch.autograd.grad((lp * g_lp).sum() + (ent * g_ent).sum(), z, retain_graph=True)
    lse = torch.logsumexp(z.detach() / t, dim=-1)
    inside = torch.ones(7, dtype=torch.bool)
    got = slice_grad(z.detach(), lse, ent.detach(), g_lp, g_ent, y, inside, t, torch.float64)
    torch.testing.assert_close(got, want)
    only_lp = slice_grad(z.detach(), lse, ent.detach(), g_lp, None, y, inside, t, torch.float64)
    (want_lp,) = torch.autograd.grad((lp * g_lp).sum(), z)
    torch.testing.assert_close(only_lp, want_lp)


def test_add_matmul_accumulates_in_the_accumulators_dtype():
    from miles.algo.logprobs import add_matmul

    gen = torch.Generator().manual_seed(7)
    a, b = torch.randn(5, 8, generator=gen), torch.randn(8, 3, generator=gen)
    acc = torch.ones(5, 3)
    add_matmul(acc, a, b)
    torch.testing.assert_close(acc, 1 + a @ b)
    acc64 = torch.ones(5, 3, dtype=torch.float64)
    add_matmul(acc64, a.bfloat16(), b.bfloat16())  # a narrower product is widened, then added
    torch.testing.assert_close(acc64, 1 + (a.bfloat16() @ b.bfloat16()).double())
