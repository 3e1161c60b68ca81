"""Read a GGUF file (llama.cpp's format) into an HF-style config dict and HF-named tensors.

Quantized tensors are dequantized to float32 with the ``gguf`` package. llama.cpp stores the
q/k projections of ``llama`` models with the rotary halves interleaved; they are permuted back
here so the tensors equal those of the original Hugging Face checkpoint layout.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from miles.models.spec import UnsupportedModelError

# GGUF general.architecture -> (HF architecture, HF model_type)
_ARCHS: dict[str, tuple[str, str]] = {
    "llama": ("LlamaForCausalLM", "llama"),
    "qwen2": ("Qwen2ForCausalLM", "qwen2"),
    "qwen3": ("Qwen3ForCausalLM", "qwen3"),
    "qwen2moe": ("Qwen2MoeForCausalLM", "qwen2_moe"),
    "qwen3moe": ("Qwen3MoeForCausalLM", "qwen3_moe"),
}

_TOP_LEVEL = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_PER_LAYER = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "ffn_gate_inp": "mlp.gate",
    "ffn_gate_inp_shexp": "mlp.shared_expert_gate",
    "ffn_gate_shexp": "mlp.shared_expert.gate_proj",
    "ffn_up_shexp": "mlp.shared_expert.up_proj",
    "ffn_down_shexp": "mlp.shared_expert.down_proj",
}
_EXPERTS = {"ffn_gate_exps": "gate_proj", "ffn_up_exps": "up_proj", "ffn_down_exps": "down_proj"}
_LAYER_RE = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.(weight|bias)$")


def _reader(path: Path) -> Any:
    stat = path.stat()
    return _cached_reader(str(path.resolve()), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=2)
def _cached_reader(path: str, mtime_ns: int, size: int) -> Any:
    # Parsing the metadata (the tokenizer vocabulary) takes seconds; config and tensors share one
    # parse. The reader memory-maps the file, so keeping it costs address space, not RAM.
    import gguf

    return gguf.GGUFReader(path)


def _field(reader: Any, key: str, default: Any = None) -> Any:
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def read_gguf_config(path: Path) -> dict[str, Any]:
    """Build a config.json-shaped dict from the GGUF metadata."""
    reader = _reader(path)
    arch = _field(reader, "general.architecture")
    if arch not in _ARCHS:
        raise UnsupportedModelError(
            f"{path}: GGUF architecture {arch!r} is not supported; supported: {', '.join(_ARCHS)}"
        )
    hf_arch, model_type = _ARCHS[arch]

    def meta(key: str, default: Any = None) -> Any:
        return _field(reader, f"{arch}.{key}", default)

    heads = int(meta("attention.head_count"))
    hidden = int(meta("embedding_length"))
    tokens = _field(reader, "tokenizer.ggml.tokens") or []
    names = {t.name for t in reader.tensors}
    cfg: dict[str, Any] = {
        "architectures": [hf_arch],
        "model_type": model_type,
        "vocab_size": int(meta("vocab_size", len(tokens))),
        "hidden_size": hidden,
        "intermediate_size": int(meta("feed_forward_length", 0)),
        "num_hidden_layers": int(meta("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(meta("attention.head_count_kv", heads)),
        "head_dim": int(meta("attention.key_length", hidden // heads)),
        "rms_norm_eps": float(meta("attention.layer_norm_rms_epsilon", 1e-6)),
        "max_position_embeddings": int(meta("context_length", 4096)),
        "rope_theta": float(meta("rope.freq_base", 10000.0)),
        "tie_word_embeddings": "output.weight" not in names,
        "hidden_act": "silu",
        "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _field(reader, "tokenizer.ggml.eos_token_id"),
    }
    scaling = meta("rope.scaling.type")
    if scaling and scaling != "none":
        cfg["rope_scaling"] = {
            "rope_type": scaling,
            "factor": float(meta("rope.scaling.factor", 1.0)),
            "original_max_position_embeddings": meta("rope.scaling.original_context_length"),
        }
    if arch in ("qwen2moe", "qwen3moe"):
        cfg["num_experts"] = int(meta("expert_count"))
        cfg["num_experts_per_tok"] = int(meta("expert_used_count"))
        cfg["moe_intermediate_size"] = int(meta("expert_feed_forward_length"))
        cfg["norm_topk_prob"] = arch == "qwen3moe"
        if arch == "qwen2moe":
            cfg["shared_expert_intermediate_size"] = int(meta("expert_shared_feed_forward_length", 0))
    return cfg


def _unpermute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    # Inverse of llama.cpp's convert permute: (h, 2, d/2, ...) <- (h, d/2, 2, ...).
    shape = w.shape
    return w.reshape(n_heads, shape[0] // n_heads // 2, 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def iter_gguf_tensors(path: Path, cfg: dict[str, Any]) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(hf_name, float32 tensor)`` for every tensor of the file, dequantized."""
    import gguf

    reader = _reader(path)
    permute = cfg["model_type"] == "llama"
    for t in reader.tensors:
        data = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
        tensor = torch.from_numpy(data.reshape(tuple(reversed([int(x) for x in t.shape]))).copy())
        if t.name == "rope_freqs.weight":
            raise UnsupportedModelError(
                f"{path}: per-dimension rope frequency factors (rope_freqs, Llama 3.1-style scaling in GGUF) "
                "are not supported; load the Hugging Face checkpoint instead"
            )
        if t.name in _TOP_LEVEL:
            yield _TOP_LEVEL[t.name], tensor
            continue
        m = _LAYER_RE.match(t.name)
        if m is None:
            yield t.name, tensor  # unknown: surfaces as an 'unexpected tensor' error on load
            continue
        layer, kind, suffix = m.group(1), m.group(2), m.group(3)
        prefix = f"model.layers.{layer}"
        if kind in _EXPERTS:
            for e in range(tensor.shape[0]):
                yield f"{prefix}.mlp.experts.{e}.{_EXPERTS[kind]}.{suffix}", tensor[e]
            continue
        if kind not in _PER_LAYER:
            yield t.name, tensor
            continue
        if permute and kind == "attn_q":
            tensor = _unpermute(tensor, cfg["num_attention_heads"])
        elif permute and kind == "attn_k":
            tensor = _unpermute(tensor, cfg["num_key_value_heads"])
        yield f"{prefix}.{_PER_LAYER[kind]}.{suffix}", tensor
