"""Routing replay (R2): the experts of the trainer's old-log-prob forward are replayed in the
training forwards of the same tokens (micro-batched, sub-batched as the loop does, and in the
activation-checkpoint recomputation), while the router keeps its gradient."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest
import torch

import miles.models.moe as moe_module
from miles.train.packing import select_sequences, select_tokens
from miles.train.trainer import Trainer
from tests.train.helpers import make_batch, make_model, sections

LENGTHS = (7, 12, 5, 9, 11, 6)
FIRST, SECOND = [0, 1, 2], [3, 4, 5]  # two optimizer steps on halves of the batch, as the loop does


class Spy:
    """Records, per MoE block forward (and recomputation), the router's own top-k ids and the
    ids actually used."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.own: list[torch.Tensor] = []
        self.used: list[torch.Tensor] = []
        select, gate = moe_module.select_experts, moe_module.gate_weights

        def spy_select(logits: torch.Tensor, k: int, norm: bool) -> Any:
            probs, ids = select(logits, k, norm)
            self.own.append(ids.clone())
            return probs, ids

        def spy_gate(probs: torch.Tensor, ids: torch.Tensor, norm: bool) -> torch.Tensor:
            self.used.append(ids.clone())
            return gate(probs, ids, norm)

        monkeypatch.setattr(moe_module, "select_experts", spy_select)
        monkeypatch.setattr(moe_module, "gate_weights", spy_gate)

    def clear(self) -> None:
        self.own.clear()
        self.used.clear()


def _trainer(r2: bool, checkpointing: bool = False, **kw: Any) -> Trainer:
    cfg = sections(
        lr=0.05,  # large: one step visibly moves the routing
        use_routing_replay=r2,
        micro_batch_size=2,
        gradient_checkpointing=checkpointing,
    )
    return Trainer(make_model("qwen3_moe"), *cfg, **kw)


def _rows(x: torch.Tensor, batch: Any, seqs: list[int]) -> torch.Tensor:
    return select_tokens(x, batch.cu_seqlens, seqs)


def _expected_calls(record: torch.Tensor, sub: Any, mbs: list[list[int]]) -> list[torch.Tensor]:
    """Every (micro-batch, layer) slice of ``record`` (rows of ``sub``)."""
    return [
        select_tokens(record, sub.cu_seqlens, mb)[:, pos].long()
        for mb in mbs
        for pos in range(record.shape[1])
    ]


def test_record_is_the_old_forwards_routing_aligned_with_tokens(monkeypatch: pytest.MonkeyPatch) -> None:
    batch = make_batch(LENGTHS)
    trainer = _trainer(True)
    spy = Spy(monkeypatch)
    record = trainer.compute_logprobs(batch).routing
    spec = trainer.model.spec
    assert record is not None and record.dtype == torch.int32
    assert record.shape == (batch.num_tokens, len(spec.moe_layer_indices), spec.num_experts_per_tok)
    # micro-batches of two sequences, each MoE layer once: the router's own choice, no replay
    assert [o.shape[0] for o in spy.own[:: len(spec.moe_layer_indices)]] == [19, 14, 17]
    assert all(
        torch.equal(u, e) for u, e in zip(spy.used, _expected_calls(record, batch, [[0, 1], [2, 3], [4, 5]]))
    )
    assert _trainer(False).compute_logprobs(batch).routing is None


@pytest.mark.parametrize("checkpointing", [False, True])
def test_second_step_replays_the_old_forward_routing(
    monkeypatch: pytest.MonkeyPatch, checkpointing: bool
) -> None:
    batch = make_batch(LENGTHS)
    recorder = _trainer(True)
    record = recorder.compute_logprobs(batch).routing  # the old forward's (same initial weights for all)
    assert record is not None
    spy = Spy(monkeypatch)
    grads = {}
    # Two runs from the same weights: a step on FIRST, then the gradient on SECOND.
    for r2 in (False, True):
        trainer = _trainer(r2, checkpointing)
        old = trainer.compute_logprobs(batch).logp
        kw: dict[str, Any] = {"old_routing": _rows(record, batch, FIRST)} if r2 else {}
        trainer.train_step(select_sequences(batch, FIRST), _rows(old, batch, FIRST), **kw)
        sub = select_sequences(batch, SECOND)
        kw = {"old_routing": _rows(record, batch, SECOND)} if r2 else {}
        spy.clear()
        trainer.accumulate_gradients(sub, _rows(old, batch, SECOND), **kw)
        calls = len(trainer.model.spec.moe_layer_indices) * 2 * (2 if checkpointing else 1)
        assert len(spy.used) == calls  # 2 micro-batches, each layer once (+ once in recomputation)
        expected = _expected_calls(_rows(record, batch, SECOND), sub, [[0, 1], [2]])
        exact = [any(torch.equal(u, e) for e in expected) for u in spy.used]
        drifted = [not any(torch.equal(o, e) for e in expected) for o in spy.own]
        assert any(drifted), "the step should move the router's own choice"
        if r2:
            assert all(exact)  # R2: exactly the recorded experts, in forward and recomputation
        else:
            assert not all(exact)  # without replay the drifted choice is used
        gate = trainer.model.model.layers[0].mlp.gate.weight.grad
        assert gate is not None and gate.abs().sum() > 0  # the router learns under replay
        grads[r2] = gate.clone()
    assert not torch.equal(grads[False], grads[True])


def test_checkpointing_recomputes_the_same_replay() -> None:
    batch = make_batch(LENGTHS)
    gates = []
    for ckpt in (False, True):
        trainer = _trainer(True, ckpt)
        scored = trainer.compute_logprobs(batch)
        old, record = scored.logp, scored.routing
        assert record is not None
        trainer.train_step(
            select_sequences(batch, FIRST), _rows(old, batch, FIRST), old_routing=_rows(record, batch, FIRST)
        )
        trainer.accumulate_gradients(
            select_sequences(batch, SECOND),
            _rows(old, batch, SECOND),
            old_routing=_rows(record, batch, SECOND),
        )
        gates.append(trainer.model.model.layers[0].mlp.gate.weight.grad.clone())
    torch.testing.assert_close(gates[0], gates[1], rtol=0, atol=1e-6)


def test_contract_errors() -> None:
    batch = make_batch(LENGTHS)
    trainer = _trainer(True)
    scored = trainer.compute_logprobs(batch)
    old = scored.logp
    with pytest.raises(ValueError, match="needs old_routing"):
        trainer.train_step(batch, old)
    assert scored.routing is not None
    with pytest.raises(ValueError, match="sliced like the old log-probs"):
        trainer.train_step(
            select_sequences(batch, FIRST), _rows(old, batch, FIRST), old_routing=scored.routing
        )


def test_r3_wins_over_r2(monkeypatch: pytest.MonkeyPatch) -> None:
    batch = make_batch(LENGTHS)
    trainer = _trainer(True, use_rollout_routing_replay=True)
    spec = trainer.model.spec
    gen = torch.Generator().manual_seed(4)
    shape = (batch.num_tokens, len(spec.moe_layer_indices), spec.num_experts)
    engine = torch.rand(shape, generator=gen).argsort(-1)[..., : spec.num_experts_per_tok].to(torch.int32)
    batch = replace(batch, routed_experts=engine)
    scored = trainer.compute_logprobs(batch)
    old = scored.logp
    assert scored.routing is not None and torch.equal(scored.routing, engine)
    spy = Spy(monkeypatch)
    trainer.accumulate_gradients(batch, old, old_routing=torch.zeros_like(engine))  # ignored: R3 replays
    mbs = [[0, 1], [2, 3], [4, 5]]
    expected = _expected_calls(engine, batch, mbs)
    assert len(spy.used) == len(expected)
    assert all(any(torch.equal(u, e) for e in expected) for u in spy.used)
