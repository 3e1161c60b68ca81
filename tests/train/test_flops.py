"""MFU pieces: active parameters (MoE experts by top_k / num_experts) and the measured peak."""

from __future__ import annotations

import pytest
import torch

from miles.models.loading import build_model
from miles.models.spec import ModelSpec
from miles.train.flops import active_params, matmul_peak_flops, mfu

MOE = dict(architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe", vocab_size=64, hidden_size=16,
           intermediate_size=32, moe_intermediate_size=8, num_hidden_layers=2, num_attention_heads=2,
           num_key_value_heads=1, head_dim=8, num_experts=8, num_experts_per_tok=2, norm_topk_prob=True,
           tie_word_embeddings=False, max_position_embeddings=64, rms_norm_eps=1e-6, rope_theta=1e4)  # fmt: skip


def test_active_params_count_a_quarter_of_the_experts():
    model = build_model(ModelSpec.from_hf_config(MOE))
    total = sum(p.numel() for p in model.parameters())
    experts = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    assert experts > 0 and active_params(model) == total - experts + experts // 4


def test_peak_is_measured_and_cached():
    peak = matmul_peak_flops(torch.device("cpu"), torch.float32)
    assert peak > 1e8 and matmul_peak_flops(torch.device("cpu"), torch.float32) == peak
    assert mfu(1000, 10, 1.0, 6e4) == pytest.approx(1.0) and mfu(1000, 10, 0.0, 6e4) == 0.0
