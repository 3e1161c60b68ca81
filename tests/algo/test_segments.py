import pytest
import torch

from miles.algo.segments import (
    check_cu_seqlens,
    expand_to_tokens,
    last_masked_index,
    pad_segments,
    segment_discounted_cumsum,
    segment_ids,
    segment_masked_mean,
    segment_max,
    segment_sum,
    unpad_segments,
)

CU = torch.tensor([0, 3, 3, 5, 9], dtype=torch.int32)  # lengths 3, 0, 2, 4
X = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0])


def test_segment_sum_and_ids():
    assert segment_ids(CU).tolist() == [0, 0, 0, 2, 2, 3, 3, 3, 3]
    assert segment_sum(X, CU).tolist() == [6.0, 0.0, 9.0, 30.0]


def test_segment_max_and_masked_mean():
    assert segment_max(X, CU, empty=-1.0).tolist() == [3.0, -1.0, 5.0, 9.0]
    mask = torch.tensor([0, 1, 1, 0, 0, 1, 0, 1, 0.0])
    assert segment_masked_mean(X, mask, CU).tolist() == [2.5, 0.0, 0.0, 7.0]


def test_pad_unpad_roundtrip_and_grad():
    x = X.clone().requires_grad_(True)
    padded = pad_segments(x, CU, fill=-5.0)
    assert padded.shape == (4, 4)
    assert padded[1].tolist() == [-5.0] * 4
    assert torch.equal(unpad_segments(padded, CU), X)
    segment_sum(x * x, CU).sum().backward()
    assert torch.equal(x.grad, 2 * X)


def test_expand_to_tokens():
    assert expand_to_tokens(torch.tensor([1.0, 2.0, 3.0, 4.0]), CU).tolist() == [1, 1, 1, 3, 3, 4, 4, 4, 4]


def test_last_masked_index():
    mask = torch.tensor([0, 1, 0, 0, 0, 1, 1, 1, 0.0])
    assert last_masked_index(mask, CU).tolist() == [1, -1, -1, 7]


def _naive_discounted(x, cu, g):
    out = torch.zeros_like(x, dtype=torch.float64)
    for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
        run = 0.0
        for t in reversed(range(s, e)):
            run = float(x[t]) + g * run
            out[t] = run
    return out


@pytest.mark.parametrize("discount", [0.0, 0.5, 0.97, 1.0])
@pytest.mark.parametrize("chunk", [1, 3, 128])
def test_discounted_cumsum_matches_loop(discount, chunk):
    gen = torch.Generator().manual_seed(0)
    cu = torch.tensor([0, 7, 7, 20, 21, 40])
    x = torch.randn(40, generator=gen)
    got = segment_discounted_cumsum(x, cu, discount, chunk=chunk)
    torch.testing.assert_close(got.double(), _naive_discounted(x, cu, discount), atol=1e-5, rtol=1e-5)


def test_check_cu_seqlens():
    check_cu_seqlens(CU, 9)
    with pytest.raises(ValueError, match="end at T=10"):
        check_cu_seqlens(CU, 10)
    with pytest.raises(ValueError, match="non-decreasing"):
        check_cu_seqlens(torch.tensor([0, 5, 3, 9]), 9)
    with pytest.raises(ValueError, match="integer"):
        check_cu_seqlens(torch.tensor([0.0, 9.0]), 9)
