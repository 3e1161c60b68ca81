"""``LLM``: offline generation over the engine core, shaped like SGLang's ``Engine.generate``.

    llm = miles.LLM("smollm2-135m-instruct")
    outs = llm.generate(["The capital of France is"], {"max_new_tokens": 16, "temperature": 0})
    outs[0]["text"], outs[0]["output_ids"], outs[0]["meta_info"]["finish_reason"]

Each result is a dict: ``text``, ``output_ids`` and ``meta_info`` (``id``, ``finish_reason``,
``prompt_tokens``, ``completion_tokens``, ``cached_tokens``, ``weight_version``, and with
``return_logprob=True`` ``output_token_logprobs`` = ``[[logprob, token_id, text or None], ...]``
and ``output_token_weight_versions`` = ``[int, ...]``, the weight version that sampled each
output token), as the server's ``/generate``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from miles.config import EngineConfig
from miles.engine.engine import Engine, EngineStats
from miles.engine.kv_cache import available_memory_bytes
from miles.engine.request import RequestOutput
from miles.models.loading import load_model, load_tokenizer
from miles.models.transformer import CausalLM
from miles.types import SamplingParams
from miles.utils.suggest import did_you_mean

# The KV budget of an engine that owns its device (``miles serve``, ``miles.LLM``), unless
# --sglang-mem-fraction-static says otherwise: this fraction of the GPU less what is allocated (the
# weights), as SGLang does; on the CPU a fixed budget, since the host's memory is everyone's.
STANDALONE_MEM_FRACTION = 0.85
CPU_KV_CACHE_BYTES = 1 << 30


def kv_bytes_per_block(model: CausalLM, block_size: int, dtype: torch.dtype) -> int:
    s = model.spec
    elem = torch.empty(0, dtype=dtype).element_size()
    return 2 * s.num_hidden_layers * block_size * s.num_key_value_heads * s.head_dim * elem


def derive_num_blocks(
    model: CausalLM,
    block_size: int,
    max_running_requests: int,
    context_length: int,
    mem_fraction_static: float | None,
    dtype: torch.dtype,
) -> int:
    """Blocks that fit the memory budget, capped at what the running requests could ever use.

    CUDA: ``mem_fraction_static`` (None: ``STANDALONE_MEM_FRACTION``) of the device's memory minus
    what is allocated now (weights). CPU: ``mem_fraction_static`` of the memory available now, or
    ``CPU_KV_CACHE_BYTES`` without it.
    """
    per_block = kv_bytes_per_block(model, block_size, dtype)
    if model.device.type == "cuda":
        _, total = torch.cuda.mem_get_info(model.device)
        fraction = STANDALONE_MEM_FRACTION if mem_fraction_static is None else mem_fraction_static
        budget = int(total * fraction) - torch.cuda.memory_allocated(model.device)
    elif mem_fraction_static is None:
        budget = CPU_KV_CACHE_BYTES
    else:
        budget = int(available_memory_bytes(model.device) * mem_fraction_static)
    cap = -(-max_running_requests * context_length // block_size)
    num = min(budget // per_block, cap)
    if num < 1:
        raise ValueError(
            f"no memory left for the KV cache (budget {budget} bytes, {per_block} per block): "
            "raise mem_fraction_static or give max_total_tokens"
        )
    return int(num)


def standalone_config(model: CausalLM, config: EngineConfig) -> EngineConfig:
    """``config`` with its KV capacity resolved for an engine that owns its device: its own
    ``max_total_tokens``, else what :func:`derive_num_blocks` allows."""
    if config.max_total_tokens is not None:
        return config
    context = config.context_length or model.spec.max_position_embeddings
    blocks = derive_num_blocks(
        model, config.page_size, config.max_running_requests, context, config.mem_fraction_static, model.dtype
    )
    return dataclasses.replace(config, max_total_tokens=blocks * config.page_size)


class LLM:
    """A checkpoint loaded into an ``Engine`` (plus its tokenizer) for offline generation.

    ``model_path``: an HF directory, a GGUF file or the ``smollm2-135m-instruct`` alias.
    ``device`` defaults to CUDA when available. ``settings`` are the engine's, by their
    ``EngineConfig`` (SGLang) names: ``LLM(path, page_size=8, random_seed=0, mem_fraction_static=0.5)``;
    the KV cache holds ``max_total_tokens``, or what the memory allows (:func:`standalone_config`).
    ``skip_tokenizer_init`` serves token ids only (no text).
    """

    def __init__(
        self,
        model_path: str,
        *,
        dtype: str = "float32",
        device: str | torch.device | None = None,
        skip_tokenizer_init: bool = False,
        **settings: Any,
    ) -> None:
        names = [f.name for f in dataclasses.fields(EngineConfig)]
        for key in settings:
            if key not in names:
                raise TypeError(f"LLM() got an unknown engine setting {key!r}{did_you_mean(key, names)}")
        config = EngineConfig(**settings)  # checked before anything loads
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model_path = model_path
        model = load_model(model_path, dtype=dtype, device=device)
        self.tokenizer: Any = None if skip_tokenizer_init else load_tokenizer(model_path)
        self.engine = Engine(model, self.tokenizer, standalone_config(model, config))

    # ---- generation --------------------------------------------------------------------------

    def generate(
        self,
        prompts: str | Sequence[Any],
        sampling_params: SamplingParams | Mapping[str, Any] | Sequence[Any] | None = None,
        *,
        apply_chat_template: bool = False,
        return_logprob: bool = False,
        return_text_in_logprobs: bool = False,
    ) -> list[dict[str, Any]]:
        """Generate for each prompt; results come in prompt order.

        ``prompts``: a string, a list of strings, a list of token-id lists, one chat (a list of
        ``{"role", "content"}`` dicts) or a list of chats. Chats always use the chat template;
        strings use it with ``apply_chat_template``. ``sampling_params``: one for all (a
        ``SamplingParams`` or a dict with SGLang's field names) or one per prompt; a prompt whose
        ``n`` is above 1 gets ``n`` results in a row. Raises ``ValueError`` for bad input and
        ``EngineStateError`` while the engine's memory is released.
        """
        ids = [self._encode(p, apply_chat_template) for p in _as_prompt_list(prompts)]
        params = _as_params(sampling_params, len(ids))
        # n samples per prompt, prompt-major, as SGLang returns them (and as the server's
        # /generate does).
        ids = [i for i, p in zip(ids, params) for _ in range(p.n)]
        params = [p for p in params for _ in range(p.n)]
        outs = self.engine.generate(ids, params)
        return [self._result(o, p, return_logprob, return_text_in_logprobs) for o, p in zip(outs, params)]

    def _encode(self, prompt: Any, apply_chat_template: bool) -> list[int]:
        if isinstance(prompt, (list, tuple)) and all(isinstance(t, int) for t in prompt):
            return list(prompt)
        if self.tokenizer is None:
            raise ValueError("this LLM has no tokenizer (skip_tokenizer_init): give token ids")
        from miles.models.generation import encode_prompt

        return encode_prompt(self.tokenizer, prompt, apply_chat_template)

    def _result(
        self, out: RequestOutput, params: SamplingParams, return_logprob: bool, text_in_logprobs: bool
    ) -> dict[str, Any]:
        reason = out.finish_reason
        text: str | None = None
        if self.tokenizer is not None:
            text = self.tokenizer.decode(list(out.output_ids), skip_special_tokens=params.skip_special_tokens)
            if reason is not None and isinstance(reason.matched, str) and not params.no_stop_trim:
                cut = text.find(reason.matched)
                text = text[:cut] if cut >= 0 else text
        meta: dict[str, Any] = {
            "id": out.request_id,
            "finish_reason": reason.to_dict() if reason is not None else None,
            "prompt_tokens": out.prompt_tokens,
            "completion_tokens": out.completion_tokens,
            "cached_tokens": out.cached_tokens,
            "weight_version": str(out.weight_version),
        }
        if return_logprob:
            decode = self.tokenizer.decode if (text_in_logprobs and self.tokenizer is not None) else None
            meta["output_token_logprobs"] = [
                [lp, tok, decode([tok]) if decode else None]
                for lp, tok in zip(out.output_logprobs, out.output_ids)
            ]
            meta["output_token_weight_versions"] = list(out.output_weight_versions)
        return {"text": text, "output_ids": list(out.output_ids), "meta_info": meta}

    # ---- passthroughs to the engine ----------------------------------------------------------

    @property
    def weight_version(self) -> str:
        return self.engine.weight_version

    def get_weight_version(self) -> str:
        return self.engine.weight_version

    def update_weights_from_disk(self, model_path: str, weight_version: str | None = None) -> None:
        self.engine.update_weights_from_disk(model_path, weight_version)

    def update_weights_from_tensors(
        self, named_tensors: Any, weight_version: str | None = None, flush_cache: bool = True
    ) -> None:
        self.engine.update_weights_from_tensors(named_tensors, weight_version, flush_cache)

    def flush_cache(self) -> bool:
        return self.engine.flush_cache()

    def release_memory_occupation(self, tags: Sequence[str] | None = None) -> None:
        self.engine.release_memory_occupation(tags)

    def resume_memory_occupation(self, tags: Sequence[str] | None = None) -> None:
        self.engine.resume_memory_occupation(tags)

    def stats(self) -> EngineStats:
        return self.engine.stats()


def _as_prompt_list(prompts: str | Sequence[Any]) -> list[Any]:
    if isinstance(prompts, str):
        return [prompts]
    items = list(prompts)
    if not items:
        return []
    if all(isinstance(m, Mapping) for m in items):
        return [items]  # one chat
    if all(isinstance(t, int) for t in items):
        raise ValueError("give token ids as a list of lists (one list per prompt)")
    return items


def _as_params(
    params: SamplingParams | Mapping[str, Any] | Sequence[Any] | None, n: int
) -> list[SamplingParams]:
    if isinstance(params, (str, bytes)):
        raise ValueError(
            f"sampling_params must be a dict, a SamplingParams or a list of them, got {params!r:.40}"
        )
    if params is None or isinstance(params, (SamplingParams, Mapping)):
        return [_one_params(params)] * n
    out = [_one_params(p) for p in params]
    if len(out) != n:
        raise ValueError(f"{n} prompts but {len(out)} sampling_params")
    return out


def _one_params(params: SamplingParams | Mapping[str, Any] | None) -> SamplingParams:
    if params is None:
        return SamplingParams()
    if isinstance(params, SamplingParams):
        return params
    if not isinstance(params, Mapping):
        raise ValueError(f"sampling_params must be a dict or a SamplingParams, got {type(params).__name__}")
    return SamplingParams.from_dict(params)
