"""Building blocks shared by every family: RMSNorm, SwiGLU MLP, attention.

Attribute names equal Hugging Face's, so ``state_dict()`` keys match checkpoint keys.
All modules work on flat token tensors ``[T, hidden]``; sequence layout and KV caches belong to
the ``AttentionContext`` passed in.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from miles.kernels import batch_invariant, fused
from miles.models.attention import AttentionContext
from miles.models.rope import apply_rotary
from miles.models.spec import ModelSpec


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters and state-dict keys) that runs the batch-invariant kernel
    while :func:`miles.kernels.batch_invariant.enabled` (true-on-policy / deterministic mode)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if batch_invariant.enabled():
            return batch_invariant.linear(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)


class RMSNorm(nn.Module):
    """``y = w * x / sqrt(mean(x^2) + eps)``, computed in fp32 and cast back (as HF Llama)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.inference_kernels = False  # see use_inference_kernels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if batch_invariant.enabled():  # a reduction's launch shape can depend on the row count
            return batch_invariant.rowwise(self._norm, x)
        if self.inference_kernels and (k := fused.kernels_for(x)) is not None:
            return k.rms_norm(x, self.weight, self.eps)
        return self._norm(x)

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)


class SwiGLUMLP(nn.Module):
    """``down(silu(gate(x)) * up(x))``; also the expert and shared-expert unit of MoE layers."""

    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_proj = Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Attention(nn.Module):
    """Multi-head attention with GQA, optional q/k/v bias (Qwen2) and q/k RMSNorm (Qwen3).

    ``forward(x [T, hidden], cos, sin, ctx) -> [T, hidden]``; the score computation itself is
    delegated to ``ctx.attend`` (packed varlen for the trainer, paged cache for the engine).
    """

    def __init__(self, spec: ModelSpec, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = spec.num_attention_heads
        self.num_kv_heads = spec.num_key_value_heads
        self.head_dim = spec.head_dim
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_heads}) must be a multiple of num_key_value_heads ({self.num_kv_heads})"
            )
        self.scale = self.head_dim**-0.5
        h, d, bias = spec.hidden_size, self.head_dim, spec.attention_bias
        self.q_proj = Linear(h, self.num_heads * d, bias=bias)
        self.k_proj = Linear(h, self.num_kv_heads * d, bias=bias)
        self.v_proj = Linear(h, self.num_kv_heads * d, bias=bias)
        self.o_proj = Linear(self.num_heads * d, h, bias=False)
        self.q_norm: RMSNorm | None = RMSNorm(d, spec.rms_norm_eps) if spec.qk_norm else None
        self.k_norm: RMSNorm | None = RMSNorm(d, spec.rms_norm_eps) if spec.qk_norm else None
        self.inference_kernels = False  # see use_inference_kernels

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, ctx: AttentionContext
    ) -> torch.Tensor:
        t = x.shape[0]
        q = self.q_proj(x).view(t, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(t, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(t, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.inference_kernels and (kern := fused.kernels_for(q)) is not None:
            q, k = kern.rotary(q, cos, sin), kern.rotary(k, cos, sin)
        else:
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        out = ctx.attend(self.layer_idx, q, k, v, self.scale)
        return self.o_proj(out.reshape(t, self.num_heads * self.head_dim))


def use_inference_kernels(model: nn.Module, on: bool = True) -> None:
    """Let ``model``'s RMSNorms and rotary embeddings run the fused kernels of
    ``miles.kernels.fused`` in its no-grad CUDA forwards (the engine's model; never the
    trainer's)."""
    for m in model.modules():
        if isinstance(m, RMSNorm | Attention):
            m.inference_kernels = on
