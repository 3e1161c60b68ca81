"""Miles models equal transformers on the same weights (CPU, fp32)."""

from __future__ import annotations

import pytest
import torch

from miles.models import VarlenContext, positions_from_cu_seqlens
from miles.models.generation import ContiguousKVContext, generate_ids
from miles.models.loading import load_model
from tests.models.conftest import CASES


def _cu(*lengths: int) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)


@pytest.mark.parametrize("name", sorted(CASES))
def test_logits_match_transformers(tiny_checkpoints, name):
    hf, path = tiny_checkpoints[name]
    ours = load_model(path)
    # 40 tokens: beyond max_position_embeddings for the dynamic-NTK case, so its scaling is active.
    ids = torch.randint(0, 128, (40,), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(ids[None]).logits[0]
        got = ours.forward_packed(ids, _cu(40))
    assert (ref - got).abs().max().item() <= 1e-5


@pytest.mark.parametrize("name", ["llama", "qwen3", "qwen3_moe", "qwen2_moe_shared_expert"])
def test_packed_batch_equals_each_sequence_alone(tiny_checkpoints, name):
    _, path = tiny_checkpoints[name]
    model = load_model(path)
    gen = torch.Generator().manual_seed(2)
    seqs = [torch.randint(0, 128, (n,), generator=gen) for n in (7, 19, 3)]
    with torch.no_grad():
        packed = model.forward_packed(torch.cat(seqs), _cu(7, 19, 3))
        alone = torch.cat([model.forward_packed(s, _cu(len(s))) for s in seqs])
    assert (packed - alone).abs().max().item() <= 1e-5


@pytest.mark.parametrize("name", ["llama", "qwen3_moe"])
def test_cached_decode_equals_full_recompute(tiny_checkpoints, name):
    _, path = tiny_checkpoints[name]
    model = load_model(path)
    prompts = [[1, 5, 9, 3], [7, 2]]
    out = generate_ids(model, prompts, max_new_tokens=6)
    for prompt, new in zip(prompts, out):
        seq = list(prompt)
        for tok in new:
            with torch.no_grad():
                logits = model.forward_packed(torch.tensor(seq), _cu(len(seq)))
            assert int(logits[-1].argmax()) == tok
            seq.append(tok)


def test_contiguous_context_rejects_a_wrong_plan(tiny_checkpoints):
    ctx = ContiguousKVContext(num_seqs=2, num_layers=2)
    with pytest.raises(ValueError, match="got 3 lengths for 2 sequences"):
        ctx.plan([1, 2, 3])


def test_varlen_context_validates_boundaries():
    with pytest.raises(ValueError, match="start at 0"):
        VarlenContext(torch.tensor([1, 4]))
    with pytest.raises(ValueError, match="non-decreasing"):
        VarlenContext(torch.tensor([0, 4, 2]))
    assert positions_from_cu_seqlens(_cu(3, 2)).tolist() == [0, 1, 2, 0, 1]


def test_forward_rejects_a_batched_layout(tiny_checkpoints):
    _, path = tiny_checkpoints["llama"]
    model = load_model(path)
    with pytest.raises(ValueError, match="1-D"):
        model(
            torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 3, dtype=torch.long), VarlenContext(_cu(3, 3))
        )


def test_routing_hook_sees_and_replaces_choices(tiny_checkpoints):
    _, path = tiny_checkpoints["qwen3_moe"]
    model = load_model(path)
    ids = torch.randint(0, 128, (12,), generator=torch.Generator().manual_seed(3))

    class Record:
        def __init__(self):
            self.seen = {}

        def route(self, layer_idx, router_logits, topk_ids):
            self.seen[layer_idx] = topk_ids.clone()
            return topk_ids

    class Replay:
        def __init__(self, chosen):
            self.chosen = chosen

        def route(self, layer_idx, router_logits, topk_ids):
            return self.chosen[layer_idx]

    rec = Record()
    with torch.no_grad():
        base = model.forward_packed(ids, _cu(12), rec)
        same = model.forward_packed(ids, _cu(12), Replay(rec.seen))
        flipped = {k: v.flip(-1) for k, v in rec.seen.items()}  # same sets: same output
        swapped = {k: (v + 1) % 4 for k, v in rec.seen.items()}  # other experts: other output
        flip_out = model.forward_packed(ids, _cu(12), Replay(flipped))
        swap_out = model.forward_packed(ids, _cu(12), Replay(swapped))
    assert sorted(rec.seen) == [0, 1]
    assert torch.equal(base, same)
    assert (base - flip_out).abs().max() <= 1e-5
    assert (base - swap_out).abs().max() > 1e-3


def test_router_gets_gradient_under_replay(tiny_checkpoints):
    _, path = tiny_checkpoints["qwen3_moe"]
    model = load_model(path)
    ids = torch.randint(0, 128, (10,), generator=torch.Generator().manual_seed(4))

    class FixedReplay:
        def route(self, layer_idx, router_logits, topk_ids):
            return torch.tensor([[0, 1]] * topk_ids.shape[0])

    model.forward_packed(ids, _cu(10), FixedReplay()).sum().backward()
    gate = model.model.layers[0].mlp.gate.weight
    assert gate.grad is not None and gate.grad.abs().sum() > 0


def test_every_expert_gets_a_gradient_even_without_tokens(tiny_checkpoints):
    """Regression: experts no token was routed to had grad None, so data-parallel ranks reduced
    different gradient sets (gloo size mismatch; silent mix-ups on NCCL)."""
    _, path = tiny_checkpoints["qwen3_moe"]
    model = load_model(path).train()
    ids = torch.tensor([3])  # one token: top-2 of 4 experts leaves two experts unused
    model.forward_packed(ids, _cu(1)).sum().backward()
    for layer in model.model.layers:
        for expert in layer.mlp.experts:
            assert all(p.grad is not None for p in expert.parameters())
