"""The Triton batch-invariant kernels (CUDA): every row of the persistent matmul and of the
attention kernel is bitwise the same whatever the batch (M = 1..512), the engine's paged path and
the trainer's packed path give the same bits, and both compute the right thing (close to torch)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

M_VALUES = [1, 2, 7, 16, 63, 64, 65, 128, 255, 256, 257, 300, 448, 511, 512]
DTYPES = [torch.bfloat16, torch.float16, torch.float32]


@pytest.fixture(scope="module")
def tm():
    pytest.importorskip("triton")
    from miles.kernels.triton import matmul

    return matmul


@pytest.fixture(scope="module")
def ta():
    pytest.importorskip("triton")
    from miles.kernels.triton import attention

    return attention


def _randn(*shape, dtype=torch.bfloat16, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return torch.randn(*shape, device="cuda", dtype=dtype, generator=g)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n,k", [(1536, 576), (4096, 1024), (100, 72), (8, 64)])
def test_every_row_of_the_matmul_is_bitwise_equal_across_batch_sizes(tm, dtype, n, k):
    w, b = _randn(n, k, dtype=dtype), _randn(n, dtype=dtype, seed=2)
    x = _randn(512, k, dtype=dtype, seed=1)
    full = tm.matmul(x, w, b)
    bad = [m for m in M_VALUES if not torch.equal(tm.matmul(x[:m], w, b), full[:m])]
    assert not bad, f"rows differ for m in {bad}"
    # a row gets the same bits wherever it sits in the batch
    other = _randn(40, k, dtype=dtype, seed=3)
    other[17] = x[0]
    assert torch.equal(tm.matmul(other, w, b)[17], full[0])
    tol = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype]
    ref = (x.double() @ w.double().T + b.double()).to(dtype)
    torch.testing.assert_close(full, ref, rtol=tol, atol=tol * k**0.5)


def test_the_plain_cublas_matmul_is_not_invariant_here(tm):
    """Why the kernel exists (printed, not asserted: cuBLAS' choices vary by version)."""
    w, x = _randn(1536, 576), _randn(512, 576, seed=1)
    full = F.linear(x, w)
    print(
        "cuBLAS rows differ for m in", [m for m in M_VALUES if not torch.equal(F.linear(x[:m], w), full[:m])]
    )


def test_linear_dispatch_uses_triton_and_its_backward_is_exact(tm):
    from miles.kernels import batch_invariant as bi

    assert bi.uses_triton(torch.device("cuda"))
    w = _randn(384, 256, dtype=torch.float32).requires_grad_(True)
    b = _randn(384, dtype=torch.float32, seed=2).requires_grad_(True)
    x = _randn(3, 50, 256, dtype=torch.float32, seed=1).requires_grad_(True)
    out = bi.linear(x, w, b)
    assert torch.equal(out, tm.matmul(x.reshape(-1, 256), w, b).reshape(3, 50, 384))
    grad = _randn(3, 50, 384, dtype=torch.float32, seed=4)
    gx, gw, gb = torch.autograd.grad(out, (x, w, b), grad)
    rx, rw, rb = torch.autograd.grad(F.linear(x, w, b), (x, w, b), grad)
    for got, want in ((gx, rx), (gw, rw), (gb, rb)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    empty = bi.linear(x[:0], w)  # an MoE expert no token reached
    assert empty.shape == (0, 50, 384)


def _qkv(t, hq=8, hkv=2, d=64, dtype=torch.bfloat16, seed=0):
    return _randn(t, hq, d, dtype=dtype, seed=seed), _randn(t, hkv, d, dtype=dtype, seed=seed + 1), \
        _randn(t, hkv, d, dtype=dtype, seed=seed + 2)  # fmt: skip


@pytest.mark.parametrize("d", [16, 64, 128])
def test_attention_row_zero_and_every_row_is_bitwise_equal_for_every_number_of_queries(ta, d):
    q, k, v = _qkv(512, d=d)
    pos = torch.arange(512, device="cuda")
    full = ta.causal_attention(q, k, v, pos, 0.125)
    for m in range(1, 513):
        out = ta.causal_attention(q[:m], k[:m], v[:m], pos[:m], 0.125)
        assert torch.equal(out, full[:m]), m


def test_decode_chunked_prefill_packed_and_paged_attention_agree_bit_for_bit(ta):
    q, k, v = _qkv(300, d=128)
    pos = torch.arange(300, device="cuda")
    decode = ta.causal_attention(q[70:71], k[:71], v[:71], pos[70:71], 0.1)[0]
    for start, end in ((0, 71), (64, 80), (33, 300), (69, 75)):
        out = ta.causal_attention(q[start:end], k[:end], v[:end], pos[start:end], 0.1)
        assert torch.equal(out[70 - start], decode), (start, end)
    cu = torch.tensor([0, 5, 76, 300], device="cuda", dtype=torch.int32)
    packed_q = torch.cat([q[:5], q[:71], q[:224]])
    packed = ta.varlen_causal_attention(packed_q, torch.cat([k[:5], k[:71], k[:224]]),
                                        torch.cat([v[:5], v[:71], v[:224]]), cu, 0.1)  # fmt: skip
    assert torch.equal(packed[75], decode)
    # the paged cache: block size 16, blocks scattered; sequence 1 decodes position 70
    bs, nblocks = 16, 64
    k_cache = torch.zeros(nblocks, bs, 2, 128, device="cuda", dtype=torch.bfloat16)
    v_cache = torch.zeros_like(k_cache)
    perm = torch.randperm(nblocks, generator=torch.Generator().manual_seed(0)).cuda()
    tables = perm[:40].view(2, 20)
    for i, n in enumerate((200, 71)):
        slots = (tables[i, :, None] * bs + torch.arange(bs, device="cuda")).flatten()[:n]
        k_cache.view(-1, 2, 128)[slots] = k[:n]
        v_cache.view(-1, 2, 128)[slots] = v[:n]
    out = ta.paged_attention(
        torch.cat([q[190:200], q[70:71]]), k_cache, v_cache, tables, [10, 1], [200, 71], 0.1
    )
    assert torch.equal(out[10], decode)
    assert torch.equal(out[:10], ta.causal_attention(q[190:200], k[:200], v[:200], pos[190:200], 0.1))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_attention_is_close_to_the_reference_and_its_backward_exact(ta, dtype):
    from miles.kernels.attention import varlen_causal_attention

    q, k, v = (t.requires_grad_(True) for t in _qkv(300, d=64, dtype=dtype))
    cu = torch.tensor([0, 37, 37, 300], device="cuda", dtype=torch.int32)
    out = ta.varlen_causal_attention(q, k, v, cu, 0.125)
    ref = varlen_causal_attention(q, k, v, cu, 0.125)
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(out, ref, rtol=tol, atol=tol)
    grad = _randn(*out.shape, dtype=dtype, seed=9)
    got = torch.autograd.grad(out, (q, k, v), grad)
    want = torch.autograd.grad(ref, (q, k, v), grad)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=tol, atol=tol)


@pytest.mark.parametrize("width", [128, 1024])
def test_rowwise_blocks_on_cuda_are_sized_by_width_and_rows_stay_invariant_across_them(width):
    """CUDA row-wise ops (RMSNorm, q/k-norm) run in width-sized blocks (8192 rows of 128, 4096
    of 1024): a row's bits do not change when the batch crosses a block boundary."""
    from miles.kernels import batch_invariant as bi

    def norm(t):
        h = t.float()
        return (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)).to(t.dtype)

    block = bi._row_block(torch.device("cuda"), width)
    assert block == {128: 8192, 1024: 4096}[width]
    x = _randn(2 * block + 5, width)
    full = bi.rowwise(norm, x)
    for m in (1, 7, block - 1, block, block + 1, 2 * block + 5):
        assert torch.equal(bi.rowwise(norm, x[:m]), full[:m]), m
    assert torch.equal(bi.rowwise(norm, x[block:]), full[block:])
    torch.testing.assert_close(full, norm(x))
