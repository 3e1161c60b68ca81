"""Building blocks shared by every family: RMSNorm, SwiGLU MLP, attention.

Attribute names equal Hugging Face's, so ``state_dict()`` keys match checkpoint keys.
All modules work on flat token tensors ``[T, hidden]``; sequence layout and KV caches belong to
the ``AttentionContext`` passed in.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from miles.kernels import batch_invariant, compiled, fused
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
        if compiled.enabled_for(x):
            return compiled.call(rms_norm, x, self.weight, self.eps)
        return self._norm(x)

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``RMSNorm``'s arithmetic (a pure function: the trainer's CUDA path compiles it)."""
    dtype = x.dtype
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(dtype)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


class SwiGLUMLP(nn.Module):
    """``down(silu(gate(x)) * up(x))``; also the expert and shared-expert unit of MoE layers."""

    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_proj = Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = Linear(intermediate_size, hidden_size, bias=False)
        self.packed = Packed()  # see pack_projections

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.packed.weights((self.gate_proj, self.up_proj))
        if gate_up is None:
            g, u = self.gate_proj(x), self.up_proj(x)
            if compiled.enabled_for(g):
                return self.down_proj(compiled.call(silu_mul, g, u))
            return self.down_proj(silu_mul(g, u))
        h = F.linear(x, gate_up[0])  # one GEMM for both
        if (k := fused.kernels_for(h)) is not None:
            return self.down_proj(k.silu_mul(h))
        n = h.shape[-1] // 2
        return self.down_proj(F.silu(h[..., :n]) * h[..., n:])


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
        self.packed = Packed()  # see pack_projections

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, ctx: AttentionContext
    ) -> torch.Tensor:
        t, hq, hkv, d = x.shape[0], self.num_heads, self.num_kv_heads, self.head_dim
        qkv = self.packed.weights((self.q_proj, self.k_proj, self.v_proj))
        if qkv is not None:  # one GEMM; q, k and v are strided views of its output
            out = F.linear(x, qkv[0], qkv[1])
            q = out[:, : hq * d].view(t, hq, d)
            k = out[:, hq * d : (hq + hkv) * d].view(t, hkv, d)
            v = out[:, (hq + hkv) * d :].view(t, hkv, d)
        else:
            q = self.q_proj(x).view(t, hq, d)
            k = self.k_proj(x).view(t, hkv, d)
            v = self.v_proj(x).view(t, hkv, d)
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.inference_kernels and (kern := fused.kernels_for(q)) is not None:
            q, k = kern.rotary(q, cos, sin), kern.rotary(k, cos, sin)
        elif compiled.enabled_for(q):
            q, k = compiled.call(apply_rotary, q, cos, sin), compiled.call(apply_rotary, k, cos, sin)
        else:
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        out = ctx.attend(self.layer_idx, q, k, v, self.scale)
        return self.o_proj(out.reshape(t, self.num_heads * self.head_dim))


class Packed:
    """The weights (and biases) of several ``Linear``s stored in one tensor each, concatenated
    along the output dimension, whose parameters are views of it: one GEMM instead of several
    (a decode step of a small model is bound by its number of kernels), while the parameters,
    their names and in-place updates (``copy_``) stay as they were. Used only where it is valid:
    when the parameters still view the packed storage (a memory release/resume or any other
    reassignment of ``.data`` breaks that, and the layer falls back to its separate GEMMs), in
    no-grad forwards outside the deterministic mode (whose kernels are per projection)."""

    def __init__(self) -> None:
        self.weight: torch.Tensor | None = None
        self.bias: torch.Tensor | None = None
        self._ptrs: tuple[int, ...] = ()

    def pack(self, linears: tuple[nn.Linear, ...]) -> None:
        """Pack ``linears`` (a no-op when they still view this packed storage: two engines may
        share a model, and repacking would move memory a captured CUDA graph reads)."""
        if self.weight is not None and tuple(m.weight.data_ptr() for m in linears) == self._ptrs:
            return
        with torch.no_grad():
            self.weight = torch.cat([m.weight.data for m in linears])
            has_bias = [m.bias is not None for m in linears]
            if any(has_bias) and not all(has_bias):
                raise ValueError("cannot pack linears of which only some have a bias")
            self.bias = (
                torch.cat([m.bias.data for m in linears if m.bias is not None]) if all(has_bias) else None
            )
        start = 0
        for m in linears:
            n = m.weight.shape[0]
            m.weight.data = self.weight[start : start + n]
            if self.bias is not None and m.bias is not None:
                m.bias.data = self.bias[start : start + n]
            start += n
        self._ptrs = tuple(m.weight.data_ptr() for m in linears)

    def drop(self) -> None:
        self.weight, self.bias, self._ptrs = None, None, ()

    def weights(self, linears: tuple[nn.Linear, ...]) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """``(weight, bias)`` to run instead of ``linears`` now, or ``None``."""
        if self.weight is None or torch.is_grad_enabled() or batch_invariant.enabled():
            return None
        if tuple(m.weight.data_ptr() for m in linears) != self._ptrs:
            return None  # a parameter was reassigned since: the packed copy is stale
        return self.weight, self.bias


def pack_projections(model: nn.Module, on: bool = True) -> None:
    """Pack every attention's q/k/v and every dense MLP's gate/up projections (``on=False``:
    drop the packed tensors, e.g. before the parameters' memory is released). The engine's
    model only: the trainer's parameters must stay separate tensors (FSDP shards them)."""
    groups: list[tuple[Packed, tuple[nn.Linear, ...]]] = []
    for m in model.modules():
        if isinstance(m, Attention):
            groups.append((m.packed, (m.q_proj, m.k_proj, m.v_proj)))
    for layer in getattr(getattr(model, "model", None), "layers", []):
        mlp = getattr(layer, "mlp", None)
        if isinstance(mlp, SwiGLUMLP):  # dense layers only: MoE experts run grouped
            groups.append((mlp.packed, (mlp.gate_proj, mlp.up_proj)))
    for packed, linears in groups:
        if on:
            packed.pack(linears)
        else:
            packed.drop()


def use_inference_kernels(model: nn.Module, on: bool = True) -> None:
    """Let ``model``'s RMSNorms and rotary embeddings run the fused kernels of
    ``miles.kernels.fused`` in its no-grad CUDA forwards (the engine's model; never the
    trainer's)."""
    for m in model.modules():
        if isinstance(m, RMSNorm | Attention):
            m.inference_kernels = on
