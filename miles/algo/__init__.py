"""RL algorithms as pure tensor functions, selected by name from registries (DESIGN.md §9).

Registries: ``ADVANTAGE_ESTIMATORS`` (--advantage-estimator), ``POLICY_LOSSES``,
``LOSS_REDUCTIONS``, ``KL_ESTIMATORS`` (--kl-loss-type), ``CORRECTIONS`` (TIS/MIS); decoupled PPO
(asynchronous RL) composes a policy loss with a correction (:func:`decoupled_ppo_loss`).
See docs/algorithms.md for formulas and flag mapping.
"""

from miles.algo.advantages import (
    ADVANTAGE_ESTIMATORS,
    AdvantageOutput,
    AdvantageParams,
    apply_kl_penalty,
    compute_advantages,
    normalize_advantages,
    token_level_rewards,
    with_advantages,
)
from miles.algo.corrections import (
    CORRECTIONS,
    CorrectionOutput,
    CorrectionParams,
    apply_correction,
    mismatch_metrics,
)
from miles.algo.decoupled import decoupled_ppo_loss
from miles.algo.logprobs import (
    entropy_from_logits,
    logprobs_and_entropy_from_hidden,
    logprobs_from_hidden,
    logprobs_from_logits,
)
from miles.algo.losses import (
    KL_ESTIMATORS,
    POLICY_LOSSES,
    entropy_loss,
    kl_estimate,
    kl_loss,
    policy_loss_for_estimator,
    sft_loss,
    value_loss,
)
from miles.algo.reductions import LOSS_REDUCTIONS, loss_normalizer, reduce_loss
from miles.algo.registry import Registry, UnknownNameError

__all__ = [
    "ADVANTAGE_ESTIMATORS",
    "CORRECTIONS",
    "KL_ESTIMATORS",
    "LOSS_REDUCTIONS",
    "POLICY_LOSSES",
    "AdvantageOutput",
    "AdvantageParams",
    "CorrectionOutput",
    "CorrectionParams",
    "Registry",
    "UnknownNameError",
    "apply_correction",
    "apply_kl_penalty",
    "compute_advantages",
    "decoupled_ppo_loss",
    "entropy_from_logits",
    "entropy_loss",
    "kl_estimate",
    "kl_loss",
    "logprobs_and_entropy_from_hidden",
    "logprobs_from_hidden",
    "logprobs_from_logits",
    "loss_normalizer",
    "mismatch_metrics",
    "normalize_advantages",
    "policy_loss_for_estimator",
    "reduce_loss",
    "sft_loss",
    "token_level_rewards",
    "value_loss",
    "with_advantages",
]
