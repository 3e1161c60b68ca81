"""Tiny random Hugging Face models of every supported family, saved to disk once per session."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

COMMON = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
)


def _cases() -> dict[str, tuple[str, dict[str, Any]]]:
    moe = dict(moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2)
    return {
        "llama": ("Llama", dict(COMMON, tie_word_embeddings=True)),
        "llama_untied_rope_llama3": (
            "Llama",
            dict(
                COMMON,
                rope_theta=500000.0,
                rope_scaling={
                    "rope_type": "llama3",
                    "factor": 8.0,
                    "low_freq_factor": 1.0,
                    "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 64,
                },
            ),
        ),
        "llama_rope_dynamic": (
            "Llama",
            dict(COMMON, max_position_embeddings=24, rope_scaling={"rope_type": "dynamic", "factor": 2.0}),
        ),
        "qwen2_rope_yarn": (
            "Qwen2",
            dict(
                COMMON,
                rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64},
            ),
        ),
        "qwen3": ("Qwen3", dict(COMMON, head_dim=16, tie_word_embeddings=True)),
        "qwen3_rope_linear": (
            "Qwen3",
            dict(COMMON, head_dim=16, rope_scaling={"rope_type": "linear", "factor": 2.0}),
        ),
        "qwen3_moe": ("Qwen3Moe", dict(COMMON, head_dim=16, norm_topk_prob=True, **moe)),
        "qwen3_moe_sparse_step": (
            "Qwen3Moe",
            dict(COMMON, num_hidden_layers=3, decoder_sparse_step=1, mlp_only_layers=[1], **moe),
        ),
        "qwen2_moe_shared_expert": ("Qwen2Moe", dict(COMMON, shared_expert_intermediate_size=48, **moe)),
    }


CASES = _cases()


def make_hf_model(prefix: str, kwargs: dict[str, Any], seed: int = 0) -> Any:
    import transformers

    config = getattr(transformers, f"{prefix}Config")(**kwargs)
    model = getattr(transformers, f"{prefix}ForCausalLM")(config).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        # Larger than HF's init so that differences are not hidden by tiny activations.
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return model


def save_case(name: str, path: Path) -> Path:
    """Save the tiny random HF model of ``CASES[name]`` to ``path`` (an HF directory); return it."""
    prefix, kwargs = CASES[name]
    make_hf_model(prefix, kwargs).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Any, Path]]:
    """name -> (transformers model, directory it was saved to)."""
    out = {}
    for name, (prefix, kwargs) in CASES.items():
        model = make_hf_model(prefix, kwargs)
        path = tmp_path_factory.mktemp(name)
        model.save_pretrained(path)
        out[name] = (model, path)
    return out
