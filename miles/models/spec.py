"""``ModelSpec``: the architecture facts Miles needs, read from a Hugging Face ``config.json``.

Parsing the plain JSON dict (not a ``transformers`` config object) keeps the models importable
without transformers and makes every unsupported option an explicit error here, at load time,
rather than a silent numerical difference later.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

# Architecture names in config.json -> Miles family; the family module assembles the model.
SUPPORTED_ARCHITECTURES: dict[str, str] = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "Qwen2MoeForCausalLM": "qwen2_moe",
    "Qwen3MoeForCausalLM": "qwen3_moe",
}
_MODEL_TYPES: dict[str, str] = {
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "qwen2_moe": "qwen2_moe",
    "qwen3_moe": "qwen3_moe",
}
ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "llama3")


class UnsupportedModelError(ValueError):
    """The checkpoint's architecture or one of its options is not implemented by Miles."""


@dataclass(frozen=True)
class RopeSpec:
    """Rotary embedding parameters (HF ``rope_parameters`` / legacy ``rope_theta`` + ``rope_scaling``)."""

    theta: float = 10000.0
    type: str = "default"
    factor: float | None = None
    original_max_position_embeddings: int | None = None
    low_freq_factor: float | None = None  # llama3
    high_freq_factor: float | None = None  # llama3
    beta_fast: float = 32.0  # yarn
    beta_slow: float = 1.0  # yarn
    mscale: float | None = None  # yarn
    mscale_all_dim: float | None = None  # yarn
    attention_factor: float | None = None  # yarn
    truncate: bool = True  # yarn


@dataclass(frozen=True)
class ModelSpec:
    """Architecture of one causal LM. ``family`` picks the assembly module."""

    family: str
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    rope: RopeSpec
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    qk_norm: bool = False
    # MoE (num_experts == 0 means dense)
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = False
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()
    shared_expert_intermediate_size: int = 0
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    # The original config.json contents, written back unchanged (but dtype) on save.
    hf_config: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    def is_moe_layer(self, layer_idx: int) -> bool:
        """Same rule as HF Qwen2/3-MoE: sparse unless listed in ``mlp_only_layers``, every Nth layer."""
        return (
            self.is_moe
            and layer_idx not in self.mlp_only_layers
            and (layer_idx + 1) % self.decoder_sparse_step == 0
        )

    @property
    def moe_layer_indices(self) -> tuple[int, ...]:
        return tuple(i for i in range(self.num_hidden_layers) if self.is_moe_layer(i))

    @classmethod
    def from_hf_config(cls, cfg: Mapping[str, Any]) -> ModelSpec:
        """Parse a config.json dict; raise ``UnsupportedModelError`` naming what is not supported."""
        family, arch = _family_of(cfg)
        get = cfg.get

        def need(key: str) -> Any:
            if key not in cfg:
                raise UnsupportedModelError(f"config.json of a {arch} model has no '{key}'")
            return cfg[key]

        if get("hidden_act", "silu") != "silu":
            raise UnsupportedModelError(f"hidden_act={get('hidden_act')!r} is not supported (only 'silu')")
        if get("use_sliding_window", False):
            raise UnsupportedModelError("use_sliding_window=true is not supported (sliding-window attention)")
        window = get("sliding_window")
        if family == "llama" and window is not None and window < int(get("max_position_embeddings", 4096)):
            raise UnsupportedModelError(
                f"sliding_window={window} (shorter than max_position_embeddings) is not supported"
            )
        if get("mlp_bias", False):
            raise UnsupportedModelError("mlp_bias=true is not supported")
        heads = int(need("num_attention_heads"))
        hidden = int(need("hidden_size"))
        eos = get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
        is_moe_family = family in ("qwen2_moe", "qwen3_moe")
        num_experts = int(get("num_experts", get("num_local_experts", 0)) or 0) if is_moe_family else 0
        return cls(
            family=family,
            architecture=arch,
            vocab_size=int(need("vocab_size")),
            hidden_size=hidden,
            intermediate_size=int(need("intermediate_size")),
            num_hidden_layers=int(need("num_hidden_layers")),
            num_attention_heads=heads,
            num_key_value_heads=int(get("num_key_value_heads") or heads),
            head_dim=int(get("head_dim") or hidden // heads),
            rms_norm_eps=float(get("rms_norm_eps", 1e-6)),
            max_position_embeddings=int(get("max_position_embeddings", 4096)),
            rope=_rope_of(cfg),
            tie_word_embeddings=bool(get("tie_word_embeddings", False)),
            # Qwen2 always has q/k/v biases (its HF module hard-codes them); others follow the flag.
            attention_bias=family in ("qwen2", "qwen2_moe") or bool(get("attention_bias", False)),
            qk_norm=family in ("qwen3", "qwen3_moe"),
            num_experts=num_experts,
            num_experts_per_tok=int(get("num_experts_per_tok", 0) or 0) if num_experts else 0,
            moe_intermediate_size=int(get("moe_intermediate_size", 0) or 0) if num_experts else 0,
            norm_topk_prob=bool(get("norm_topk_prob", False)),
            decoder_sparse_step=int(get("decoder_sparse_step", 1) or 1),
            mlp_only_layers=tuple(int(i) for i in (get("mlp_only_layers") or ())),
            shared_expert_intermediate_size=int(get("shared_expert_intermediate_size", 0) or 0)
            if family == "qwen2_moe"
            else 0,
            bos_token_id=get("bos_token_id"),
            eos_token_ids=eos_ids,
            hf_config=dict(cfg),
        )


def _family_of(cfg: Mapping[str, Any]) -> tuple[str, str]:
    archs = cfg.get("architectures") or []
    for arch in archs:
        if arch in SUPPORTED_ARCHITECTURES:
            return SUPPORTED_ARCHITECTURES[arch], arch
    model_type = cfg.get("model_type")
    if not archs and model_type in _MODEL_TYPES:
        return _MODEL_TYPES[model_type], str(model_type)
    named = ", ".join(archs) if archs else f"model_type={model_type!r}"
    raise UnsupportedModelError(
        f"unsupported architecture {named}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
    )


def _rope_of(cfg: Mapping[str, Any]) -> RopeSpec:
    # transformers >= 5 writes `rope_parameters` (theta inside); older files `rope_theta` + `rope_scaling`.
    params = dict(cfg.get("rope_parameters") or {})
    scaling = dict(cfg.get("rope_scaling") or {})
    params = {**scaling, **params}
    theta = float(params.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    rope_type = params.get("rope_type", params.get("type", "default")) or "default"
    if rope_type not in ROPE_TYPES:
        raise UnsupportedModelError(
            f"rope type {rope_type!r} is not supported; supported: {', '.join(ROPE_TYPES)}"
        )
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise UnsupportedModelError("partial_rotary_factor != 1 is not supported")
    orig = params.get("original_max_position_embeddings")
    if rope_type in ("linear", "dynamic", "llama3") and params.get("factor") is None:
        raise UnsupportedModelError(f"rope type {rope_type!r} needs a 'factor'")
    if rope_type == "llama3":
        for key in ("low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
            if params.get(key) is None:
                raise UnsupportedModelError(f"rope type 'llama3' needs '{key}'")
    if rope_type == "yarn" and orig is None:
        orig = cfg.get("max_position_embeddings")
    return RopeSpec(
        theta=theta,
        type=rope_type,
        factor=None if params.get("factor") is None else float(params["factor"]),
        original_max_position_embeddings=None if orig is None else int(orig),
        low_freq_factor=params.get("low_freq_factor"),
        high_freq_factor=params.get("high_freq_factor"),
        beta_fast=float(params.get("beta_fast") or 32.0),
        beta_slow=float(params.get("beta_slow") or 1.0),
        mscale=params.get("mscale"),
        mscale_all_dim=params.get("mscale_all_dim"),
        attention_factor=params.get("attention_factor"),
        truncate=bool(params.get("truncate", True)),
    )
