"""PPO in the embedded loop (``--advantage-estimator ppo``): the critic, its values and its metrics.

One rollout step with a critic, as slime's ``train.py`` (``critic_model.async_train`` then
``actor_model.async_train`` with the critic's values):

    values = critic.compute_values(batch)       # V(s_t) from the critic before it sees this batch
    batch  = gae(batch, values)                 # r_t: the reward on the last response token,
                                                #      minus kl_coef * KL(old || ref) on every token
    for minibatch in split(batch):
        trainer.train_step(minibatch)           # value loss (--value-clip) on the critic, then the
                                                # PPO loss on the policy -- the critic only, during
                                                # the first --num-critic-only-steps rollout steps
    engine.update_weights(...)                  # pushed every step, as slime (unchanged while the
                                                # policy is frozen)

The trainer holds the critic (``Trainer(critic=...)``), so checkpoints (model, optimizer and LR
schedule) and offload cover it too. The critic starts from ``--critic-load`` (a Hugging Face model,
usually the policy's own checkpoint) with a zero-initialised value head.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from miles.algo import reduce_loss
from miles.config import MilesConfig
from miles.models.loading import load_model
from miles.train.checkpoint import TRACKER
from miles.train.critic import Critic, CriticConfig, ValueModel
from miles.train.parallelize import apply_activation_checkpointing
from miles.types import TrainBatch

# The trainer's critic metrics under slime's names (slime logs the critic's train step as
# ``train/critic-<key>``: ``train/critic-value_loss``, ``train/critic-value_clipfrac``, ...).
CRITIC_METRIC_NAMES = {
    "train/value_loss": "train/critic-value_loss",
    "train/value_clipfrac": "train/critic-value_clipfrac",
    "train/critic_grad_norm": "train/critic-grad_norm",
    "train/critic_lr": "train/critic-lr",
}


def uses_critic(config: MilesConfig) -> bool:
    return config.algo.advantage_estimator == "ppo"


def critic_config(config: MilesConfig) -> CriticConfig:
    """The critic's optimizer and loss: ``--critic-lr`` (default ``--lr``), ``--critic-lr-warmup-iters``,
    ``--value-clip``; everything else (schedule, AdamW, clipping, micro-batching, loss reduction,
    ``--optimizer-cpu-offload``) as the policy's."""
    t, a = config.train, config.algo
    lr = t.critic_lr if t.critic_lr is not None else t.lr
    return CriticConfig(
        lr=lr,
        min_lr=min(t.min_lr, lr),
        lr_warmup_steps=t.critic_lr_warmup_iters,
        lr_decay_style=t.lr_decay_style,
        lr_decay_steps=t.lr_decay_iters,
        weight_decay=t.weight_decay,
        adam_beta1=t.adam_beta1,
        adam_beta2=t.adam_beta2,
        adam_eps=t.adam_eps,
        clip_grad=t.clip_grad,
        value_clip=a.value_clip,
        reduction="token_mean" if t.calculate_per_token_loss else "seq_mean",
        micro_batch_size=t.micro_batch_size,
        max_tokens_per_gpu=t.max_tokens_per_gpu if t.use_dynamic_batch_size else None,
        optimizer_cpu_offload=t.optimizer_cpu_offload,
    )


def build_critic(config: MilesConfig, device: torch.device) -> Critic:
    """A value model on the backbone of ``--critic-load`` (fp32 master weights), with its optimizer."""
    path = config.model.critic_load
    assert path is not None  # required with --advantage-estimator ppo (config validation)
    if (Path(path) / TRACKER).is_file() or (Path(path) / "meta.json").is_file():
        raise ValueError(
            f"--critic-load {path} is a Miles training checkpoint; it takes a Hugging Face model (the "
            "critic's initial weights). To resume a PPO run, pass --load: the critic is saved with the policy"
        )
    backbone = load_model(path, dtype="float32", device=device)
    if config.train.gradient_checkpointing:
        apply_activation_checkpointing(backbone)
    return Critic(ValueModel(backbone), critic_config(config), device)


def value_metrics(batch: TrainBatch, values: Tensor) -> dict[str, float]:
    """``rollout/values``, ``rollout/returns``, ``rollout/advantages``: means over sequences of each
    sequence's mean over its trained tokens (slime's ``log_rollout_data``)."""
    mask, cu = batch.loss_mask, batch.cu_seqlens
    out = {"rollout/values": values.to(mask.device), "rollout/advantages": batch.advantages}
    if batch.returns is not None:
        out["rollout/returns"] = batch.returns
    return {k: float(reduce_loss(v.float(), mask, cu, "seq_mean")) for k, v in out.items()}


def rename_critic_metrics(metrics: dict[str, float]) -> dict[str, float]:
    return {CRITIC_METRIC_NAMES.get(k, k): v for k, v in metrics.items()}


__all__ = [
    "CRITIC_METRIC_NAMES",
    "build_critic",
    "critic_config",
    "rename_critic_metrics",
    "uses_critic",
    "value_metrics",
]
