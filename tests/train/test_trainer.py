"""Trainer: micro-batching invariance, log-probs, SFT/PPO progress, NaN skip, activation checkpointing."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from miles.algo import POLICY_LOSSES, CorrectionParams, logprobs_from_logits
from miles.config import AlgoConfig, TrainConfig
from miles.train.optim import LRSchedule, critic_lr_schedule, policy_lr_schedule
from miles.train.packing import select_sequences
from miles.train.parallelize import parallelize
from miles.train.trainer import Trainer, correction_params, critic_only_steps
from tests.tolerance import assert_grads_close, assert_metrics_close, assert_reduction_close, step_terms
from tests.train.helpers import LENGTHS, POLICY, grads, make_batch, make_model, sections


@pytest.mark.parametrize("reduction", ["token_mean", "seq_mean"])
def test_micro_batching_invariance(reduction: str) -> None:
    batch = make_batch()
    old = make_batch(seed=1).rollout_logprobs * 0.5  # differs from rollout: TIS is active
    ref = make_batch(seed=2).rollout_logprobs
    base = dict(POLICY, calculate_per_token_loss=reduction == "token_mean", use_tis=True)
    splits = [
        dict(micro_batch_size=len(LENGTHS)),  # one micro-batch
        dict(micro_batch_size=2),  # three
        dict(use_dynamic_batch_size=True, max_tokens_per_gpu=20),  # dynamic token budget
    ]
    results = []
    for split in splits:
        model = make_model()
        trainer = Trainer(model, *sections(**base, **split))
        metrics = trainer.accumulate_gradients(batch, old, ref)
        results.append((metrics, grads(model)))
    (m0, g0), *rest = results
    assert m0["tis_clipfrac"] > 0
    # Other micro-batches are GEMMs of other shapes: equal to rounding (tests/tolerance.py).
    terms = step_terms(model.spec, batch.num_tokens)
    for m, g in rest:
        assert_metrics_close(m, m0, terms)
        assert_grads_close(g, g0, terms)


@pytest.mark.parametrize("case", ["llama", "qwen3_moe"])
def test_compute_logprobs_matches_full_logits(case: str) -> None:
    model = make_model(case)
    batch = make_batch()
    trainer = Trainer(model, *sections(use_dynamic_batch_size=True, max_tokens_per_gpu=16), temperature=0.7)
    scored = trainer.compute_logprobs(batch)
    logp, entropy = scored.logp, scored.entropy
    with torch.no_grad():
        logits = model.forward_packed(batch.input_ids, batch.cu_seqlens)
    want = torch.zeros_like(logp)
    want[1:] = logprobs_from_logits(logits[:-1], batch.input_ids[1:], temperature=0.7)
    want[batch.cu_seqlens[:-1].long()] = 0.0
    # Chunked micro-batches against one forward: GEMMs of other shapes, equal to rounding.
    assert_reduction_close(logp, want, step_terms(model.spec, batch.num_tokens, backward=False))
    assert bool((entropy[batch.cu_seqlens[:-1].long()] == 0).all())
    assert bool((entropy[1:5] > 0).all())


def test_sft_steps_reduce_loss() -> None:
    torch.manual_seed(0)
    model = make_model()
    batch = make_batch()
    trainer = Trainer(model, *sections(loss_type="sft_loss", lr=1e-2, micro_batch_size=2))
    losses = [trainer.train_step(batch)["train/loss"] for _ in range(8)]
    assert losses[-1] < losses[0] - 0.5, losses


def test_ppo_steps_raise_logprobs_of_positive_advantages() -> None:
    model = make_model()
    batch = make_batch()
    adv_seq = torch.tensor([1.0, -1.0, 1.0, -1.0, 1.0, -1.0])
    batch = dataclasses.replace(
        batch, advantages=torch.repeat_interleave(adv_seq, torch.tensor(LENGTHS)) * batch.loss_mask
    )
    trainer = Trainer(model, *sections(lr=1e-3, micro_batch_size=3, use_tis=True))
    before = trainer.compute_logprobs(batch).logp
    for _ in range(4):
        metrics = trainer.train_step(batch, old_logprobs=trainer.compute_logprobs(batch).logp)
        assert metrics["train/skipped_steps"] == 0
        assert math.isfinite(metrics["train/grad_norm"]) and metrics["train/grad_norm"] > 0
    after = trainer.compute_logprobs(batch).logp
    mask = batch.loss_mask > 0
    delta = (after - before)[mask]
    pos = (batch.advantages > 0)[mask]
    assert float(delta[pos].mean()) > 0.02
    assert float(delta[~pos].mean()) < -0.02
    for key in (
        "loss",
        "pg_loss",
        "pg_clipfrac",
        "ppo_kl",
        "entropy",
        "lr",
        "train_rollout_logprob_abs_diff",
        "mismatch_k3_kl",
        "tis_weight_mean",
        "tis_clipfrac",
    ):
        assert f"train/{key}" in metrics


def test_nan_loss_skips_step_and_keeps_params() -> None:
    model = make_model()
    batch = make_batch()
    trainer = Trainer(model, *sections(lr=1e-2, micro_batch_size=2, use_rollout_logprobs=True))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    bad = batch.advantages.clone()
    bad[5] = float("nan")
    metrics = trainer.train_step(dataclasses.replace(batch, advantages=bad))
    assert metrics["train/skipped_steps"] == 1 and trainer.skipped_steps == 1
    assert not math.isfinite(metrics["train/loss"])
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n
        assert p.grad is None
    assert trainer.scheduler.last_epoch == 0
    # The next good step trains normally.
    metrics = trainer.train_step(batch)
    assert metrics["train/skipped_steps"] == 0
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_activation_checkpointing_same_grads() -> None:
    batch = make_batch()
    cfg = sections(**POLICY, micro_batch_size=2)
    ref = make_batch(seed=2).rollout_logprobs
    out = []
    for checkpointing in (False, True):
        model = make_model("qwen3")
        if checkpointing:
            parallelize(model, fsdp=False, activation_checkpointing=True)
        names = {n for n, _ in model.named_parameters()}
        trainer = Trainer(model, *cfg)
        metrics = trainer.accumulate_gradients(batch, ref_logprobs=ref)
        out.append((names, metrics, grads(model)))
    (n0, m0, g0), (n1, m1, g1) = out
    assert n0 == n1  # parameter names unchanged: checkpoints stay HF-compatible
    terms = step_terms(model.spec, batch.num_tokens)
    assert_metrics_close(m1, m0, terms)
    assert_grads_close(g1, g0, terms)


def test_kl_loss_needs_ref_logprobs() -> None:
    trainer = Trainer(make_model(), *sections(use_kl_loss=True, kl_loss_coef=0.1))
    with pytest.raises(ValueError, match="ref_logprobs"):
        trainer.train_step(make_batch())


def test_single_sequence_micro_batch_matches_select() -> None:
    batch = make_batch()
    trainer = Trainer(make_model(), *sections(micro_batch_size=1))
    full = trainer.compute_logprobs(batch).logp
    one = trainer.compute_logprobs(select_sequences(batch, [2])).logp
    s, e = int(batch.cu_seqlens[2]), int(batch.cu_seqlens[3])
    # One sequence alone runs GEMMs of another shape than the whole batch: equal to rounding.
    assert_reduction_close(one, full[s:e], step_terms(trainer.model.spec, batch.num_tokens, backward=False))


def test_on_policy_step_reuses_its_own_logprobs_bit_for_bit() -> None:
    """``on_policy=True`` skips the old-log-prob forward; parameters and metrics are exactly those
    of the step given old log-probs from a separate forward on the same weights."""
    batch = make_batch()
    results = []
    for on_policy in (False, True):
        trainer = Trainer(make_model(), *sections(lr=1e-3, micro_batch_size=2))
        old = None if on_policy else trainer.compute_logprobs(batch).logp
        metrics = trainer.train_step(batch, old_logprobs=old, on_policy=on_policy)
        results.append((metrics, {n: p.detach().clone() for n, p in trainer.model.named_parameters()}))
    (m_sep, p_sep), (m_own, p_own) = results
    assert m_sep == m_own
    assert m_own["train/ppo_kl"] == 0.0 and m_own["train/train_rollout_logprob_abs_diff"] > 0
    assert all(torch.equal(p_sep[n], p_own[n]) for n in p_sep)
    tis = Trainer(make_model(), *sections(lr=1e-3, use_tis=True))
    with pytest.raises(ValueError, match="correction 'none'"):
        tis.train_step(batch, on_policy=True)


def test_the_trainer_reads_its_choices_from_the_sections() -> None:
    """What a field-by-field copy used to rename is read from the sections: the reduction from
    ``--calculate-per-token-loss``, the token budget only with ``--use-dynamic-batch-size``, the
    correction and its bounds from ``--use-tis``/``--use-mis``, the policy loss from the estimator,
    both LR schedules, and the critic-only ``train_step`` calls from rollout steps."""
    train = TrainConfig(lr=2e-3, min_lr=1e-4, lr_warmup_iters=3, lr_decay_style="linear", lr_decay_iters=9,
                        max_tokens_per_gpu=64, critic_lr_warmup_iters=1, num_critic_only_steps=2)  # fmt: skip
    assert (train.loss_reduction, train.micro_batch_max_tokens) == ("seq_mean", None)
    on = dataclasses.replace(train, calculate_per_token_loss=True, use_dynamic_batch_size=True)
    assert (on.loss_reduction, on.micro_batch_max_tokens) == ("token_mean", 64)
    assert policy_lr_schedule(train) == LRSchedule(2e-3, 1e-4, 3, "linear", 9)
    assert critic_lr_schedule(train) == LRSchedule(2e-3, 1e-4, 1, "linear", 9)  # --lr by default
    assert critic_lr_schedule(dataclasses.replace(train, critic_lr=5e-5)) == LRSchedule(
        5e-5, 5e-5, 1, "linear", 9
    )
    assert critic_only_steps(train, 3) == 6
    flags: tuple[dict[str, bool], ...] = ({}, {"use_tis": True}, {"use_tis": True, "use_mis": True})
    assert [AlgoConfig(**kw).correction for kw in flags] == ["none", "tis", "mis"]
    mis = AlgoConfig(
        use_mis=True, mis_token_lower_bound=0.5, mis_token_upper_bound=3.0, mis_veto_threshold=1e-3
    )
    assert correction_params(mis) == CorrectionParams(2.0, 0.0, 0.5, 3.0, 0.99, 1.001, 1e-3)
    flat = correction_params(dataclasses.replace(mis, mis_seq_level="none"))
    assert (flat.mis_seq_low, flat.mis_seq_high) == (None, None)
    gspo = Trainer(make_model(), *sections(advantage_estimator="gspo"))
    assert gspo.policy_loss is POLICY_LOSSES.get("gspo")
    assert Trainer(make_model(), *sections()).policy_loss is POLICY_LOSSES.get("ppo")
    with pytest.raises(ValueError, match="--use-routing-replay .* --use-rollout-logprobs"):
        Trainer(make_model(), *sections(use_routing_replay=True, use_rollout_logprobs=True))
