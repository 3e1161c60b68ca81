"""``CausalLM``: the decoder-only transformer every supported family assembles.

One definition serves the trainer and the engine. The forward works on flat token tensors:
``input_ids`` ``[T]`` and ``positions`` ``[T]`` plus an ``AttentionContext`` that knows how the
``T`` tokens split into sequences (packed training batch, or engine requests over a paged
cache). ``forward`` returns final hidden states ``[T, hidden]``; ``compute_logits`` projects them
to the vocabulary, separately, so the trainer can compute log-probs in chunks.

No parallelism, caching or kernel selection lives here: those are applied from outside.
"""

from __future__ import annotations

import torch
from torch import nn

from miles.kernels import compiled
from miles.models.attention import AttentionContext, VarlenContext, positions_from_cu_seqlens
from miles.models.layers import Attention, Linear, RMSNorm, SwiGLUMLP
from miles.models.moe import RoutingHook, SparseMoeBlock
from miles.models.rope import RotaryEmbedding
from miles.models.spec import ModelSpec
from miles.models.train_regions import attention_inputs, mlp_residual


class DecoderLayer(nn.Module):
    """Pre-norm block: ``x + attn(norm(x))``, then ``x + mlp(norm(x))`` (dense or MoE)."""

    def __init__(self, spec: ModelSpec, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.self_attn = Attention(spec, layer_idx)
        self.mlp: SwiGLUMLP | SparseMoeBlock
        if spec.is_moe_layer(layer_idx):
            self.mlp = SparseMoeBlock(spec, layer_idx)
        else:
            self.mlp = SwiGLUMLP(spec.hidden_size, spec.intermediate_size)
        self.input_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        ctx: AttentionContext,
        routing: RoutingHook | None = None,
    ) -> torch.Tensor:
        if compiled.enabled_for(x):
            return self._compiled_forward(x, cos, sin, ctx, routing)
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, ctx)
        h = self.post_attention_layernorm(x)
        if isinstance(self.mlp, SparseMoeBlock):
            return x + self.mlp(h, routing)
        return x + self.mlp(h)

    def _compiled_forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        ctx: AttentionContext,
        routing: RoutingHook | None,
    ) -> torch.Tensor:
        """The trainer's CUDA forward: each half of the layer one compiled call (see
        ``miles.models.train_regions``); the MoE block keeps its own path."""
        a, ln, post = self.self_attn, self.input_layernorm, self.post_attention_layernorm
        qn, kn = a.q_norm, a.k_norm
        q, k, v = compiled.call(
            attention_inputs, x, ln.weight, ln.eps,
            a.q_proj.weight, a.q_proj.bias, a.k_proj.weight, a.k_proj.bias, a.v_proj.weight, a.v_proj.bias,
            None if qn is None else qn.weight, None if kn is None else kn.weight,
            ln.eps if qn is None else qn.eps, cos, sin, a.num_heads, a.num_kv_heads, a.head_dim,
        )  # fmt: skip
        out = ctx.attend(self.layer_idx, q, k, v, a.scale).reshape(x.shape[0], a.num_heads * a.head_dim)
        mlp = self.mlp
        if isinstance(mlp, SparseMoeBlock):
            x = x + a.o_proj(out)
            return x + mlp(post(x), routing)
        return compiled.call(
            mlp_residual, x, out, a.o_proj.weight, post.weight, post.eps,
            mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight,
        )  # fmt: skip


class DecoderModel(nn.Module):
    """Embeddings, the layer stack and the final norm (HF's ``model.`` prefix)."""

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(spec.vocab_size, spec.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(spec, i) for i in range(spec.num_hidden_layers))
        self.norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(spec)


class CausalLM(nn.Module):
    """A decoder-only LM with HF-identical parameter names (``model.*``, ``lm_head.weight``)."""

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.spec = spec
        self.model = DecoderModel(spec)
        self.lm_head = Linear(spec.hidden_size, spec.vocab_size, bias=False)
        if spec.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        ctx: AttentionContext,
        routing: RoutingHook | None = None,
    ) -> torch.Tensor:
        """``input_ids``/``positions`` int ``[T]`` -> final hidden states ``[T, hidden]``."""
        if input_ids.dim() != 1 or positions.shape != input_ids.shape:
            raise ValueError(
                f"input_ids and positions must both be 1-D [T]; got {tuple(input_ids.shape)} and {tuple(positions.shape)}"
            )
        x = self.model.embed_tokens(input_ids)
        cos, sin = self.model.rotary_emb(positions, x.dtype)
        for layer in self.model.layers:
            x = layer(x, cos, sin, ctx, routing)
        return self.model.norm(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """``[T, hidden]`` -> ``[T, vocab]`` in the parameters' dtype."""
        return self.lm_head(hidden)

    def forward_packed(
        self, input_ids: torch.Tensor, cu_seqlens: torch.Tensor, routing: RoutingHook | None = None
    ) -> torch.Tensor:
        """Convenience: logits ``[T, vocab]`` for packed sequences with positions from ``cu_seqlens``."""
        positions = positions_from_cu_seqlens(cu_seqlens)
        hidden = self.forward(input_ids, positions, VarlenContext(cu_seqlens), routing)
        return self.compute_logits(hidden)

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device
