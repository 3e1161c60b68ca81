"""Shared helpers of the engine tests."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch


class CharTokenizer:
    """Token ``i`` decodes to one printable character (enough for stop strings)."""

    eos_token_id = None

    def decode(self, ids):
        return "".join(chr(33 + i % 90) for i in ids)


def random_prompts(*lengths: int, seed: int = 0) -> list[list[int]]:
    """Seeded random token ids (below 128, the tiny models' vocabulary), one prompt per length."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 128, (n,), generator=gen).tolist() for n in lengths]


def run_to_end(engine: Any) -> dict[str, Any]:
    """Step ``engine`` until no request is left; each request's final output, by id."""
    done: dict[str, Any] = {}
    while engine.has_unfinished():
        done.update({o.request_id: o for o in engine.step() if o.finished})
    done.update({o.request_id: o for o in engine.step() if o.finished})  # aborts since the last step
    return done


def same_weights(model: Any) -> list[tuple[str, torch.Tensor]]:
    """Every parameter of ``model`` as ``(name, copy)``: a real weight update that changes no value."""
    return [(n, p.detach().clone()) for n, p in model.named_parameters()]


class ObserveRouting:
    """An observing ``RoutingHook``: keeps each layer's top-k ids."""

    def __init__(self) -> None:
        self.ids: dict[int, torch.Tensor] = {}

    def route(self, layer_idx: int, router_logits: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
        self.ids[layer_idx] = topk_ids.clone()
        return topk_ids


def routing_reference(model: Any, tokens: list[int]) -> np.ndarray:
    """``[len(tokens) - 1, moe_layers, k]``: a direct forward of all but the last token."""
    hook = ObserveRouting()
    ids = torch.tensor(tokens[:-1])
    with torch.no_grad():
        model.forward_packed(ids, torch.tensor([0, len(ids)], dtype=torch.int32), routing=hook)
    layers = model.spec.moe_layer_indices
    assert sorted(hook.ids) == list(layers)
    return torch.stack([hook.ids[i] for i in layers], dim=1).to(torch.int32).numpy()


def assert_same_expert_sets(got: np.ndarray, want: np.ndarray) -> None:
    """The same experts for every token and layer (their order within the top-k aside)."""
    assert got.shape == want.shape
    np.testing.assert_array_equal(np.sort(got, axis=-1), np.sort(want, axis=-1))
