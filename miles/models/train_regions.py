"""A dense decoder layer's two halves as pure functions, compiled whole on the trainer's CUDA path.

Compiling each elementwise chain on its own (RMSNorm, q/k norm, rotary, SwiGLU:
``miles.kernels.compiled``) left seven compiled calls per layer forward and seven backward, each
with its own guards and autograd wrapper on the host, and in a profiled Qwen3-0.6B step on an
H100 most of the GPU's idle time fell just before such a call's first kernel. Here a layer is two
calls each way:

- :func:`attention_inputs`: input RMSNorm, the q/k/v projections, q/k RMSNorm, rotary;
- :func:`mlp_residual`: the output projection and residual, post-attention RMSNorm, SwiGLU MLP
  and residual;

with ``ctx.attend`` between them (not compiled: the attention kernel is the context's). The GEMMs
stay cuBLAS calls inside the compiled graphs; the elementwise work around them fuses. Each
function runs, op for op, what the modules' eager forwards run (tests compare them), so the
compiled path changes only summation order and fusion.

Used when :func:`miles.kernels.compiled.enabled_for` holds (CUDA, autograd on, default mode).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from miles.models.layers import rms_norm, silu_mul
from miles.models.rope import apply_rotary


def attention_inputs(
    x: torch.Tensor,
    norm_weight: torch.Tensor,
    eps: float,
    wq: torch.Tensor,
    bq: torch.Tensor | None,
    wk: torch.Tensor,
    bk: torch.Tensor | None,
    wv: torch.Tensor,
    bv: torch.Tensor | None,
    q_norm: torch.Tensor | None,
    k_norm: torch.Tensor | None,
    qk_eps: float,
    cos: torch.Tensor,
    sin: torch.Tensor,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``x [T, hidden]`` (the residual stream) -> rotated ``q [T, Hq, D]``, ``k``/``v [T, Hkv, D]``."""
    h = rms_norm(x, norm_weight, eps)
    t = h.shape[0]
    q = F.linear(h, wq, bq).view(t, num_heads, head_dim)
    k = F.linear(h, wk, bk).view(t, num_kv_heads, head_dim)
    v = F.linear(h, wv, bv).view(t, num_kv_heads, head_dim)
    if q_norm is not None and k_norm is not None:
        q, k = rms_norm(q, q_norm, qk_eps), rms_norm(k, k_norm, qk_eps)
    return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v


def mlp_residual(
    x: torch.Tensor,
    attn: torch.Tensor,
    wo: torch.Tensor,
    norm_weight: torch.Tensor,
    eps: float,
    w_gate: torch.Tensor,
    w_up: torch.Tensor,
    w_down: torch.Tensor,
) -> torch.Tensor:
    """The rest of the layer: ``x + o(attn)``, then ``+ down(silu(gate(h)) * up(h))`` of its norm
    ``h``. ``attn`` ``[T, Hq * D]``; returns the new residual stream ``[T, hidden]``."""
    x = x + F.linear(attn, wo)
    h = rms_norm(x, norm_weight, eps)
    return x + F.linear(silu_mul(F.linear(h, w_gate), F.linear(h, w_up)), w_down)
