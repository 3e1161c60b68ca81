"""Reference model (KL loss) and the PPO critic."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from miles.train.critic import Critic, ValueModel
from miles.train.trainer import Trainer
from miles.types import TrainBatch
from tests.train.helpers import POLICY, make_batch, make_model, sections


def _with_returns(batch: TrainBatch) -> TrainBatch:
    return dataclasses.replace(batch, returns=batch.advantages + 0.5 * batch.loss_mask)


@pytest.mark.parametrize("ref_offload", [False, True])
def test_kl_loss_is_zero_when_ref_equals_policy(ref_offload: bool) -> None:
    model = make_model()
    trainer = Trainer(model, *sections(**POLICY), ref_model=copy.deepcopy(model), ref_offload=ref_offload)
    batch = make_batch()
    assert torch.equal(trainer.compute_ref_logprobs(batch), trainer.compute_logprobs(batch).logp)
    metrics = trainer.train_step(batch)  # no ref_logprobs: the reference model scores them
    assert metrics["train/kl_loss"] == 0.0
    # After a step the policy moved and the KL is positive (k1 is not, in general: use k3).
    k3 = Trainer(model, *sections(**{**POLICY, "kl_loss_type": "k3"}), ref_model=trainer.ref_model)
    assert k3.accumulate_gradients(batch)["kl_loss"] > 0
    assert all(not p.requires_grad for p in trainer.ref_model.parameters())  # type: ignore[union-attr]


def test_kl_loss_without_ref_is_an_error() -> None:
    trainer = Trainer(make_model(), *sections(**POLICY))
    with pytest.raises(ValueError, match="ref_model"):
        trainer.train_step(make_batch())


def test_values_train_toward_returns() -> None:
    budget = dict(use_dynamic_batch_size=True, max_tokens_per_gpu=24)
    critic = Critic(ValueModel.from_policy(make_model()), *sections(lr=1e-2, **budget))
    batch = _with_returns(make_batch())
    values = critic.compute_values(batch)
    assert values.shape == (batch.num_tokens,) and torch.all(values == 0)  # zero-initialised head
    losses = [critic.train_step(batch)["value_loss"] for _ in range(15)]
    assert losses[-1] < 0.5 * losses[0] and losses[-1] < losses[len(losses) // 2]
    # The values of sequence starts carry no meaning and stay 0.
    assert torch.all(critic.compute_values(batch)[batch.cu_seqlens[:-1].long()] == 0)


def test_critic_only_steps_leave_the_policy_alone() -> None:
    policy = make_model()
    critic = Critic(ValueModel.from_policy(policy), *sections(lr=1e-2))
    trainer = Trainer(policy, *sections(lr=1e-2, num_critic_only_steps=2), critic=critic)
    start = {n: p.detach().clone() for n, p in policy.named_parameters()}
    head = critic.model.value_head.weight.detach().clone()
    batch = _with_returns(make_batch())
    for _ in range(2):
        metrics = trainer.train_step(batch)
        assert metrics["train/critic_only"] == 1 and "train/value_loss" in metrics
        assert "train/pg_loss" not in metrics
    assert all(torch.equal(p, start[n]) for n, p in policy.named_parameters())
    assert not torch.equal(critic.model.value_head.weight, head)
    metrics = trainer.train_step(batch)
    assert metrics["train/critic_only"] == 0 and "train/pg_loss" in metrics
    assert not all(torch.equal(p, start[n]) for n, p in policy.named_parameters())
    with pytest.raises(ValueError, match="needs a critic"):
        Trainer(make_model(), *sections(num_critic_only_steps=1))
