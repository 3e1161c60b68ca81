"""Reference incremental generation over the shared model (no engine, no paging).

``ContiguousKVContext`` is the simplest ``AttentionContext`` with a cache: each sequence keeps
its keys and values in growing per-layer tensors. It exercises the same model interface as the
engine's paged cache and is the ground truth that cached decoding equals a full recompute.
``generate_ids`` / ``TextGenerator`` drive it for ``miles generate`` and ``miles chat`` until the
engine takes over; they are deliberately plain (batch by batch, one token per step).
"""

from __future__ import annotations

import torch

from miles.kernels.attention import prefix_causal_attention
from miles.models.transformer import CausalLM


class ContiguousKVContext:
    """Per-sequence KV cache in contiguous tensors.

    Before each forward call ``plan(new_lens)``: the forward's ``T`` tokens are, in order,
    ``new_lens[i]`` new tokens of sequence ``i``. ``positions()`` gives their positions.
    """

    def __init__(self, num_seqs: int, num_layers: int) -> None:
        self.lens = [0] * num_seqs
        self.new_lens = [0] * num_seqs
        self.k: list[list[torch.Tensor | None]] = [[None] * num_seqs for _ in range(num_layers)]
        self.v: list[list[torch.Tensor | None]] = [[None] * num_seqs for _ in range(num_layers)]
        self._layers_done = 0

    def plan(self, new_lens: list[int]) -> None:
        if len(new_lens) != len(self.lens):
            raise ValueError(f"plan() got {len(new_lens)} lengths for {len(self.lens)} sequences")
        self.new_lens = list(new_lens)

    def positions(self, device: torch.device | str = "cpu") -> torch.Tensor:
        return torch.cat(
            [torch.arange(n, n + m, device=device) for n, m in zip(self.lens, self.new_lens)]
        ).long()

    def attend(
        self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
    ) -> torch.Tensor:
        out = torch.empty_like(q)
        start = 0
        for i, m in enumerate(self.new_lens):
            if m == 0:
                continue
            sl = slice(start, start + m)
            old_k, old_v = self.k[layer_idx][i], self.v[layer_idx][i]
            ks = k[sl] if old_k is None else torch.cat([old_k, k[sl]])
            vs = v[sl] if old_v is None else torch.cat([old_v, v[sl]])
            self.k[layer_idx][i], self.v[layer_idx][i] = ks, vs
            out[sl] = prefix_causal_attention(q[sl], ks, vs, scale)
            start += m
        if layer_idx == len(self.k) - 1:
            self.lens = [n + m for n, m in zip(self.lens, self.new_lens)]
        return out


def sample_next(
    logits: torch.Tensor, temperature: float, top_p: float, top_k: int, generator: torch.Generator | None
) -> torch.Tensor:
    """Next token ids ``[B]`` from ``logits`` ``[B, V]`` (greedy when ``temperature == 0``)."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= top_p  # keep the smallest prefix reaching top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate_ids(
    model: CausalLM,
    prompts: list[list[int]],
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = -1,
    seed: int | None = None,
    stop_token_ids: tuple[int, ...] = (),
) -> list[list[int]]:
    """Generate up to ``max_new_tokens`` for each prompt; a sequence stops at a stop token (kept)."""
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    if not prompts:
        return []
    device = model.device
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    ctx = ContiguousKVContext(len(prompts), model.spec.num_hidden_layers)
    outputs: list[list[int]] = [[] for _ in prompts]
    active = [True] * len(prompts)
    feed = [list(p) for p in prompts]
    for _ in range(max_new_tokens):
        ctx.plan([len(f) if a else 0 for f, a in zip(feed, active)])
        ids = torch.tensor([t for f, a in zip(feed, active) if a for t in f], device=device)
        hidden = model(ids, ctx.positions(device), ctx)
        ends = torch.tensor([len(f) for f, a in zip(feed, active) if a], device=device).cumsum(0) - 1
        next_ids = sample_next(
            model.compute_logits(hidden[ends]), temperature, top_p, top_k, generator
        ).tolist()
        rows = [i for i, a in enumerate(active) if a]
        for i, tok in zip(rows, next_ids):
            outputs[i].append(tok)
            feed[i] = [tok]
            if tok in stop_token_ids:
                active[i] = False
        if not any(active):
            break
    return outputs


class TextGenerator:
    """A checkpoint and its tokenizer loaded once, generating text for prompts (chat turns reuse it)."""

    def __init__(self, model_path: str, dtype: str = "float32") -> None:
        from miles.models.loading import load_model, load_tokenizer

        self.model = load_model(model_path, dtype=dtype)
        self.tokenizer = load_tokenizer(model_path)
        eos = self.tokenizer.eos_token_id
        self.stop_token_ids = tuple(self.model.spec.eos_token_ids) + ((eos,) if eos is not None else ())

    def generate(
        self,
        prompts: list[str | list[dict]],
        *,
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = -1,
        seed: int | None = None,
        apply_chat_template: bool = False,
    ) -> list[str]:
        """Decoded continuations; a prompt given as chat messages always uses the chat template."""
        ids = [encode_prompt(self.tokenizer, p, apply_chat_template) for p in prompts]
        stops = self.stop_token_ids
        out = generate_ids(
            self.model,
            ids,
            max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            seed=seed,
            stop_token_ids=stops,
        )
        return [
            self.tokenizer.decode([t for t in o if t not in stops], skip_special_tokens=True) for o in out
        ]


def encode_prompt(tokenizer: object, prompt: str | list[dict], apply_chat_template: bool) -> list[int]:
    """Token ids of one prompt; chat messages (or ``apply_chat_template``) use the chat template."""
    if isinstance(prompt, list) or apply_chat_template:
        messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)  # type: ignore[attr-defined]
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])  # type: ignore[operator]
    return list(tokenizer(prompt)["input_ids"])  # type: ignore[operator]
