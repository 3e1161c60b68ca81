"""Micro-batch helpers of the training step: first-token rows, batch checks, host reads."""

from __future__ import annotations

import pytest
import torch

from miles.models.attention import VarlenContext
from miles.train.steps import aligned_bins, first_token_mask
from tests.train.helpers import make_batch


def test_first_token_mask_with_empty_sequences() -> None:
    cu = torch.tensor([0, 2, 2, 5, 5], dtype=torch.int32)  # an empty one inside, one at the end
    mask = first_token_mask(cu, 5, torch.device("cpu"))
    assert mask.tolist() == [True, False, True, False, False]


def test_aligned_bins_checks_the_token_ids_once_for_the_batch() -> None:
    batch = make_batch()
    kw = dict(micro_batch_size=2, max_tokens=None, dp_size=1, group=None, device=torch.device("cpu"))
    vocab = int(batch.input_ids.max()) + 1
    assert aligned_bins(batch, vocab_size=vocab, **kw) == aligned_bins(batch, **kw)
    with pytest.raises(ValueError, match=rf"token ids must lie in \[0, {vocab - 1}\)"):
        aligned_bins(batch, vocab_size=vocab - 1, **kw)


def test_varlen_context_checks_its_bounds_on_the_host() -> None:
    with pytest.raises(ValueError, match="start at 0"):
        VarlenContext(torch.tensor([1, 3]))
    with pytest.raises(ValueError, match=">= 2 entries"):
        VarlenContext(torch.tensor([0]))
    with pytest.raises(ValueError, match="1-D"):
        VarlenContext(torch.tensor([[0, 3]]))
    with pytest.raises(ValueError, match="non-decreasing"):
        VarlenContext(torch.tensor([0, 4, 3]))
    ctx = VarlenContext(torch.tensor([0, 4, 4, 9]))
    assert ctx.bounds == [0, 4, 4, 9] and ctx.max_len == 5
