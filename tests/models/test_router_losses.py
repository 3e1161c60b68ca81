"""MoE router losses in ``SparseMoeBlock``: the load-balancing (Switch) and z-losses against a
hand computation, on the experts actually used (replayed ids), gradients reaching the router, and
no change to the block's output or gradients, bit for bit, when a collector is active."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from miles.models.moe import RouterStats, SparseMoeBlock, router_aux_loss, router_z_loss
from miles.models.spec import ModelSpec
from tests.models.conftest import CASES


def _block(case: str = "qwen3_moe", seed: int = 0, **overrides: Any) -> SparseMoeBlock:
    prefix, kwargs = CASES[case]
    spec = ModelSpec.from_hf_config({"architectures": [f"{prefix}ForCausalLM"], **kwargs, **overrides})
    block = SparseMoeBlock(spec, layer_idx=3)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return block


def _x(t: int, hidden: int, seed: int = 2) -> torch.Tensor:
    return torch.randn(t, hidden, generator=torch.Generator().manual_seed(seed))


class ReplaceIds:
    def __init__(self, ids: torch.Tensor) -> None:
        self.ids = ids

    def route(self, layer_idx: int, router_logits: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
        return self.ids


def test_hand_computed_losses() -> None:
    # 3 tokens, 2 experts, top-1: logits chosen so the probabilities are simple.
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0], [0.0, math.log(3.0)]])
    probs = torch.softmax(logits, dim=-1)  # [.5 .5], [.75 .25], [.25 .75]
    ids = torch.tensor([[0], [0], [1]])
    # f = (2/3, 1/3); P = (0.5, 0.5); E * sum f P = 2 * 0.5 = 1.0
    assert router_aux_loss(probs, ids, 2).item() == pytest.approx(1.0)
    ids = torch.tensor([[0], [0], [0]])  # f = (1, 0): 2 * 0.5 = 1.0; now P skewed
    probs2 = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.7, 0.3]])
    assert router_aux_loss(probs2, ids, 2).item() == pytest.approx(2 * 0.8)
    # z-loss: mean of logsumexp^2: lse = log 2, log 4, log 4
    expected = (math.log(2) ** 2 + 2 * math.log(4) ** 2) / 3
    assert router_z_loss(logits).item() == pytest.approx(expected)
    # top-2 of 3 experts: f counts (token, slot) pairs, sums to 1
    ids = torch.tensor([[0, 1], [0, 2]])
    probs3 = torch.full((2, 3), 1 / 3)
    # f = (1/2, 1/4, 1/4), P = 1/3 each: 3 * (1/3) = 1
    assert router_aux_loss(probs3, ids, 3).item() == pytest.approx(1.0)


def test_block_records_losses_of_the_used_experts() -> None:
    block = _block()
    x = _x(11, block.gate.weight.shape[1])
    forced = torch.randint(
        0, block.num_experts, (11, block.top_k), generator=torch.Generator().manual_seed(5)
    )
    forced[:, 1] = (forced[:, 0] + 1) % block.num_experts  # distinct ids per token
    stats = RouterStats(ReplaceIds(forced))
    out = block(x, stats)
    torch.testing.assert_close(out, block(x, ReplaceIds(forced)), rtol=0, atol=0)
    logits = block.gate(x)
    probs = torch.softmax(logits.float(), dim=-1)
    f = torch.bincount(forced.reshape(-1), minlength=block.num_experts).float() / forced.numel()
    expected_aux = block.num_experts * (f * probs.mean(0)).sum()
    expected_z = (torch.logsumexp(logits, -1) ** 2).mean()
    torch.testing.assert_close(stats.aux[3], expected_aux)
    torch.testing.assert_close(stats.z[3], expected_z)
    assert torch.equal(
        stats.counts[3], torch.bincount(forced.reshape(-1), minlength=block.num_experts).float()
    )
    # the router's own choice differs from the forced one: the loss follows the used ids
    own = torch.topk(probs, block.top_k, dim=-1).indices
    f_own = torch.bincount(own.reshape(-1), minlength=block.num_experts).float() / own.numel()
    assert not torch.equal(f_own, f)


def test_gradients_reach_the_router() -> None:
    block = _block()
    x = _x(9, block.gate.weight.shape[1])
    for which in ("aux", "z"):
        block.zero_grad(set_to_none=True)
        stats = RouterStats()
        block(x, stats)
        getattr(stats, which)[3].backward()
        grad = block.gate.weight.grad
        assert grad is not None and grad.abs().sum() > 0, which
        assert all(p.grad is None for n, p in block.named_parameters() if not n.startswith("gate.")), which


def test_counts_only_without_losses_and_nothing_recorded_after_the_forward() -> None:
    block = _block()
    x = _x(5, block.gate.weight.shape[1])
    stats = RouterStats(losses=False)
    block(x, stats)
    assert set(stats.counts) == {3} and not stats.aux and not stats.z
    assert stats.counts[3].sum().item() == 5 * block.top_k
    with pytest.raises(RuntimeError, match="twice"):
        block(x, stats)
    stats = RouterStats()
    block(x, stats)
    first = (stats.aux[3], stats.z[3], stats.counts[3])
    stats.end_forward()
    block(x[:2], stats)  # activation-checkpoint recomputation: computed again, not recorded
    assert (stats.aux[3], stats.z[3], stats.counts[3]) == first


@pytest.mark.parametrize("case", ["qwen3_moe", "qwen2_moe_shared_expert"])
@pytest.mark.parametrize("impl", ["grouped", "reference"])
def test_collecting_changes_nothing_bitwise(case: str, impl: str) -> None:
    block = _block(case)
    block.expert_impl = impl  # type: ignore[assignment]
    x = _x(13, block.gate.weight.shape[1])
    grad_out = torch.randn(13, x.shape[1], generator=torch.Generator().manual_seed(7))

    def run(losses: bool | None) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        block.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_()
        out = block(xi) if losses is None else block(xi, RouterStats(losses=losses))
        out.backward(grad_out)
        assert xi.grad is not None
        return (
            out.detach(),
            xi.grad,
            {n: p.grad.clone() for n, p in block.named_parameters() if p.grad is not None},
        )

    base = run(None)
    for losses in (False, True):
        out, gx, grads = run(losses)
        assert torch.equal(out, base[0]) and torch.equal(gx, base[1])
        assert grads.keys() == base[2].keys()
        assert all(torch.equal(grads[n], base[2][n]) for n in grads)
