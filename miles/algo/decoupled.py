"""Decoupled PPO (Hilton et al. 2022; AReaL's loss for asynchronous RL): three policies, not two.

- the **behaviour** policy ``pi_behav`` generated the tokens: the engine's per-token log-probs,
  possibly of several weight versions within one batch (stale and partial rollouts);
- the **proximal** policy ``pi_prox`` anchors the trust region: the trainer's recomputation of
  the log-probs with the weights the step starts from (the PPO "old" policy);
- the policy ``pi_theta`` being optimised.

The loss is the clipped surrogate around the proximal policy, importance-weighted against the
behaviour policy::

    L = reduce( w_t * clipped_surrogate(exp(logp_t - prox_t), A_t) ),
    w_t = correction(exp(prox_t - behav_t))      # TIS: clamp; MIS: clamp and reject

so the trust region does not shrink with staleness (it is measured from ``pi_prox``), while the
off-policy gradient is corrected by ``w``. The weights reuse the TIS/MIS corrections
(:mod:`miles.algo.corrections`), which are the identity when ``prox == behav`` bit for bit: on
on-policy data the loss equals the standard PPO loss exactly. docs/algorithms.md §9 has the math.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from miles.algo.corrections import CorrectionParams, apply_correction
from miles.algo.losses import POLICY_LOSSES, Metrics


def decoupled_ppo_loss(
    logp: Tensor,
    prox_logp: Tensor,
    behav_logp: Tensor,
    advantages: Tensor,
    loss_mask: Tensor,
    cu_seqlens: Tensor,
    *,
    correction: str = "tis",
    correction_params: CorrectionParams | None = None,
    policy_loss: str = "ppo",
    **loss_kwargs: Any,
) -> tuple[Tensor, Metrics]:
    """Decoupled PPO on packed ``[T]`` tensors: ``logp`` (differentiable), ``prox_logp`` and
    ``behav_logp`` (detached), ``advantages``, ``loss_mask``; ``cu_seqlens`` ``[B + 1]``.

    ``correction`` (``tis`` | ``mis`` | ``none``) turns ``exp(prox - behav)`` into the weights
    and the mask; ``policy_loss`` (``ppo`` | ``gspo``) is the surrogate around ``prox_logp``;
    ``loss_kwargs`` go to it (``eps_clip``, ``reduction``, ``normalizer``...). Returns the loss
    and the metrics of both (the correction's ``tis_*``/``mis_*`` and mismatch diagnostics).
    """
    corr = apply_correction(correction, prox_logp, behav_logp, loss_mask, cu_seqlens, correction_params)
    loss, metrics = POLICY_LOSSES.get(policy_loss)(
        logp, prox_logp, advantages, corr.loss_mask, cu_seqlens, weights=corr.weights, **loss_kwargs
    )
    return loss, {**metrics, **corr.metrics}


__all__ = ["decoupled_ppo_loss"]
