"""Shared model definitions: one per architecture, used by the trainer and the engine."""

from miles.models.attention import AttentionContext, VarlenContext, positions_from_cu_seqlens
from miles.models.moe import RoutingHook
from miles.models.spec import SUPPORTED_ARCHITECTURES, ModelSpec, UnsupportedModelError
from miles.models.transformer import CausalLM

__all__ = [
    "SUPPORTED_ARCHITECTURES",
    "AttentionContext",
    "CausalLM",
    "ModelSpec",
    "RoutingHook",
    "UnsupportedModelError",
    "VarlenContext",
    "positions_from_cu_seqlens",
]
