"""``WeightUpdater`` cost: one walk of the module tree per update, not one per tensor (an MoE sends
thousands of expert tensors; a walk per tensor made a sync quadratic in their number)."""

from __future__ import annotations

import torch

from miles.engine.weight_load import WeightUpdater
from miles.models.loading import build_model
from miles.models.spec import ModelSpec

CONFIG = dict(architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe", vocab_size=64, hidden_size=16,
              intermediate_size=32, moe_intermediate_size=8, num_hidden_layers=2, num_attention_heads=2,
              num_key_value_heads=1, head_dim=8, num_experts=16, num_experts_per_tok=2, norm_topk_prob=True,
              tie_word_embeddings=False, max_position_embeddings=64, rms_norm_eps=1e-6, rope_theta=1e4)  # fmt: skip


def test_an_update_walks_the_parameters_once_not_per_tensor(monkeypatch):
    source, target = (build_model(ModelSpec.from_hf_config(CONFIG)) for _ in range(2))
    named = [(n, p.detach().clone()) for n, p in source.named_parameters()]
    walks = 0
    real = type(target).named_parameters

    def counting(self, *args, **kwargs):
        nonlocal walks
        walks += 1
        return real(self, *args, **kwargs)

    monkeypatch.setattr(type(target), "named_parameters", counting)
    updater = WeightUpdater(target)
    assert updater.apply(named) == len(named) > 100
    assert walks <= 2, f"{walks} walks of the module tree for {len(named)} tensors"
    monkeypatch.undo()
    for (name, tensor), (_, p) in zip(named, target.named_parameters()):
        assert torch.equal(p, tensor), name
    walks = 0
    monkeypatch.setattr(type(target), "named_parameters", counting)
    updater.begin()
    updater.stage(named[: len(named) // 2])
    updater.stage(named[len(named) // 2 :])
    assert updater.commit() == len(named) and walks <= 6
