"""Advantage estimators, chosen by name from :data:`ADVANTAGE_ESTIMATORS` (``--advantage-estimator``).

Every estimator has the signature of :class:`AdvantageEstimator`::

    est(rewards [B], cu_seqlens [B+1], loss_mask [T], params, *, kl=None, values=None, token_rewards=None)
        -> AdvantageOutput(advantages [T], returns [T])

``rewards`` holds one scalar per sequence, grouped by prompt: ``B = num_groups * group_size`` and
the ``group_size`` samples of one prompt are contiguous. Token tensors are packed (see
:mod:`miles.algo.segments`). Outputs are float32, detached, and 0 wherever ``loss_mask`` is 0.

``kl`` (optional, ``[T]``) is the per-token KL between the rollout policy and the reference model
(see :func:`miles.algo.losses.kl_estimate`); with ``params.kl_coef > 0`` it becomes a reward
penalty (``--kl-coef``): ``-kl_coef * kl_t`` is added to every trained token's reward.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import NamedTuple, Protocol

import torch
from torch import Tensor

from miles.algo.registry import Registry
from miles.algo.segments import (
    check_cu_seqlens,
    expand_to_tokens,
    last_masked_index,
    segment_discounted_cumsum,
)
from miles.types import TrainBatch


@dataclass(frozen=True)
class AdvantageParams:
    """Hyper-parameters shared by all estimators; each reads only the ones it needs.

    - ``group_size``: samples per prompt (``--n-samples-per-prompt``).
    - ``std_normalization``: GRPO divides by the group std (``--disable-grpo-std-normalization`` clears it).
    - ``eps``: added to the group std (GRPO).
    - ``kl_coef``: KL reward penalty coefficient (``--kl-coef``).
    - ``gamma``, ``lambd``: discount and GAE lambda (``--gamma``, ``--lambd``).
    - ``normalize``: whiten the advantages over the batch afterwards (``--normalize-advantages``;
      applied by :func:`compute_advantages`, REINFORCE++ estimators always whiten).
    """

    group_size: int = 1
    std_normalization: bool = True
    eps: float = 1e-6
    kl_coef: float = 0.0
    gamma: float = 1.0
    lambd: float = 1.0
    normalize: bool = False

    def __post_init__(self) -> None:
        if self.group_size < 1:
            raise ValueError(f"group_size must be >= 1, got {self.group_size}")
        if not 0.0 <= self.gamma <= 1.0 or not 0.0 <= self.lambd <= 1.0:
            raise ValueError(f"gamma and lambd must be in [0, 1], got {self.gamma}, {self.lambd}")


class AdvantageOutput(NamedTuple):
    """Per-token ``advantages`` and ``returns`` (the critic's target for PPO), float32 ``[T]``."""

    advantages: Tensor
    returns: Tensor


class AdvantageEstimator(Protocol):
    def __call__(
        self,
        rewards: Tensor,
        cu_seqlens: Tensor,
        loss_mask: Tensor,
        params: AdvantageParams,
        *,
        kl: Tensor | None = None,
        values: Tensor | None = None,
        token_rewards: Tensor | None = None,
    ) -> AdvantageOutput: ...


ADVANTAGE_ESTIMATORS: Registry[AdvantageEstimator] = Registry("advantage estimator")


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


def _check(rewards: Tensor, cu_seqlens: Tensor, loss_mask: Tensor, group_size: int) -> None:
    check_cu_seqlens(cu_seqlens, loss_mask.numel())
    num_seqs = cu_seqlens.numel() - 1
    if rewards.dim() != 1 or rewards.numel() != num_seqs:
        raise ValueError(f"rewards must have shape [B]=[{num_seqs}], got {tuple(rewards.shape)}")
    if num_seqs % group_size != 0:
        raise ValueError(f"{num_seqs} sequences do not split into groups of {group_size}")


def _group_view(rewards: Tensor, group_size: int) -> Tensor:
    return rewards.detach().float().view(-1, group_size)


def _broadcast(
    per_seq: Tensor, cu_seqlens: Tensor, loss_mask: Tensor, kl: Tensor | None, kl_coef: float
) -> Tensor:
    """Per-sequence advantage on each of its trained tokens, minus the KL penalty ``kl_coef * kl_t``."""
    mask = loss_mask.float()
    adv = expand_to_tokens(per_seq.float().to(mask.device), cu_seqlens) * mask
    return apply_kl_penalty(adv, kl, kl_coef, loss_mask)


def apply_kl_penalty(token_rewards: Tensor, kl: Tensor | None, kl_coef: float, loss_mask: Tensor) -> Tensor:
    """KL reward penalty (``--kl-coef``): ``r_t - kl_coef * kl_t`` on trained tokens; ``[T] -> [T]``.

    ``kl`` is the per-token KL estimate between the sampling policy and the reference model
    (InstructGPT, arXiv 2203.02155, eq. 2). Returns ``token_rewards`` unchanged if ``kl`` is None
    or ``kl_coef == 0``.
    """
    if kl is None or kl_coef == 0.0:
        return token_rewards
    if kl.shape != token_rewards.shape:
        raise ValueError(f"kl has shape {tuple(kl.shape)}, expected {tuple(token_rewards.shape)}")
    return token_rewards - kl_coef * kl.detach().float() * loss_mask.float()


def token_level_rewards(
    rewards: Tensor, cu_seqlens: Tensor, loss_mask: Tensor, kl: Tensor | None = None, kl_coef: float = 0.0
) -> Tensor:
    """Sparse per-token rewards, float32 ``[T]``: sequence ``i``'s scalar reward on its last trained
    token, ``-kl_coef * kl_t`` on every trained token (as in OpenRLHF / slime). A sequence with no
    trained token contributes nothing."""
    mask = loss_mask.float()
    out = torch.zeros_like(mask)
    last = last_masked_index(loss_mask, cu_seqlens)
    keep = last >= 0
    out[last[keep]] = rewards.detach().float().to(out.device)[keep]
    return apply_kl_penalty(out, kl, kl_coef, loss_mask)


def normalize_advantages(
    advantages: Tensor, loss_mask: Tensor, eps: float = 1e-8, unbiased: bool = True
) -> Tensor:
    """Masked whitening over the whole batch: ``(A - mean) / sqrt(var + eps)`` over tokens with mask 1.

    ``var`` uses Bessel's correction when ``unbiased`` (as verl's ``masked_whiten`` and slime's
    ``distributed_masked_whiten``). Tokens outside the mask are set to 0. ``[T] -> [T]``.
    """
    mask = loss_mask.float()
    adv = advantages.detach().float()
    count = mask.sum()
    if count < 1:
        return torch.zeros_like(adv)
    mean = (adv * mask).sum() / count
    var = (((adv - mean) * mask) ** 2).sum() / count
    if unbiased and count > 1:
        var = var * count / (count - 1)
    return (adv - mean) * torch.rsqrt(var + eps) * mask


def _outcome(adv: Tensor) -> AdvantageOutput:
    # Outcome-reward estimators have no critic: the "returns" are the advantages themselves.
    return AdvantageOutput(adv, adv)


# ---------------------------------------------------------------------------------------------
# Estimators
# ---------------------------------------------------------------------------------------------


@ADVANTAGE_ESTIMATORS.register("grpo", "gspo")
def grpo(
    rewards: Tensor,
    cu_seqlens: Tensor,
    loss_mask: Tensor,
    params: AdvantageParams,
    *,
    kl: Tensor | None = None,
    values: Tensor | None = None,
    token_rewards: Tensor | None = None,
) -> AdvantageOutput:
    """GRPO group-relative advantage (DeepSeekMath, arXiv 2402.03300, §4.1.2).

    ``A_i = (r_i - mean_g(r)) / (std_g(r) + eps)`` over the ``group_size`` samples of ``i``'s
    group (``std`` with Bessel's correction, as slime and verl), broadcast to the sequence's
    trained tokens. With ``params.std_normalization=False`` it is Dr.GRPO's ``r_i - mean_g(r)``.
    GSPO (arXiv 2507.18071) uses the same advantages, hence the alias ``gspo``.
    A group of one sample has advantage 0.
    """
    _check(rewards, cu_seqlens, loss_mask, params.group_size)
    groups = _group_view(rewards, params.group_size)
    centred = groups - groups.mean(dim=1, keepdim=True)
    if params.std_normalization and params.group_size > 1:
        centred = centred / (groups.std(dim=1, keepdim=True) + params.eps)
    return _outcome(_broadcast(centred.flatten(), cu_seqlens, loss_mask, kl, params.kl_coef))


@ADVANTAGE_ESTIMATORS.register("dr_grpo")
def dr_grpo(
    rewards: Tensor,
    cu_seqlens: Tensor,
    loss_mask: Tensor,
    params: AdvantageParams,
    *,
    kl: Tensor | None = None,
    values: Tensor | None = None,
    token_rewards: Tensor | None = None,
) -> AdvantageOutput:
    """Dr.GRPO advantage (Liu et al., "Understanding R1-Zero-Like Training", arXiv 2503.20783).

    ``A_i = r_i - mean_g(r)``: no division by the group std (it biases toward easy and hard
    prompts). Pair it with the ``seq_mean_token_sum`` loss reduction to remove the length bias too.
    """
    _check(rewards, cu_seqlens, loss_mask, params.group_size)
    groups = _group_view(rewards, params.group_size)
    centred = groups - groups.mean(dim=1, keepdim=True)
    return _outcome(_broadcast(centred.flatten(), cu_seqlens, loss_mask, kl, params.kl_coef))


@ADVANTAGE_ESTIMATORS.register("rloo")
def rloo(
    rewards: Tensor,
    cu_seqlens: Tensor,
    loss_mask: Tensor,
    params: AdvantageParams,
    *,
    kl: Tensor | None = None,
    values: Tensor | None = None,
    token_rewards: Tensor | None = None,
) -> AdvantageOutput:
    """RLOO leave-one-out baseline (Ahmadian et al., arXiv 2402.14740, eq. 7).

    ``A_i = r_i - 1/(n-1) * sum_{j != i} r_j = n/(n-1) * (r_i - mean_g(r))``; needs ``n >= 2``.
    """
    _check(rewards, cu_seqlens, loss_mask, params.group_size)
    n = params.group_size
    if n < 2:
        raise ValueError("rloo needs group_size >= 2 (the baseline is the mean of the other samples)")
    groups = _group_view(rewards, n)
    others_mean = (groups.sum(dim=1, keepdim=True) - groups) / (n - 1)
    return _outcome(_broadcast((groups - others_mean).flatten(), cu_seqlens, loss_mask, kl, params.kl_coef))


@ADVANTAGE_ESTIMATORS.register("reinforce_plus_plus")
def reinforce_plus_plus(
    rewards: Tensor,
    cu_seqlens: Tensor,
    loss_mask: Tensor,
    params: AdvantageParams,
    *,
    kl: Tensor | None = None,
    values: Tensor | None = None,
    token_rewards: Tensor | None = None,
) -> AdvantageOutput:
    """REINFORCE++ (Hu, arXiv 2501.03262; as in OpenRLHF and slime).

    Token rewards ``r_t = -kl_coef * kl_t`` plus the scalar reward on the sequence's last trained
    token; discounted return ``G_t = r_t + gamma * G_{t+1}`` inside each sequence; advantages are
    ``G`` whitened over all trained tokens of the batch (:func:`normalize_advantages`).
    ``returns`` are the un-whitened ``G``. ``token_rewards`` (``[T]``), if given, replaces the
    built token rewards.
    """
    _check(rewards, cu_seqlens, loss_mask, params.group_size)
    if token_rewards is None:
        token_rewards = token_level_rewards(rewards, cu_seqlens, loss_mask, kl, params.kl_coef)
    mask = loss_mask.float()
    returns = segment_discounted_cumsum(token_rewards.detach().float(), cu_seqlens, params.gamma) * mask
    return AdvantageOutput(normalize_advantages(returns, loss_mask), returns)


@ADVANTAGE_ESTIMATORS.register("reinforce_plus_plus_baseline")
def reinforce_plus_plus_baseline(
    rewards: Tensor,
    cu_seqlens: Tensor,
    loss_mask: Tensor,
    params: AdvantageParams,
    *,
    kl: Tensor | None = None,
    values: Tensor | None = None,
    token_rewards: Tensor | None = None,
) -> AdvantageOutput:
    """REINFORCE++-baseline (arXiv 2501.03262 v2+; slime's ``get_reinforce_plus_plus_baseline_advantages``).

    ``A_{i,t} = (r_i - mean_g(r)) - kl_coef * kl_t``, then whitened over all trained tokens of
    the batch. ``returns`` are the un-whitened values.
    """
    _check(rewards, cu_seqlens, loss_mask, params.group_size)
    groups = _group_view(rewards, params.group_size)
    centred = (groups - groups.mean(dim=1, keepdim=True)).flatten()
    raw = _broadcast(centred, cu_seqlens, loss_mask, kl, params.kl_coef)
    return AdvantageOutput(normalize_advantages(raw, loss_mask), raw)


@ADVANTAGE_ESTIMATORS.register("gae", "ppo")
def gae(
    rewards: Tensor,
    cu_seqlens: Tensor,
    loss_mask: Tensor,
    params: AdvantageParams,
    *,
    kl: Tensor | None = None,
    values: Tensor | None = None,
    token_rewards: Tensor | None = None,
) -> AdvantageOutput:
    """Generalised advantage estimation for PPO (Schulman et al., arXiv 1506.02438; PPO arXiv 1707.06347).

    ``delta_t = r_t + gamma * V_{t+1} - V_t`` and ``A_t = delta_t + gamma * lambd * A_{t+1}``
    inside each sequence (``V`` past the end is 0); ``returns_t = A_t + V_t``. ``values`` (``[T]``,
    the critic's, required) are zeroed outside the loss mask so non-trained tokens (prompt, tool
    output) carry no value. ``r_t`` is ``token_rewards`` if given, else :func:`token_level_rewards`
    (scalar reward on the last trained token, KL penalty per token). Registered as ``ppo`` too,
    since slime's ``--advantage-estimator ppo`` means GAE with a critic.
    """
    _check(rewards, cu_seqlens, loss_mask, params.group_size)
    if values is None:
        raise ValueError("gae needs per-token critic values (values=[T])")
    if values.shape != loss_mask.shape:
        raise ValueError(f"values has shape {tuple(values.shape)}, expected {tuple(loss_mask.shape)}")
    if token_rewards is None:
        token_rewards = token_level_rewards(rewards, cu_seqlens, loss_mask, kl, params.kl_coef)
    mask = loss_mask.float()
    v = values.detach().float() * mask
    r = token_rewards.detach().float()
    # V_{t+1} within the sequence: shift left by one, and zero at each sequence's last token.
    next_v = torch.cat([v[1:], v.new_zeros(1)])
    ends = cu_seqlens[1:].to(v.device).long() - 1
    next_v[ends[ends >= 0]] = 0.0
    deltas = r + params.gamma * next_v - v
    adv = segment_discounted_cumsum(deltas, cu_seqlens, params.gamma * params.lambd) * mask
    return AdvantageOutput(adv, (adv + v) * mask)


def compute_advantages(
    estimator: str,
    rewards: Tensor,
    cu_seqlens: Tensor,
    loss_mask: Tensor,
    params: AdvantageParams,
    *,
    kl: Tensor | None = None,
    values: Tensor | None = None,
    token_rewards: Tensor | None = None,
) -> AdvantageOutput:
    """Run the estimator registered as ``estimator``, then whiten if ``params.normalize``."""
    out = ADVANTAGE_ESTIMATORS.get(estimator)(
        rewards, cu_seqlens, loss_mask, params, kl=kl, values=values, token_rewards=token_rewards
    )
    if params.normalize:
        return AdvantageOutput(normalize_advantages(out.advantages, loss_mask), out.returns)
    return out


def with_advantages(
    batch: TrainBatch,
    estimator: str,
    params: AdvantageParams,
    *,
    kl: Tensor | None = None,
    values: Tensor | None = None,
) -> TrainBatch:
    """``batch`` with ``advantages`` and ``returns`` from the estimator registered as ``estimator``
    (its ``rewards``, one per sequence, grouped by prompt).

    ``kl`` (per-token KL to the reference, ``[T]``) feeds the ``--kl-coef`` reward penalty;
    ``values`` (``[T]``) the GAE estimator of PPO.
    """
    out = compute_advantages(
        estimator, batch.rewards, batch.cu_seqlens, batch.loss_mask, params, kl=kl, values=values
    )
    return replace(batch, advantages=out.advantages.float(), returns=out.returns.float())
