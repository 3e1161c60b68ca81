"""Policy, KL, entropy, value and SFT losses over packed token tensors.

Conventions: token tensors are ``[T]`` (packed, see :mod:`miles.algo.segments`); ``loss_mask`` is
float ``[T]`` (1 on trained tokens); ``logp`` is the current policy's log-prob of each token
(differentiable), ``old_logp`` the log-prob under the policy that produced the batch (detached).
Every loss returns ``(scalar loss, metrics)`` where metrics are detached scalars reduced exactly
like the loss, so summing over micro-batches that share one global ``normalizer`` gives the
global-batch value.

Registries: :data:`POLICY_LOSSES` (``ppo``, ``gspo``), :data:`KL_ESTIMATORS` (``k1``, ``k2``,
``k3``, ``low_var_kl``); the reductions (``reduction=`` arguments) are in :mod:`miles.algo.reductions`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch
from torch import Tensor

from miles.algo.reductions import LOSS_REDUCTIONS, reduce_loss
from miles.algo.registry import Registry
from miles.algo.segments import expand_to_tokens, segment_masked_mean

Metrics = dict[str, Tensor]

# ---------------------------------------------------------------------------------------------
# KL estimators (Schulman, "Approximating KL Divergence", http://joschu.net/blog/kl-approx.html)
# ---------------------------------------------------------------------------------------------

KL_ESTIMATORS: Registry[Callable[[Tensor, Tensor], Tensor]] = Registry("KL estimator")


@KL_ESTIMATORS.register("k1")
def kl_k1(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """``k1 = logp - ref_logp``: unbiased for KL(pi || ref), high variance, can be negative."""
    return logp.float() - ref_logp.float()


@KL_ESTIMATORS.register("k2")
def kl_k2(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """``k2 = 0.5 * (logp - ref_logp)^2``: biased, low variance, >= 0."""
    return 0.5 * (logp.float() - ref_logp.float()) ** 2


@KL_ESTIMATORS.register("k3")
def kl_k3(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """``k3 = exp(ref - logp) - (ref - logp) - 1``: unbiased for KL(pi || ref), low variance, >= 0."""
    d = ref_logp.float() - logp.float()
    return torch.expm1(d) - d


@KL_ESTIMATORS.register("low_var_kl")
def kl_low_var(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """``k3`` clamped to ``[-10, 10]`` (verl's ``low_var_kl``), so one outlier token cannot dominate.

    The log-ratio is clamped to ``[-20, 20]`` first: ``expm1`` of a larger ratio overflows to inf,
    and the clamp's zero gradient times inf would be NaN.
    """
    d = (ref_logp.float() - logp.float()).clamp(-20.0, 20.0)
    return (torch.expm1(d) - d).clamp(-10.0, 10.0)


def kl_estimate(logp: Tensor, ref_logp: Tensor, kind: str = "k1") -> Tensor:
    """Per-token KL estimate ``[T]`` of kind ``k1 | k2 | k3 | low_var_kl`` (``--kl-loss-type``)."""
    return KL_ESTIMATORS.get(kind)(logp, ref_logp)


def kl_loss(
    logp: Tensor,
    ref_logp: Tensor,
    loss_mask: Tensor,
    cu_seqlens: Tensor,
    *,
    coef: float,
    kind: str = "k1",
    reduction: str = "token_mean",
    normalizer: float | Tensor | None = None,
) -> tuple[Tensor, Metrics]:
    """KL loss (``--use-kl-loss --kl-loss-coef --kl-loss-type``): ``coef * reduce(kl_estimate(logp, ref))``.

    Metrics: ``kl_loss`` (the reduced estimate, before ``coef``).
    """
    kl = reduce_loss(kl_estimate(logp, ref_logp.detach(), kind), loss_mask, cu_seqlens, reduction, normalizer)
    return coef * kl, {"kl_loss": kl.detach()}


# ---------------------------------------------------------------------------------------------
# Policy losses
# ---------------------------------------------------------------------------------------------


def clipped_surrogate(
    ratio: Tensor,
    advantages: Tensor,
    eps_clip: float,
    eps_clip_high: float | None = None,
    eps_clip_c: float | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-token PPO clipped surrogate loss (PPO arXiv 1707.06347; clip-higher DAPO arXiv 2503.14476;
    dual-clip arXiv 1912.09729).

    ``L = max(-r * A, -clip(r, 1 - eps_clip, 1 + eps_clip_high) * A)``; with ``eps_clip_c`` (> 1),
    for ``A < 0`` only: ``L = min(L, -eps_clip_c * A)``, which bounds the loss when ``r`` explodes.
    Returns ``(losses, clipped, dual_clipped)``, all ``[T]``; the last two are float indicators
    (clip active / dual-clip bound active).
    """
    if eps_clip_high is None:
        eps_clip_high = eps_clip
    adv = advantages.detach()
    loss_unclipped = -ratio * adv
    loss_clipped = -ratio.clamp(1.0 - eps_clip, 1.0 + eps_clip_high) * adv
    losses = torch.maximum(loss_unclipped, loss_clipped)
    clipped = (loss_clipped > loss_unclipped).float()
    dual_clipped = torch.zeros_like(clipped)
    if eps_clip_c is not None:
        if eps_clip_c <= 1.0:
            raise ValueError(f"dual-clip eps_clip_c must be > 1, got {eps_clip_c}")
        loss_dual = -eps_clip_c * adv
        negative = adv < 0
        dual_clipped = (negative & (loss_dual < losses)).float()
        losses = torch.where(negative, torch.minimum(losses, loss_dual), losses)
    return losses, clipped.detach(), dual_clipped.detach()


class PolicyLoss(Protocol):
    def __call__(
        self,
        logp: Tensor,
        old_logp: Tensor,
        advantages: Tensor,
        loss_mask: Tensor,
        cu_seqlens: Tensor,
        *,
        eps_clip: float = 0.2,
        eps_clip_high: float | None = None,
        eps_clip_c: float | None = None,
        weights: Tensor | None = None,
        reduction: str = "token_mean",
        normalizer: float | Tensor | None = None,
    ) -> tuple[Tensor, Metrics]: ...


POLICY_LOSSES: Registry[PolicyLoss] = Registry("policy loss")


def _finish_policy_loss(
    losses: Tensor,
    clipped: Tensor,
    dual_clipped: Tensor,
    logp: Tensor,
    old_logp: Tensor,
    loss_mask: Tensor,
    cu_seqlens: Tensor,
    eps_clip_c: float | None,
    weights: Tensor | None,
    reduction: str,
    normalizer: float | Tensor | None,
) -> tuple[Tensor, Metrics]:
    reduce = LOSS_REDUCTIONS.get(reduction)
    if weights is not None:
        # Correction weights (TIS/MIS) are constants: the gradient must not flow through them.
        losses = losses * weights.detach()
    loss = reduce(losses, loss_mask, cu_seqlens, normalizer)
    metrics = {
        "pg_loss": loss.detach(),
        "pg_clipfrac": reduce(clipped, loss_mask, cu_seqlens, normalizer),
        "ppo_kl": reduce((old_logp.float() - logp.float()).detach(), loss_mask, cu_seqlens, normalizer),
    }
    if eps_clip_c is not None:
        metrics["pg_clipfrac_c"] = reduce(dual_clipped, loss_mask, cu_seqlens, normalizer)
    return loss, metrics


@POLICY_LOSSES.register("ppo")
def ppo_policy_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    loss_mask: Tensor,
    cu_seqlens: Tensor,
    *,
    eps_clip: float = 0.2,
    eps_clip_high: float | None = None,
    eps_clip_c: float | None = None,
    weights: Tensor | None = None,
    reduction: str = "token_mean",
    normalizer: float | Tensor | None = None,
) -> tuple[Tensor, Metrics]:
    """PPO clipped policy loss with token-level ratio ``r_t = exp(logp_t - old_logp_t)``.

    ``loss = reduce(w_t * clipped_surrogate(r_t, A_t))`` (see :func:`clipped_surrogate`), where
    ``w_t`` are optional detached correction weights (TIS/MIS, :mod:`miles.algo.corrections`).
    Metrics: ``pg_loss``, ``pg_clipfrac`` (fraction of tokens where the clip is active),
    ``ppo_kl`` (``reduce(old_logp - logp)``) and, with dual-clip, ``pg_clipfrac_c``.
    """
    # Untrained positions get ratio exactly 1: their log-probs may be meaningless (prompt tokens).
    log_ratio = torch.where(loss_mask > 0, logp.float() - old_logp.detach().float(), 0.0)
    ratio = torch.exp(log_ratio)
    losses, clipped, dual = clipped_surrogate(ratio, advantages.float(), eps_clip, eps_clip_high, eps_clip_c)
    return _finish_policy_loss(
        losses,
        clipped,
        dual,
        logp,
        old_logp,
        loss_mask,
        cu_seqlens,
        eps_clip_c,
        weights,
        reduction,
        normalizer,
    )


def gspo_sequence_ratio(logp: Tensor, old_logp: Tensor, loss_mask: Tensor, cu_seqlens: Tensor) -> Tensor:
    """GSPO's per-token ratio ``s_{i,t} = sg[s_i] * exp(logp_t - sg[logp_t])``, ``[T]``.

    ``s_i = exp(mean_{t in y_i, mask=1}(logp_t - old_logp_t))`` is the length-normalised sequence
    ratio (GSPO, arXiv 2507.18071, eq. 7). The value of ``s_{i,t}`` is ``s_i`` on every token of
    sequence ``i``, while its gradient is ``s_i * grad(logp_t)`` (the paper's GSPO-token form,
    eq. 13-14), so averaging over the sequence's tokens gives the GSPO gradient.
    """
    logp32, old32 = logp.float(), old_logp.detach().float()
    seq_log_ratio = segment_masked_mean((logp32 - old32).detach(), loss_mask, cu_seqlens)
    # Gate on the mask so untrained positions carry ratio 1 and no gradient (as in ppo).
    token_term = torch.where(loss_mask > 0, logp32 - logp32.detach(), 0.0)
    return expand_to_tokens(seq_log_ratio, cu_seqlens).exp() * torch.exp(token_term)


@POLICY_LOSSES.register("gspo")
def gspo_policy_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    loss_mask: Tensor,
    cu_seqlens: Tensor,
    *,
    eps_clip: float = 3e-4,
    eps_clip_high: float | None = 4e-4,
    eps_clip_c: float | None = None,
    weights: Tensor | None = None,
    reduction: str = "token_mean",
    normalizer: float | Tensor | None = None,
) -> tuple[Tensor, Metrics]:
    """GSPO sequence-level clipped loss (Zheng et al., arXiv 2507.18071).

    ``loss = reduce(w_t * clipped_surrogate(s_{i,t}, A_t))`` with ``s_{i,t}`` from
    :func:`gspo_sequence_ratio`: the clip decision is made per sequence on the length-normalised
    ratio. The paper's clip range is tiny (``eps_clip=3e-4``, ``eps_clip_high=4e-4``, the
    defaults here). Metrics as :func:`ppo_policy_loss`; ``ppo_kl`` is the token-level
    ``reduce(old_logp - logp)``.
    """
    ratio = gspo_sequence_ratio(logp, old_logp, loss_mask, cu_seqlens)
    losses, clipped, dual = clipped_surrogate(ratio, advantages.float(), eps_clip, eps_clip_high, eps_clip_c)
    return _finish_policy_loss(
        losses,
        clipped,
        dual,
        logp,
        old_logp,
        loss_mask,
        cu_seqlens,
        eps_clip_c,
        weights,
        reduction,
        normalizer,
    )


# Which policy loss an ``--advantage-estimator`` implies; anything else trains with ``ppo``.
_POLICY_LOSS_FOR_ESTIMATOR = {"gspo": "gspo"}


def policy_loss_for_estimator(advantage_estimator: str) -> str:
    """Name of the policy loss that goes with ``--advantage-estimator`` (``gspo`` -> ``gspo``, else ``ppo``)."""
    return _POLICY_LOSS_FOR_ESTIMATOR.get(advantage_estimator, "ppo")


# ---------------------------------------------------------------------------------------------
# Entropy, value and SFT losses
# ---------------------------------------------------------------------------------------------


def entropy_loss(
    entropy: Tensor,
    loss_mask: Tensor,
    cu_seqlens: Tensor,
    *,
    coef: float,
    reduction: str = "token_mean",
    normalizer: float | Tensor | None = None,
) -> tuple[Tensor, Metrics]:
    """Entropy bonus (``--entropy-coef``): ``loss = -coef * reduce(H_t)``; minimising it raises entropy.

    ``entropy`` is the per-token entropy of the policy ``[T]`` (:func:`miles.algo.logprobs.entropy_from_logits`).
    Metrics: ``entropy`` (the reduced entropy).
    """
    h = reduce_loss(entropy.float(), loss_mask, cu_seqlens, reduction, normalizer)
    return -coef * h, {"entropy": h.detach()}


def value_loss(
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    loss_mask: Tensor,
    cu_seqlens: Tensor,
    *,
    value_clip: float | None = 0.2,
    reduction: str = "token_mean",
    normalizer: float | Tensor | None = None,
) -> tuple[Tensor, Metrics]:
    """PPO critic loss with value clipping (``--value-clip``; PPO arXiv 1707.06347, as in OpenRLHF/slime).

    ``v_clip = old_v + clamp(v - old_v, -c, c)``;
    ``loss = reduce(0.5 * max((v - R)^2, (v_clip - R)^2))``. ``value_clip=None`` disables the clip.
    Metrics: ``value_loss`` and ``value_clipfrac`` (fraction of tokens where the clipped term wins).
    """
    v, old_v, ret = values.float(), old_values.detach().float(), returns.detach().float()
    unclipped = (v - ret) ** 2
    if value_clip is None:
        per_token, clipped = unclipped, torch.zeros_like(unclipped)
    else:
        v_clip = old_v + (v - old_v).clamp(-value_clip, value_clip)
        clipped_sq = (v_clip - ret) ** 2
        per_token = torch.maximum(unclipped, clipped_sq)
        clipped = (clipped_sq > unclipped).float().detach()
    loss = 0.5 * reduce_loss(per_token, loss_mask, cu_seqlens, reduction, normalizer)
    clipfrac = reduce_loss(clipped, loss_mask, cu_seqlens, reduction, normalizer)
    return loss, {"value_loss": loss.detach(), "value_clipfrac": clipfrac}


def sft_loss(
    logp: Tensor,
    loss_mask: Tensor,
    cu_seqlens: Tensor,
    *,
    reduction: str = "token_mean",
    normalizer: float | Tensor | None = None,
) -> tuple[Tensor, Metrics]:
    """Supervised fine-tuning loss (``--loss-type sft_loss``): ``reduce(-logp_t)`` over trained tokens.

    Metrics: ``sft_loss``.
    """
    loss = reduce_loss(-logp.float(), loss_mask, cu_seqlens, reduction, normalizer)
    return loss, {"sft_loss": loss.detach()}
