"""The grouped expert path of ``SparseMoeBlock`` against the per-expert reference loop.

Forward output, input gradient and every parameter gradient must agree to rounding (fp32: the
two paths sum in different orders, ``tests/tolerance.py``), including experts no token was routed
to (zero gradients, never ``None``), top-1 and top-all routing, a single token and ids replaced by
a routing hook.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from miles.kernels import batch_invariant
from miles.models import moe
from miles.models.moe import SparseMoeBlock
from miles.models.spec import ModelSpec
from tests.models.conftest import CASES
from tests.tolerance import assert_reduction_close

FAMILIES = ["qwen3_moe", "qwen2_moe_shared_expert"]


def _block(case: str, seed: int = 0, **overrides: Any) -> SparseMoeBlock:
    prefix, kwargs = CASES[case]
    spec = ModelSpec.from_hf_config({"architectures": [f"{prefix}ForCausalLM"], **kwargs, **overrides})
    block = SparseMoeBlock(spec, layer_idx=0)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return block


class ReplaceIds:
    """Routing hook that forces the given ids (as rollout routing replay does)."""

    def __init__(self, ids: torch.Tensor) -> None:
        self.ids = ids

    def route(self, layer_idx: int, router_logits: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
        return self.ids


def _run(
    block: SparseMoeBlock, x: torch.Tensor, impl: str, routing: Any = None
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor | None]]:
    block.expert_impl = impl  # type: ignore[assignment]
    block.zero_grad(set_to_none=True)
    xi = x.detach().clone().requires_grad_()
    out = block(xi, routing)
    # Drawn in fp32 and rounded: the same upstream gradient for an fp32 and a bf16 run (a bf16
    # draw need not be the fp32 draw rounded: torch 2.11's is not, and the bf16 GPU test then
    # compared gradients of two different losses).
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.dtype)
    out.backward(grad_out.to(out.device))
    return out.detach(), xi.grad, {n: p.grad for n, p in block.named_parameters()}


def _terms(block: SparseMoeBlock, tokens: int) -> int:
    """The sums behind the block's outputs and gradients: the longest (a weight's width, or the
    tokens of a weight gradient) twice forward (up/gate, then down) and twice backward."""
    return max(*(max(p.shape) for p in block.parameters()), tokens) * 4


def _assert_parity(block: SparseMoeBlock, x: torch.Tensor, routing: Any = None) -> None:
    out_r, gx_r, grads_r = _run(block, x, "reference", routing)
    out_g, gx_g, grads_g = _run(block, x, "grouped", routing)
    terms = _terms(block, x.shape[0])
    assert_reduction_close(out_g, out_r, terms, "out")
    assert_reduction_close(gx_g, gx_r, terms, "x.grad")
    # Every parameter gradient sums products of the block's activations and upstream gradients: the
    # block's largest gradient measures those terms. A tensor's own maximum would not where it
    # cancels: top-1 with normalized probabilities gives the router a weight p / p = 1, whose
    # gradient is zero in exact arithmetic and rounding noise here.
    assert all(g is not None for g in grads_r.values())
    scale = max(float(g.abs().max()) for g in grads_r.values() if g is not None and g.numel())
    for name, g_r in grads_r.items():
        g_g = grads_g[name]
        assert g_r is not None and g_g is not None, name
        assert_reduction_close(g_g, g_r, terms, name, scale=scale)


def _x(t: int, hidden: int = 64, seed: int = 2) -> torch.Tensor:
    return torch.randn(t, hidden, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("case", FAMILIES)
@pytest.mark.parametrize(
    ("top_k", "tokens"),
    [(2, 37), (1, 37), (4, 37), (2, 1), (4, 1)],
    ids=["top2", "top1", "top_all", "one_token", "one_token_top_all"],
)
def test_grouped_matches_reference(case: str, top_k: int, tokens: int) -> None:
    block = _block(case, num_experts_per_tok=top_k)
    _assert_parity(block, _x(tokens))


@pytest.mark.parametrize("case", FAMILIES)
def test_expert_with_no_tokens_gets_zero_grads(case: str) -> None:
    block = _block(case)
    t = 9
    # Experts 1 and 3 only (in both slot orders); experts 0 and 2 get no token.
    ids = torch.tensor([[1, 3], [3, 1]] * 4 + [[1, 3]])
    hook = ReplaceIds(ids)
    _assert_parity(block, _x(t), hook)
    _, _, grads = _run(block, _x(t), "grouped", hook)
    for e in (0, 2):
        for proj in ("gate_proj", "up_proj", "down_proj"):
            g = grads[f"experts.{e}.{proj}.weight"]
            assert g is not None and torch.equal(g, torch.zeros_like(g)), (e, proj)
    assert grads["gate.weight"] is not None and grads["gate.weight"].abs().sum() > 0  # router still learns


@pytest.mark.parametrize("case", FAMILIES)
def test_routing_hook_replaces_ids(case: str) -> None:
    block = _block(case)
    t = 23
    gen = torch.Generator().manual_seed(5)
    ids = torch.stack([torch.randperm(block.num_experts, generator=gen)[: block.top_k] for _ in range(t)])
    _assert_parity(block, _x(t), ReplaceIds(ids.to(torch.int32)))  # SGLang records int32
    # The hook's ids are really used: the output differs from the router's own choice.
    block.expert_impl = "grouped"
    with torch.no_grad():
        assert not torch.allclose(block(_x(t), ReplaceIds(ids)), block(_x(t)))


def test_no_tokens() -> None:
    block = _block("qwen3_moe")
    _, gx, grads = _run(block, _x(0), "grouped")
    assert gx.shape == (0, 64)
    assert all(g is not None and not g.any() for g in grads.values())


def test_per_segment_fallback_matches(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where ``torch._grouped_mm`` does not run (older torch, unsupported dtype) one ``mm`` per
    expert segment does the same."""
    monkeypatch.setattr(moe, "_grouped_mm_runs", lambda device, dtype: False)
    block = _block("qwen2_moe_shared_expert")
    _assert_parity(block, _x(31))
    _assert_parity(block, _x(9), ReplaceIds(torch.tensor([[1, 3]] * 9)))


def test_inference_matches_and_is_deterministic() -> None:
    block = _block("qwen3_moe")
    x = _x(64)
    with torch.no_grad():
        block.expert_impl = "reference"  # type: ignore[assignment]
        ref = block(x)
        block.expert_impl = "grouped"  # type: ignore[assignment]
        a, b = block(x), block(x)
    assert_reduction_close(a, ref, _terms(block, 64))
    assert torch.equal(a, b)


def test_batch_invariant_mode_runs_the_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    block = _block("qwen3_moe")

    def boom(*args: Any) -> torch.Tensor:
        raise AssertionError("grouped path used in batch-invariant mode")

    monkeypatch.setattr(block, "_experts_grouped", boom)
    with batch_invariant.batch_invariant():
        block(_x(16)).sum().backward()
    with pytest.raises(AssertionError, match="grouped path used"):
        block(_x(16))


def test_out_of_range_ids_are_rejected() -> None:
    """The grouped GEMM leaves rows of ids outside ``[0, E)`` unwritten: they must never reach it."""
    block = _block("qwen3_moe")
    with pytest.raises(RuntimeError, match="out of bounds"):
        block(_x(3), ReplaceIds(torch.tensor([[0, 1], [2, 4], [1, 3]])))


def test_unknown_impl_is_rejected() -> None:
    block = _block("qwen3_moe")
    block.expert_impl = "fast"  # type: ignore[assignment]
    with pytest.raises(ValueError, match="expert_impl"):
        block(_x(3))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("case", FAMILIES)
def test_grouped_mm_cuda_bf16_matches_reference(case: str) -> None:
    """``torch._grouped_mm`` (CUTLASS on sm90+) against the per-expert loop, both in bf16 and
    both within bf16 rounding of an fp32 reference; one expert gets no token."""
    dev = torch.device("cuda")
    if torch.cuda.get_device_capability(dev) >= (9, 0):
        assert moe._grouped_mm_runs(dev, torch.bfloat16)
    block = _block(case, hidden_size=256, moe_intermediate_size=128, num_experts=8).to(dev)
    t = 300
    gen = torch.Generator().manual_seed(7)
    ids = torch.stack([1 + torch.randperm(7, generator=gen)[:2] for _ in range(t)]).to(dev)  # expert 0 unused
    x = torch.randn(t, 256, generator=gen).to(dev)
    hook = ReplaceIds(ids)
    out32, gx32, grads32 = _run(block, x, "reference", hook)
    block.to(torch.bfloat16)
    results = {impl: _run(block, x.bfloat16(), impl, hook) for impl in ("reference", "grouped")}
    for impl, (out, gx, grads) in results.items():
        for name, got, want in [("out", out, out32), ("x.grad", gx, gx32)] + [
            (n, grads[n], g) for n, g in grads32.items()
        ]:
            assert got is not None and want is not None, (impl, name)
            scale = want.abs().max().clamp_min(1e-3)
            err = (got.float() - want).abs().max() / scale
            assert err < 3e-2, (impl, name, float(err))
    grads = results["grouped"][2]
    for proj in ("gate_proj", "up_proj", "down_proj"):
        g = grads[f"experts.0.{proj}.weight"]
        assert g is not None and not g.any()


def test_expert_dispatch_replaces_the_local_computation_in_every_mode() -> None:
    """Expert parallelism plugs in through ``expert_dispatch``: every rank must take part in each
    forward, so it runs whatever the mode (training, few-token no-grad, batch-invariant)."""
    block = _block("qwen3_moe")
    calls: list[int] = []

    def dispatch(b: SparseMoeBlock, x: torch.Tensor, ids: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        calls.append(x.shape[0])
        return b._experts_reference(x, ids, w)

    want = block(_x(5))
    block.expert_dispatch = dispatch
    assert_reduction_close(block(_x(5)).detach(), want.detach(), _terms(block, 5))
    with torch.no_grad():
        block(_x(1))
    with batch_invariant.batch_invariant():
        block(_x(2))
    assert calls == [5, 1, 2]
