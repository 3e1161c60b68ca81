"""MoE router losses and expert-load metrics in the trainer: the loss term is added and logged,
accumulation over micro-batches weights each by its token share (micro-batching invariant),
zero coefficients change nothing bit for bit, and the load metrics match a hand count."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import miles.train.router_losses as router_losses
from miles.models.moe import RouterStats
from miles.train.parallelize import parallelize
from miles.train.steps import packed_logprobs
from miles.train.trainer import Trainer
from tests.tolerance import assert_grads_close, assert_metrics_close, assert_reduction_close, step_terms
from tests.train.helpers import POLICY, grads, make_batch, make_model, sections

COEFS = dict(moe_aux_loss_coeff=0.5, moe_z_loss_coeff=0.05)  # large enough to move the gradient


def _run(cfg: dict, batch, case: str = "qwen3_moe", checkpointing: bool = False):
    model = make_model(case)
    if checkpointing:
        parallelize(model, fsdp=False, activation_checkpointing=True)
    trainer = Trainer(model, *sections(**POLICY, **cfg))
    metrics = trainer.accumulate_gradients(batch, ref_logprobs=make_batch(seed=2).rollout_logprobs)
    return metrics, grads(model)


def _hand_losses(batch) -> tuple[float, float]:
    """aux and z of one forward over the whole batch, averaged over the MoE layers."""
    model = make_model("qwen3_moe")
    stats = RouterStats()
    with torch.no_grad(), stats.collect():
        packed_logprobs(
            model, batch, temperature=1.0, chunk_size=1024, vocab_chunk_size=None, need_entropy_grad=False
        )
    layers = model.spec.moe_layer_indices
    return (
        sum(float(stats.aux[i]) for i in layers) / len(layers),
        sum(float(stats.z[i]) for i in layers) / len(layers),
    )


def test_trainer_adds_the_router_losses() -> None:
    batch = make_batch()
    m0, g0 = _run(dict(micro_batch_size=len(batch.response_lens)), batch)
    m1, g1 = _run(dict(micro_batch_size=len(batch.response_lens), **COEFS), batch)
    assert "moe_aux_loss" not in m0 and "moe_z_loss" not in m0
    aux, z = _hand_losses(batch)
    assert m1["moe_aux_loss"] == pytest.approx(aux, rel=1e-5)
    assert m1["moe_z_loss"] == pytest.approx(z, rel=1e-5)
    added = COEFS["moe_aux_loss_coeff"] * aux + COEFS["moe_z_loss_coeff"] * z
    assert m1["loss"] - m0["loss"] == pytest.approx(added, rel=1e-4)
    gate = "model.layers.0.mlp.gate.weight"
    assert not torch.allclose(g1[gate], g0[gate], rtol=0, atol=1e-6)
    # The router losses reach the weights only through the routers (and their inputs, the residual
    # stream, hence every earlier layer): the experts after the last router get the same gradient.
    # (Layer 0's experts do not: layer 1's router reads their output.)
    last = max(make_model("qwen3_moe").spec.moe_layer_indices)
    expert = f"model.layers.{last}.mlp.experts.0.down_proj.weight"
    assert_reduction_close(g1[expert], g0[expert], step_terms(make_model("qwen3_moe").spec, batch.num_tokens))


@pytest.mark.parametrize(
    "coefs", [COEFS, dict(moe_aux_loss_coeff=0.5), dict(moe_z_loss_coeff=0.05)], ids=["both", "aux", "z"]
)
def test_micro_batching_invariance_with_router_losses(coefs: dict) -> None:
    # The z-loss is a token mean: invariant on any batch. The load-balancing loss multiplies two
    # micro-batch means (f_e * P_e), so it is invariant only when every micro-batch has the same
    # routing statistics: copies of one sequence. Unequal bins (max_tokens_per_gpu=20: 2 + 2 + 1
    # sequences of 9 tokens) check that each micro-batch is weighted by its token share.
    lengths = (9,) * 5
    one = make_batch((9,), seed=3)
    batch = make_batch(lengths, seed=3)
    batch = dataclasses.replace(
        batch,
        input_ids=one.input_ids.repeat(5),
        advantages=one.advantages.repeat(5),
        rollout_logprobs=one.rollout_logprobs.repeat(5),
    )
    budget = dict(use_dynamic_batch_size=True, max_tokens_per_gpu=20)
    splits = [dict(micro_batch_size=5), dict(micro_batch_size=2), budget]
    results = [_run({**split, **coefs}, batch) for split in splits]
    (m0, g0), *rest = results
    # Other micro-batches are GEMMs of other shapes: equal to rounding (tests/tolerance.py).
    terms = step_terms(make_model("qwen3_moe").spec, batch.num_tokens)
    for m, g in rest:
        assert_metrics_close(m, m0, terms)
        assert_grads_close(g, g0, terms)


def test_z_loss_alone_is_micro_batching_invariant_on_any_batch() -> None:
    batch = make_batch()
    coefs = dict(moe_z_loss_coeff=0.05)
    (m0, g0), (m1, g1) = (
        _run({**s, **coefs}, batch) for s in (dict(micro_batch_size=6), dict(micro_batch_size=2))
    )
    terms = step_terms(make_model("qwen3_moe").spec, batch.num_tokens)
    assert_metrics_close({"z": m1["moe_z_loss"]}, {"z": m0["moe_z_loss"]}, terms)
    assert_grads_close(g1, g0, terms)


def test_zero_coefficients_change_nothing_bitwise(monkeypatch: pytest.MonkeyPatch) -> None:
    batch = make_batch()
    m_on, g_on = _run(dict(micro_batch_size=2), batch)
    monkeypatch.setattr(router_losses.RouterLossTracker, "for_model", classmethod(lambda cls, *a: None))
    m_off, g_off = _run(dict(micro_batch_size=2), batch)
    assert "expert_load_cv" in m_on and "expert_load_cv" not in m_off
    assert {k: v for k, v in m_on.items() if not k.startswith("expert_load")} == m_off
    assert g_on.keys() == g_off.keys() and all(torch.equal(g_on[n], g_off[n]) for n in g_on)


def test_expert_load_metrics_match_a_hand_count() -> None:
    batch = make_batch()
    model = make_model("qwen3_moe")
    stats = RouterStats(losses=False)
    with torch.no_grad(), stats.collect():
        packed_logprobs(
            model, batch, temperature=1.0, chunk_size=1024, vocab_chunk_size=None, need_entropy_grad=False
        )
    layers = model.spec.moe_layer_indices
    expected = {}
    for i in layers:
        c = stats.counts[i]
        expected[f"expert_load_max_over_mean/layer_{i}"] = float(c.max() / c.mean())
        expected[f"expert_load_cv/layer_{i}"] = float(c.std(unbiased=False) / c.mean())
    expected["expert_load_max_over_mean"] = sum(
        expected[f"expert_load_max_over_mean/layer_{i}"] for i in layers
    ) / len(layers)
    expected["expert_load_cv"] = sum(expected[f"expert_load_cv/layer_{i}"] for i in layers) / len(layers)
    for checkpointing in (False, True):  # recomputation in the backward is not counted again
        m, _ = _run(dict(micro_batch_size=2, **COEFS), batch, checkpointing=checkpointing)
        for k, v in expected.items():
            assert m[k] == pytest.approx(v, rel=1e-6), (k, checkpointing)
    m, _ = _run(dict(micro_batch_size=2), batch, case="llama")  # dense: no load metrics
    assert not any(k.startswith("expert_load") for k in m)


def test_activation_checkpointing_same_grads_with_router_losses() -> None:
    batch = make_batch()
    (m0, g0), (m1, g1) = (
        _run(dict(micro_batch_size=2, **COEFS), batch, checkpointing=c) for c in (False, True)
    )
    terms = step_terms(make_model("qwen3_moe").spec, batch.num_tokens)
    assert_metrics_close(m1, m0, terms)
    assert_grads_close(g1, g0, terms)


def test_the_cli_coefficients_reach_the_router_loss_tracker() -> None:
    from miles.config import parse_train_args

    base = [
        "--hf-checkpoint",
        "x",
        "--rollout-batch-size",
        "4",
        "--prompt-data",
        "p.jsonl",
        "--num-rollout",
        "1",
    ]
    base += ["--n-samples-per-prompt", "2"]
    cfg = parse_train_args([*base, "--moe-aux-loss-coeff", "0.01", "--moe-z-loss-coeff", "0.001"])
    tracker = router_losses.RouterLossTracker.for_model(make_model("qwen3_moe"), cfg.train, 8, lambda t: None)
    assert tracker is not None and (tracker.aux_coef, tracker.z_coef) == (0.01, 0.001)
