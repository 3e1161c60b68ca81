"""The PPO critic: a value head on a copy of the policy backbone, with its own optimizer.

One rollout step with a critic (``--advantage-estimator ppo``), as slime's ``train.py``
(:func:`miles.train.rl_step.train_rl_step` runs it)::

    values = critic.compute_values(batch)       # V(s_t) from the critic before it sees this batch
    batch  = gae(batch, values)                 # r_t: the reward on the last response token,
                                                #      minus kl_coef * KL(old || ref) on every token
    for minibatch in split(batch):
        trainer.train_step(minibatch)           # value loss (--value-clip) on the critic, then the
                                                # PPO loss on the policy -- the critic only, during
                                                # the first --num-critic-only-steps rollout steps

The trainer holds the critic (``Trainer(critic=...)``), so checkpoints (model, optimizer and LR
schedule) and offload cover it too. The critic starts from ``--critic-load`` (a Hugging Face model,
usually the policy's own checkpoint) with a zero-initialised value head (:func:`build_critic`).
Its settings are the policy's (``TrainConfig``: AdamW, clipping, micro-batching, loss reduction,
``--optimizer-cpu-offload``) but for ``--critic-lr`` and ``--critic-lr-warmup-iters``
(:func:`~miles.train.optim.critic_lr_schedule`) and ``--value-clip``.

Token alignment follows the policy's log-probs: entry ``t`` is the value of the state *before*
token ``t`` (the hidden state of row ``t - 1``), i.e. the value of the state in which token
``t`` was chosen; it is 0 at each sequence's first token. The loss is
:func:`miles.algo.value_loss` (``--value-clip``) against ``batch.returns``, reduced over the
global batch exactly as the policy loss is (one all-reduced normaliser, any micro-batching).

Data parallelism: several ranks without FSDP (gradients all-reduced here). FSDP sharding of the
critic is not provided (``parallelize`` shards a ``CausalLM``, and the value head would need to
join the root unit).
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor, nn

from miles.algo import loss_normalizer, value_loss
from miles.config import AlgoConfig, TrainConfig
from miles.models import CausalLM, VarlenContext
from miles.models.loading import load_model
from miles.train.checkpoint import TRACKER
from miles.train.optim import build_training_optimizer, critic_lr_schedule
from miles.train.packing import batch_to, select_sequences, select_tokens
from miles.train.parallelize import apply_activation_checkpointing
from miles.train.steps import aligned_bins, clipped_step, first_token_mask
from miles.types import TrainBatch


class ValueModel(nn.Module):
    """``backbone`` (a ``CausalLM`` whose LM head is dropped) + ``value_head`` ``Linear(hidden, 1)``."""

    def __init__(self, backbone: CausalLM) -> None:
        super().__init__()
        if hasattr(backbone, "lm_head"):
            del backbone.lm_head  # never used: values come from the hidden states
        self.backbone = backbone
        hidden = backbone.spec.hidden_size
        param = next(backbone.parameters())
        self.value_head = nn.Linear(hidden, 1, device=param.device, dtype=param.dtype)
        # Zero init: the critic starts from V = 0 everywhere instead of noise.
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)

    @classmethod
    def from_policy(cls, policy: CausalLM) -> ValueModel:
        """A value model on a deep copy of ``policy``'s backbone (call before sharding the policy)."""
        return cls(copy.deepcopy(policy))

    def forward(self, mb: TrainBatch) -> Tensor:
        """Float32 values ``[T]`` of a packed batch (aligned as the module docstring says)."""
        hidden = self.backbone(mb.input_ids, mb.positions, VarlenContext(mb.cu_seqlens))
        v = self.value_head(hidden).squeeze(-1).float()
        shifted = torch.cat([v.new_zeros(1), v[:-1]])  # row t - 1 values the state before token t
        return torch.where(first_token_mask(mb.cu_seqlens, v.shape[0], v.device), 0.0, shifted)


class Critic:
    """Trains a :class:`ValueModel` on ``batch.returns`` with its own AdamW and LR schedule
    (module docstring: the settings it takes from ``train`` and ``algo``)."""

    def __init__(
        self,
        model: ValueModel,
        train: TrainConfig,
        algo: AlgoConfig,
        device: torch.device | str = "cpu",
        *,
        process_group: dist.ProcessGroup | None = None,
    ) -> None:
        self.model, self.train_config, self.device = model, train, torch.device(device)
        self.value_clip = algo.value_clip
        self.group = process_group
        self.dp_size = dist.get_world_size(process_group) if dist.is_initialized() else 1
        self.optimizer, self.scheduler = build_training_optimizer(
            model, train, critic_lr_schedule(train), self.device
        )

    def _bins(self, batch: TrainBatch) -> list[list[int]]:
        return aligned_bins(
            batch,
            micro_batch_size=self.train_config.micro_batch_size,
            max_tokens=self.train_config.micro_batch_max_tokens,
            dp_size=self.dp_size,
            group=self.group,
            device=self.device,
        )

    @torch.no_grad()
    def compute_values(self, batch: TrainBatch) -> Tensor:
        """Float32 values ``[T]`` of this rank's batch (for GAE and the value clip)."""
        batch = batch_to(batch, self.device)
        values = torch.zeros(batch.num_tokens, dtype=torch.float32, device=self.device)
        token_ids = torch.arange(batch.num_tokens, device=self.device)
        for bin_ in self._bins(batch):
            v = self.model(select_sequences(batch, bin_ or [0]))
            if bin_:
                values[select_tokens(token_ids, batch.cu_seqlens, bin_)] = v
        return values

    def train_step(self, batch: TrainBatch, old_values: Tensor | None = None) -> dict[str, float]:
        """One critic update toward ``batch.returns``; ``old_values`` (default: the current
        critic's) anchor the value clip. Metrics (no prefix): ``value_loss``, ``value_clipfrac``,
        ``critic_grad_norm``, ``critic_lr``."""
        if batch.returns is None:
            raise ValueError("the critic trains on batch.returns, which is None")
        reduction = self.train_config.loss_reduction
        batch = batch_to(batch, self.device)
        old = self.compute_values(batch) if old_values is None else old_values.to(self.device, torch.float32)
        assert batch.returns is not None  # narrowed above; batch_to keeps it
        normalizer = loss_normalizer(reduction, batch.loss_mask, batch.cu_seqlens).to(self.device)
        if self.dp_size > 1:
            dist.all_reduce(normalizer, group=self.group)
        self.model.train()
        sums = torch.zeros(2, device=self.device)
        for bin_ in self._bins(batch):
            mb = select_sequences(batch, bin_ or [0])
            returns = mb.returns
            assert returns is not None  # select_sequences slices it along
            if not bin_:
                mb = dataclasses.replace(mb, loss_mask=torch.zeros_like(mb.loss_mask))
            loss, m = value_loss(
                self.model(mb),
                select_tokens(old, batch.cu_seqlens, bin_ or [0]),
                returns,
                mb.loss_mask,
                mb.cu_seqlens,
                value_clip=self.value_clip,
                reduction=reduction,
                normalizer=normalizer,
            )
            (loss * (1.0 if bin_ else 0.0)).backward()
            if bin_:
                sums += torch.stack([m["value_loss"].float(), m["value_clipfrac"].float()])
        if self.dp_size > 1:
            dist.all_reduce(sums, group=self.group)
            for p in self.model.parameters():
                if p.grad is not None:
                    dist.all_reduce(p.grad, group=self.group)
        loss_value, clipfrac = sums.tolist()
        norm, lr, _ = clipped_step(
            self.model,
            self.optimizer,
            self.scheduler,
            clip_grad=self.train_config.clip_grad,
            loss=loss_value,
            device=self.device,
        )
        return {
            "value_loss": loss_value,
            "value_clipfrac": clipfrac,
            "critic_grad_norm": norm,
            "critic_lr": lr,
        }


def build_critic(path: str, train: TrainConfig, algo: AlgoConfig, device: torch.device) -> Critic:
    """A critic on the backbone of ``--critic-load`` ``path`` (a Hugging Face model; fp32 master
    weights), with activation checkpointing under ``--gradient-checkpointing``, and its optimizer."""
    if (Path(path) / TRACKER).is_file() or (Path(path) / "meta.json").is_file():
        raise ValueError(
            f"--critic-load {path} is a Miles training checkpoint; it takes a Hugging Face model (the "
            "critic's initial weights). To resume a PPO run, pass --load: the critic is saved with the policy"
        )
    backbone = load_model(path, dtype="float32", device=device)
    if train.gradient_checkpointing:
        apply_activation_checkpointing(backbone)
    return Critic(ValueModel(backbone), train, algo, device)
