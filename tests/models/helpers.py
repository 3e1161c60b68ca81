"""Shared helpers of the model tests: a GGUF writer following llama.cpp's converter conventions."""

from __future__ import annotations

import numpy as np
import pytest
import torch

_LAYER = {
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "mlp.gate": "ffn_gate_inp",
}


def _permute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(model, arch: str, path) -> None:
    """Write ``model`` as a GGUF file the way llama.cpp's converter does (tensor names, stacked
    experts, the q/k row permutation of ``llama``). Skips the calling test without ``gguf``."""
    gguf = pytest.importorskip("gguf")
    spec = model.spec
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(spec.num_hidden_layers)
    w.add_context_length(spec.max_position_embeddings)
    w.add_embedding_length(spec.hidden_size)
    w.add_feed_forward_length(spec.intermediate_size)
    w.add_head_count(spec.num_attention_heads)
    w.add_head_count_kv(spec.num_key_value_heads)
    w.add_key_length(spec.head_dim)
    w.add_rope_freq_base(spec.rope.theta)
    w.add_layer_norm_rms_eps(spec.rms_norm_eps)
    w.add_vocab_size(spec.vocab_size)
    if spec.is_moe:
        w.add_expert_count(spec.num_experts)
        w.add_expert_used_count(spec.num_experts_per_tok)
        w.add_expert_feed_forward_length(spec.moe_intermediate_size)
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    out: dict[str, torch.Tensor] = {
        "token_embd.weight": sd.pop("model.embed_tokens.weight"),
        "output_norm.weight": sd.pop("model.norm.weight"),
    }
    lm_head = sd.pop("lm_head.weight")
    if not spec.tie_word_embeddings:
        out["output.weight"] = lm_head
    for layer in range(spec.num_hidden_layers):
        pre = f"model.layers.{layer}."
        if spec.is_moe_layer(layer):
            for kind, gname in (
                ("gate_proj", "ffn_gate_exps"),
                ("up_proj", "ffn_up_exps"),
                ("down_proj", "ffn_down_exps"),
            ):
                out[f"blk.{layer}.{gname}.weight"] = torch.stack(
                    [sd.pop(f"{pre}mlp.experts.{e}.{kind}.weight") for e in range(spec.num_experts)]
                )
        for name in [k for k in sd if k.startswith(pre)]:
            stem, suffix = name[len(pre) :].rsplit(".", 1)
            tensor = sd.pop(name)
            if arch == "llama" and stem == "self_attn.q_proj":
                tensor = _permute(tensor, spec.num_attention_heads)
            if arch == "llama" and stem == "self_attn.k_proj":
                tensor = _permute(tensor, spec.num_key_value_heads)
            out[f"blk.{layer}.{_LAYER[stem]}.{suffix}"] = tensor
    assert not sd, f"writer left tensors unmapped: {sorted(sd)}"
    for name, tensor in out.items():
        w.add_tensor(name, tensor.float().numpy().astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
