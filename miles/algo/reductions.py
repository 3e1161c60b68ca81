"""Loss reductions ``[T] -> scalar``, chosen by name from :data:`LOSS_REDUCTIONS`.

How per-token losses are averaged is a choice separate from the loss itself (DAPO, Dr.GRPO):

- ``token_mean``: ``sum_t m_t x_t / sum_t m_t`` over all trained tokens of the global batch
  (DAPO, arXiv 2503.14476; Megatron's ``--calculate-per-token-loss``).
- ``seq_mean``: ``1/B sum_i (sum_{t in i} m_t x_t / sum_{t in i} m_t)``, the mean of per-sequence
  token means (GRPO's original ``1/G sum_i 1/|o_i| sum_t``; slime's default ``sum_of_sample_mean``).
- ``seq_mean_token_sum``: ``1/B sum_i sum_{t in i} m_t x_t`` (Dr.GRPO, arXiv 2503.20783), optionally
  also divided by a constant max length (``loss_normalizer(..., max_len=L)``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from miles.algo.registry import Registry
from miles.algo.segments import masked, segment_masked_mean, segment_sum, seq_lengths


@dataclass(frozen=True)
class LossReduction:
    """A reduction ``[T] -> scalar`` split as ``numerator / denominator``.

    ``numerator(values, loss_mask, cu_seqlens)`` sums this micro-batch's contributions;
    ``denominator(loss_mask, cu_seqlens)`` is this micro-batch's share of the normaliser. For
    gradient accumulation pass ``normalizer`` = the denominator summed over the whole global batch
    (all micro-batches, all data-parallel ranks): the micro-batch losses then add up exactly to
    the global-batch reduction. The normaliser is clamped to >= 1 (it counts tokens or
    sequences), so an all-masked batch reduces to 0, not NaN.
    """

    numerator: Callable[[Tensor, Tensor, Tensor], Tensor]
    denominator: Callable[[Tensor, Tensor], Tensor]

    def __call__(
        self, values: Tensor, loss_mask: Tensor, cu_seqlens: Tensor, normalizer: float | Tensor | None = None
    ) -> Tensor:
        num = self.numerator(values, loss_mask.to(values.dtype), cu_seqlens)
        den = self.denominator(loss_mask, cu_seqlens) if normalizer is None else normalizer
        return num / torch.clamp(torch.as_tensor(den, dtype=num.dtype, device=num.device), min=1.0)


LOSS_REDUCTIONS: Registry[LossReduction] = Registry("loss reduction")


def _num_tokens(mask: Tensor, cu_seqlens: Tensor) -> Tensor:
    return mask.float().sum()


def _num_seqs(mask: Tensor, cu_seqlens: Tensor) -> Tensor:
    # Every sequence counts, trained tokens or not (as slime's sum_of_sample_mean): a sequence
    # fully masked by MIS still dilutes the mean, so rejecting samples does not inflate the rest.
    return torch.tensor(float(seq_lengths(cu_seqlens).numel()), device=mask.device)


LOSS_REDUCTIONS.add("token_mean", LossReduction(lambda x, m, cu: masked(x, m).sum(), _num_tokens))
LOSS_REDUCTIONS.add(
    "seq_mean", LossReduction(lambda x, m, cu: segment_masked_mean(x, m, cu).sum(), _num_seqs)
)
LOSS_REDUCTIONS.add(
    "seq_mean_token_sum", LossReduction(lambda x, m, cu: segment_sum(masked(x, m), cu).sum(), _num_seqs)
)


def loss_normalizer(
    reduction: str, loss_mask: Tensor, cu_seqlens: Tensor, max_len: int | None = None
) -> Tensor:
    """This micro-batch's share of the ``reduction`` normaliser (sum it over the global batch).

    ``max_len`` multiplies the ``seq_mean_token_sum`` normaliser (Dr.GRPO's constant length).
    """
    den = LOSS_REDUCTIONS.get(reduction).denominator(loss_mask, cu_seqlens)
    if max_len is not None:
        if reduction != "seq_mean_token_sum":
            raise ValueError("max_len applies to the seq_mean_token_sum reduction only")
        den = den * max_len
    return den


def reduce_loss(
    values: Tensor,
    loss_mask: Tensor,
    cu_seqlens: Tensor,
    reduction: str = "token_mean",
    normalizer: float | Tensor | None = None,
) -> Tensor:
    """Reduce per-token ``values`` ``[T]`` to a scalar with the reduction registered as ``reduction``."""
    return LOSS_REDUCTIONS.get(reduction)(values, loss_mask, cu_seqlens, normalizer)
