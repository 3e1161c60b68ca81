"""Rotary position embeddings with the scaling types Llama and Qwen configs use.

Inverse frequencies are computed with the same float32 operations, in the same order, as
``transformers``, so cos/sin (and hence logits) agree bit for bit with it on CPU.
Formulas: RoPE (arXiv 2104.09864); linear / dynamic NTK scaling; YaRN (arXiv 2309.00071);
Llama 3.1 frequency-band scaling (Meta's reference implementation).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from miles.models.spec import ModelSpec, RopeSpec


def _base_inv_freq(base: float, dim: int) -> torch.Tensor:
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 0.1 * mscale * math.log(scale) + 1.0 if scale > 1 else 1.0


def inv_freq_and_scale(
    rope: RopeSpec, dim: int, max_position_embeddings: int, seq_len: int | None = None
) -> tuple[torch.Tensor, float]:
    """Return ``(inv_freq [dim // 2] float32, attention_scaling)`` for one rope configuration.

    ``seq_len`` matters only for ``dynamic`` (NTK-aware) scaling, which changes the base once
    the longest position in the batch exceeds ``max_position_embeddings``.
    """
    base, kind = rope.theta, rope.type
    if kind == "default":
        return _base_inv_freq(base, dim), 1.0
    if kind == "linear":
        assert rope.factor is not None
        return _base_inv_freq(base, dim) / rope.factor, 1.0
    if kind == "dynamic":
        assert rope.factor is not None
        length = max(seq_len or 0, max_position_embeddings)
        factor = rope.factor
        base = base * ((factor * length / max_position_embeddings) - (factor - 1)) ** (dim / (dim - 2))
        return _base_inv_freq(base, dim), 1.0
    if kind == "llama3":
        return _llama3_inv_freq(rope, dim), 1.0
    if kind == "yarn":
        return _yarn_inv_freq(rope, dim, max_position_embeddings)
    raise ValueError(f"unknown rope type {kind!r}")


def _llama3_inv_freq(rope: RopeSpec, dim: int) -> torch.Tensor:
    assert rope.factor and rope.low_freq_factor and rope.high_freq_factor
    assert rope.original_max_position_embeddings
    inv_freq = _base_inv_freq(rope.theta, dim)
    old_ctx = rope.original_max_position_embeddings
    low_wavelen = old_ctx / rope.low_freq_factor
    high_wavelen = old_ctx / rope.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    # Long wavelengths are interpolated, short ones kept, the band between blended smoothly.
    scaled = torch.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
    smooth = (old_ctx / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
    smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
    is_medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def _yarn_inv_freq(rope: RopeSpec, dim: int, max_position_embeddings: int) -> tuple[torch.Tensor, float]:
    base = rope.theta
    orig = rope.original_max_position_embeddings or max_position_embeddings
    factor = rope.factor if rope.factor is not None else max_position_embeddings / orig
    attention_factor = rope.attention_factor
    if attention_factor is None:
        if rope.mscale and rope.mscale_all_dim:
            attention_factor = _yarn_mscale(factor, rope.mscale) / _yarn_mscale(factor, rope.mscale_all_dim)
        else:
            attention_factor = _yarn_mscale(factor)

    def correction_dim(num_rotations: float) -> float:
        return (dim * math.log(orig / (num_rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(rope.beta_fast), correction_dim(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a division by zero in the ramp
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2).float() / dim)
    extrapolation = 1.0 / pos_freqs
    interpolation = 1.0 / (factor * pos_freqs)
    extra_factor = 1 - ramp
    inv_freq = interpolation * (1 - extra_factor) + extrapolation * extra_factor
    return inv_freq, float(attention_factor)


class RotaryEmbedding(nn.Module):
    """Computes cos/sin for arbitrary (packed) positions; stateless apart from a cached inv_freq."""

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.rope = spec.rope
        self.dim = spec.head_dim
        self.max_position_embeddings = spec.max_position_embeddings
        inv_freq, scale = inv_freq_and_scale(self.rope, self.dim, self.max_position_embeddings)
        self.inv_freq: torch.Tensor
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.attention_scaling = scale

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """``positions`` int ``[T]`` -> ``(cos, sin)`` each ``[T, head_dim]`` in ``dtype``."""
        inv_freq = self.inv_freq
        if self.rope.type == "dynamic" and positions.numel():
            longest = int(positions.max()) + 1
            if longest > self.max_position_embeddings:
                inv_freq, _ = inv_freq_and_scale(self.rope, self.dim, self.max_position_embeddings, longest)
                inv_freq = inv_freq.to(positions.device)
        freqs = positions.float()[:, None] * inv_freq.float()[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = emb.cos() * self.attention_scaling
        sin = emb.sin() * self.attention_scaling
        return cos.to(dtype), sin.to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` ``[T, heads, head_dim]`` by ``cos``/``sin`` ``[T, head_dim]`` (half-split layout)."""
    cos, sin = cos[:, None, :], sin[:, None, :]
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return (x * cos) + (rotated * sin)
