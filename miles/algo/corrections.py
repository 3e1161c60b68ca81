"""Rollout/training mismatch corrections (TIS, MIS), chosen by name from :data:`CORRECTIONS`.

The engine samples with ``pi_rollout`` but the trainer differentiates ``pi_train``; their
log-probs differ (kernels, precision, MoE routing), so the policy gradient is off-policy. A
correction turns the per-token ratio ``rho_t = exp(train_logp_t - rollout_logp_t)`` into

- ``weights`` ``[T]``: importance weights that multiply the per-token policy loss, and
- ``loss_mask`` ``[T]``: the input mask with rejected tokens / sequences set to 0.

``train_logp`` is the trainer-side log-prob under the policy that produced the batch (the PPO
``old_logp``, or the current one in bypass mode). Every output is DETACHED: the weights are
constants, no gradient flows through them. Weights are 1 wherever the returned mask is 0. With
``train_logp == rollout_logp`` every correction is the identity (weights 1, mask unchanged);
:class:`CorrectionParams` enforces bounds that guarantee it.

See techniques.md §B: TIS (Yao et al. 2025, "Your Efficient RL Framework Secretly Brings You
Off-Policy RL Training"); token mask (IcePop); sequence/geometric mask and veto (Liu, Li et al.
2025, "When Speed Kills Stability").
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple, Protocol

import torch
from torch import Tensor

from miles.algo.registry import Registry
from miles.algo.segments import (
    check_cu_seqlens,
    expand_to_tokens,
    masked,
    segment_masked_mean,
    segment_max,
    segment_sum,
)

# exp() of a log-ratio beyond this overflows nothing but is meaningless; clamp before exp.
_LOG_RATIO_BOUND = 20.0


@dataclass(frozen=True)
class CorrectionParams:
    """Bounds for the corrections; ``None`` disables a bound (or a whole MIS criterion).

    - ``tis_clip`` / ``tis_clip_low``: weights are ``clamp(rho, tis_clip_low, tis_clip)``
      (``--tis-clip`` 2.0, ``--tis-clip-low`` 0). Used by ``tis`` and by ``mis`` for kept tokens.
    - ``mis_low`` / ``mis_high``: token-level mask, drop tokens with ``rho`` outside ``[low, high]``.
    - ``mis_seq_low`` / ``mis_seq_high``: geometric sequence mask, drop a sequence whose geometric
      mean ratio ``exp(mean_t log rho_t)`` is outside ``[seq_low, seq_high]`` (length-independent).
    - ``mis_veto``: drop a whole sequence if any of its tokens has ``rho < mis_veto``.
    """

    tis_clip: float | None = 2.0
    tis_clip_low: float = 0.0
    mis_low: float | None = 0.5
    mis_high: float | None = 2.0
    mis_seq_low: float | None = 0.99
    mis_seq_high: float | None = 1.001
    mis_veto: float | None = 1e-4

    def __post_init__(self) -> None:
        # Every bound must admit rho == 1, so that matching log-probs leave the batch untouched.
        checks = [
            ("tis_clip_low", self.tis_clip_low, lambda x: 0.0 <= x <= 1.0, "in [0, 1]"),
            ("tis_clip", self.tis_clip, lambda x: x >= 1.0, ">= 1"),
            ("mis_low", self.mis_low, lambda x: 0.0 <= x <= 1.0, "in [0, 1]"),
            ("mis_high", self.mis_high, lambda x: x >= 1.0, ">= 1"),
            ("mis_seq_low", self.mis_seq_low, lambda x: 0.0 < x <= 1.0, "in (0, 1]"),
            ("mis_seq_high", self.mis_seq_high, lambda x: x >= 1.0, ">= 1"),
            ("mis_veto", self.mis_veto, lambda x: 0.0 < x < 1.0, "in (0, 1)"),
        ]
        for name, value, ok, expected in checks:
            if value is not None and not ok(value):
                raise ValueError(f"correction bound {name} must be {expected}, got {value}")


class CorrectionOutput(NamedTuple):
    """``weights`` ``[T]`` and ``loss_mask`` ``[T]`` (both detached), and scalar ``metrics``."""

    weights: Tensor
    loss_mask: Tensor
    metrics: dict[str, Tensor]


class Correction(Protocol):
    def __call__(
        self,
        train_logp: Tensor,
        rollout_logp: Tensor,
        loss_mask: Tensor,
        cu_seqlens: Tensor,
        params: CorrectionParams,
    ) -> CorrectionOutput: ...


CORRECTIONS: Registry[Correction] = Registry("rollout correction")


def _masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    return masked(x, mask).sum() / mask.sum().clamp(min=1)


def _log_ratio(train_logp: Tensor, rollout_logp: Tensor, loss_mask: Tensor, cu_seqlens: Tensor) -> Tensor:
    if train_logp.shape != rollout_logp.shape or train_logp.shape != loss_mask.shape or train_logp.dim() != 1:
        raise ValueError(
            f"train_logp {tuple(train_logp.shape)}, rollout_logp {tuple(rollout_logp.shape)} and "
            f"loss_mask {tuple(loss_mask.shape)} must all be [T]"
        )
    check_cu_seqlens(cu_seqlens, loss_mask.numel())
    return train_logp.detach().float() - rollout_logp.detach().float()


def mismatch_metrics(train_logp: Tensor, rollout_logp: Tensor, loss_mask: Tensor) -> dict[str, Tensor]:
    """Diagnostics of the train/rollout mismatch over trained tokens (names as in slime/verl).

    - ``train_rollout_logprob_abs_diff``: ``mean |train - rollout|`` (0 in true on-policy mode);
    - ``mismatch_kl``: ``mean(rollout - train)``, the k1 estimate of KL(rollout || train);
    - ``mismatch_k3_kl``: ``mean(exp(d) - d - 1)`` with ``d = train - rollout`` (k3, >= 0);
    - ``is_ratio_mean`` / ``is_ratio_max``: the token importance ratio ``exp(d)`` an uncorrected
      run trains with (TIS/MIS log their truncated/masked weights besides).
    """
    mask = loss_mask.detach().float()
    d = train_logp.detach().float() - rollout_logp.detach().float()
    d_safe = d.clamp(-_LOG_RATIO_BOUND, _LOG_RATIO_BOUND)  # only k3 exponentiates
    ratio = torch.exp(d_safe)
    kept = mask > 0
    return {
        "train_rollout_logprob_abs_diff": _masked_mean(d.abs(), mask),
        "mismatch_kl": _masked_mean(-d, mask),
        "mismatch_k3_kl": _masked_mean(torch.expm1(d_safe) - d_safe, mask),
        "is_ratio_mean": _masked_mean(ratio, mask),
        "is_ratio_max": ratio[kept].max() if bool(kept.any()) else ratio.new_ones(()),
    }


def _truncate(ratio: Tensor, params: CorrectionParams) -> Tensor:
    return ratio.clamp(min=params.tis_clip_low, max=params.tis_clip)


def _weight_metrics(ratio: Tensor, weights: Tensor, mask: Tensor) -> dict[str, Tensor]:
    kept = mask > 0
    w_max = weights[kept].max() if bool(kept.any()) else weights.new_ones(())
    return {
        "tis_weight_mean": _masked_mean(weights, mask),
        "tis_weight_max": w_max,
        "tis_clipfrac": _masked_mean((weights != ratio).float(), mask),
    }


@CORRECTIONS.register("none")
def no_correction(
    train_logp: Tensor, rollout_logp: Tensor, loss_mask: Tensor, cu_seqlens: Tensor, params: CorrectionParams
) -> CorrectionOutput:
    """Identity: weights 1, mask unchanged; only the mismatch diagnostics are computed."""
    _log_ratio(train_logp, rollout_logp, loss_mask, cu_seqlens)
    mask = loss_mask.detach().clone()
    return CorrectionOutput(
        torch.ones_like(mask, dtype=torch.float32), mask, mismatch_metrics(train_logp, rollout_logp, mask)
    )


@CORRECTIONS.register("tis")
def tis(
    train_logp: Tensor, rollout_logp: Tensor, loss_mask: Tensor, cu_seqlens: Tensor, params: CorrectionParams
) -> CorrectionOutput:
    """Truncated importance sampling (``--use-tis``; Yao et al. 2025; verl PR #2953; slime ``vanilla_tis_function``).

    ``w_t = clamp(exp(train_logp_t - rollout_logp_t), tis_clip_low, tis_clip)`` on trained tokens,
    1 elsewhere; the mask is unchanged. Metrics: ``tis_weight_mean``, ``tis_weight_max``,
    ``tis_clipfrac`` (fraction of trained tokens whose weight was truncated) and the mismatch
    diagnostics of :func:`mismatch_metrics`.
    """
    log_ratio = _log_ratio(train_logp, rollout_logp, loss_mask, cu_seqlens)
    mask = loss_mask.detach().clone()
    ratio = log_ratio.clamp(-_LOG_RATIO_BOUND, _LOG_RATIO_BOUND).exp()
    weights = torch.where(mask > 0, _truncate(ratio, params), torch.ones_like(ratio))
    metrics = _weight_metrics(ratio, weights, mask.float())
    metrics.update(mismatch_metrics(train_logp, rollout_logp, mask))
    return CorrectionOutput(weights, mask, metrics)


@CORRECTIONS.register("mis")
def mis(
    train_logp: Tensor, rollout_logp: Tensor, loss_mask: Tensor, cu_seqlens: Tensor, params: CorrectionParams
) -> CorrectionOutput:
    """Masked importance sampling: reject tokens and sequences whose ratio is out of bounds.

    With ``rho_t = exp(train_logp_t - rollout_logp_t)`` over trained tokens:

    - token mask (IcePop): drop token ``t`` if ``rho_t`` is outside ``[mis_low, mis_high]``;
    - geometric sequence mask (Geo-RS): drop sequence ``i`` if
      ``exp(mean_{t in i} log rho_t)`` is outside ``[mis_seq_low, mis_seq_high]``; the geometric
      mean does not depend on the length, unlike the product ``prod_t rho_t``;
    - veto: drop sequence ``i`` if ``min_{t in i} rho_t < mis_veto``.

    Kept tokens get the truncated weight ``clamp(rho_t, tis_clip_low, tis_clip)`` (token-TIS +
    Geo-MIS, the combination that kept Miles's Qwen3-30B-A3B run stable; techniques.md §B.4).
    Metrics: the TIS ones over kept tokens, ``mis_mask_frac`` (trained tokens dropped, any
    reason), ``mis_token_mask_frac``, ``mis_seq_mask_frac`` and ``mis_veto_frac`` (fractions of
    sequences with a trained token), and the mismatch diagnostics.
    """
    log_ratio = _log_ratio(train_logp, rollout_logp, loss_mask, cu_seqlens)
    mask = loss_mask.detach().float()
    trained = mask > 0
    ratio = log_ratio.clamp(-_LOG_RATIO_BOUND, _LOG_RATIO_BOUND).exp()

    token_keep = torch.ones_like(trained)
    if params.mis_low is not None:
        token_keep &= ratio >= params.mis_low
    if params.mis_high is not None:
        token_keep &= ratio <= params.mis_high

    num_seqs = cu_seqlens.numel() - 1
    seq_keep = torch.ones(num_seqs, dtype=torch.bool, device=mask.device)
    seq_geo_drop = torch.zeros_like(seq_keep)
    if params.mis_seq_low is not None or params.mis_seq_high is not None:
        # Compare in log space: the geometric mean of the ratios is exp(mean log ratio).
        seq_log = segment_masked_mean(log_ratio, mask, cu_seqlens)
        if params.mis_seq_low is not None:
            seq_geo_drop |= seq_log < math.log(params.mis_seq_low)
        if params.mis_seq_high is not None:
            seq_geo_drop |= seq_log > math.log(params.mis_seq_high)
        seq_keep &= ~seq_geo_drop
    seq_vetoed = torch.zeros_like(seq_keep)
    if params.mis_veto is not None:
        catastrophic = (trained & (log_ratio < math.log(params.mis_veto))).float()
        seq_vetoed = segment_max(catastrophic, cu_seqlens, empty=0.0) > 0
        seq_keep &= ~seq_vetoed

    keep = token_keep & expand_to_tokens(seq_keep, cu_seqlens) & trained
    new_mask = keep.to(loss_mask.dtype)
    weights = torch.where(keep, _truncate(ratio, params), torch.ones_like(ratio))

    has_tokens = segment_sum(mask, cu_seqlens) > 0
    num_active = has_tokens.float().sum().clamp(min=1)
    metrics = _weight_metrics(ratio, weights, keep.float())
    metrics.update(
        {
            "mis_mask_frac": _masked_mean((trained & ~keep).float(), mask),
            "mis_token_mask_frac": _masked_mean((~token_keep).float(), mask),
            "mis_seq_mask_frac": (seq_geo_drop & has_tokens).float().sum() / num_active,
            "mis_veto_frac": (seq_vetoed & has_tokens).float().sum() / num_active,
        }
    )
    metrics.update(mismatch_metrics(train_logp, rollout_logp, mask))
    return CorrectionOutput(weights, new_mask, metrics)


def apply_correction(
    name: str,
    train_logp: Tensor,
    rollout_logp: Tensor,
    loss_mask: Tensor,
    cu_seqlens: Tensor,
    params: CorrectionParams | None = None,
) -> CorrectionOutput:
    """Run the correction registered as ``name`` (``none | tis | mis``) with ``params`` (defaults if None)."""
    return CORRECTIONS.get(name)(
        train_logp, rollout_logp, loss_mask, cu_seqlens, params or CorrectionParams()
    )
