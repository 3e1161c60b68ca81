"""The OpenAI API (``/v1/completions``, ``/v1/chat/completions``) over ``AsyncEngine``, without HTTP.

Each request becomes ``len(prompts) * n`` engine requests submitted together (the n samples of
a prompt share its KV blocks). ``seed`` gives choice ``i`` the sampling seed ``seed + i``, so the
n choices differ yet the whole answer is reproducible. Streaming yields OpenAI chunk dicts; the
server frames them as SSE. A decoded text that ends inside a multi-byte character is held
back until the character is complete. Counts and text lengths are bounded as for ``/generate``
(``RequestLimits``), and parsing runs on the engine's preparation thread (:func:`prepare_openai`).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any

from miles.engine.async_engine import AsyncEngine, RequestSpec, RequestStream
from miles.engine.protocol import (
    DEFAULT_LIMITS,
    BadRequest,
    RequestLimits,
    check_count,
    check_fields,
    check_prompt,
    check_text,
    decode_output,
    expect,
    max_text_chars,
    sampling_params,
)
from miles.engine.request import RequestOutput

_COMMON = frozenset(
    {
        "model",
        "max_tokens",
        "temperature",
        "top_p",
        "n",
        "stop",
        "stream",
        "stream_options",
        "seed",
        "presence_penalty",
        "frequency_penalty",
        "user",
        # SGLang extensions of the OpenAI API
        "top_k",
        "min_p",
        "repetition_penalty",
        "ignore_eos",
        "stop_token_ids",
        "skip_special_tokens",
        "no_stop_trim",
        "min_tokens",
    }
)
COMPLETION_FIELDS = _COMMON | {"prompt", "logprobs", "echo"}
CHAT_FIELDS = _COMMON | {"messages", "logprobs", "top_logprobs", "max_completion_tokens"}
_UNSUPPORTED = frozenset(
    {"tools", "tool_choice", "functions", "function_call", "logit_bias", "suffix", "best_of"}
)
_MAP = {  # OpenAI name -> SamplingParams name
    "temperature": "temperature",
    "top_p": "top_p",
    "stop": "stop",
    "presence_penalty": "presence_penalty",
    "frequency_penalty": "frequency_penalty",
    "top_k": "top_k",
    "min_p": "min_p",
    "repetition_penalty": "repetition_penalty",
    "ignore_eos": "ignore_eos",
    "stop_token_ids": "stop_token_ids",
    "skip_special_tokens": "skip_special_tokens",
    "no_stop_trim": "no_stop_trim",
    "min_tokens": "min_new_tokens",
}


@dataclass(frozen=True)
class OpenAIRequest:
    chat: bool
    model: str
    id: str  # the answer's id; request ids are "<id>-<prompt>-<sample>"
    prompts: list[list[int]]
    specs: list[RequestSpec]  # prompt-major: choice index = prompt * n + sample
    n: int
    logprobs: int | None  # top-k alternatives per token (0 = only the sampled token); None = off
    stream: bool
    include_usage: bool


async def prepare_openai(
    payload: Any, engine: AsyncEngine, *, chat: bool, model: str, limits: RequestLimits = DEFAULT_LIMITS
) -> OpenAIRequest:
    """``parse_openai`` on the engine's preparation thread (off the event loop)."""
    return await engine.offload(lambda: parse_openai(payload, engine, chat=chat, model=model, limits=limits))


def parse_openai(
    payload: Any, engine: AsyncEngine, *, chat: bool, model: str, limits: RequestLimits = DEFAULT_LIMITS
) -> OpenAIRequest:
    """Validate an OpenAI completions / chat body into engine requests (counts before tokens)."""
    if not isinstance(payload, Mapping):
        raise BadRequest(None, f"the body must be a JSON object, got {type(payload).__name__}")
    check_fields(payload, CHAT_FIELDS if chat else COMPLETION_FIELDS, _UNSUPPORTED)
    core = engine.engine
    tokenizer = core.tokenizer
    if tokenizer is None:
        raise BadRequest(None, "this engine has no tokenizer; the OpenAI API needs one")
    if payload.get("echo"):
        raise BadRequest("echo", "echo is not supported")
    n = expect(payload, "n", int, 1, "an integer >= 1")
    if n < 1:
        raise BadRequest("n", f"must be an integer >= 1, got {n}")
    check_count(n, "n", "choices", limits.max_requests)
    most = max_text_chars(tokenizer, core.context_length)
    if chat:
        prompts = [_chat_prompt(payload.get("messages"), tokenizer, most, core.context_length)]
        field = "messages"
    else:
        prompts = _completion_prompts(payload.get("prompt"), tokenizer, n, most, limits)
        field = "prompt"
    prompts = [check_prompt(p, field, core.vocab_size, core.context_length) for p in prompts]
    max_key = (
        "max_completion_tokens" if chat and payload.get("max_completion_tokens") is not None else "max_tokens"
    )
    max_tokens = expect(payload, max_key, int, None, "an integer >= 0")
    if max_tokens is not None and max_tokens < 0:
        raise BadRequest(max_key, f"must be an integer >= 0, got {max_tokens}")
    if chat:
        top = expect(payload, "top_logprobs", int, 0, "an integer in [0, 20]")
        want = expect(payload, "logprobs", bool, False, "true or false")
        logprobs = top if want else None
        if top and not want:
            raise BadRequest("top_logprobs", "needs logprobs: true")
    else:
        logprobs = expect(payload, "logprobs", int, None, "an integer in [0, 20]")
        top = logprobs or 0
    if not 0 <= top <= 20:
        raise BadRequest("top_logprobs" if chat else "logprobs", f"must be in [0, 20], got {top}")
    seed = expect(payload, "seed", int, None, "an integer")
    base = {dst: payload[src] for src, dst in _MAP.items() if payload.get(src) is not None}
    stream_options = expect(payload, "stream_options", dict, {}, "an object")

    rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
    specs: list[RequestSpec] = []
    for i, prompt in enumerate(prompts):
        room = core.context_length - len(prompt)
        # OpenAI's defaults: 16 tokens for completions, up to the context for chat.
        limit = max_tokens if max_tokens is not None else (room if chat else 16)
        for j in range(n):
            params = dict(base, max_new_tokens=min(limit, room))
            if seed is not None:
                params["sampling_seed"] = seed + j
            specs.append(
                RequestSpec(
                    prompt_ids=prompt,
                    sampling_params=sampling_params(params, field="sampling parameters"),
                    request_id=f"{rid}-{i}-{j}",
                    top_logprobs_num=top,
                )
            )
    return OpenAIRequest(
        chat=chat,
        model=model,
        id=rid,
        prompts=prompts,
        specs=specs,
        n=n,
        logprobs=logprobs,
        stream=expect(payload, "stream", bool, False, "true or false"),
        include_usage=bool(stream_options.get("include_usage")),
    )


def _chat_prompt(messages: Any, tokenizer: Any, max_chars: int, context_length: int) -> list[int]:
    if not isinstance(messages, list) or not messages:
        raise BadRequest("messages", "must be a non-empty list of {role, content} objects")
    # Every message costs the template at least one token: more cannot fit the context.
    check_count(len(messages), "messages", "messages", context_length)
    clean: list[dict[str, str]] = []
    chars = 0
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or not isinstance(m.get("role"), str):
            raise BadRequest("messages", f"message {i} must be an object with a string 'role'")
        content = m.get("content")
        if isinstance(content, list):  # content parts: only text is supported
            if not all(isinstance(p, Mapping) and p.get("type") == "text" for p in content):
                raise BadRequest("messages", f"message {i}: only text content parts are supported")
            content = "".join(str(p.get("text", "")) for p in content)
        if not isinstance(content, str):
            raise BadRequest("messages", f"message {i} must have string 'content'")
        chars += len(check_text(m["role"], "messages", max_chars)) + len(
            check_text(content, "messages", max_chars)
        )
        if chars > max_chars:
            raise BadRequest("messages", f"more than {max_chars} characters: more than the context can hold")
        clean.append({"role": m["role"], "content": content})
    try:
        text = tokenizer.apply_chat_template(clean, add_generation_prompt=True, tokenize=False)
    except Exception as e:  # jinja errors: e.g. a role the template rejects
        raise BadRequest("messages", f"the chat template failed: {e}") from None
    return list(tokenizer.encode(text, add_special_tokens=False))


def _completion_prompts(
    prompt: Any, tokenizer: Any, n: int, max_chars: int, limits: RequestLimits
) -> list[list[int]]:
    if isinstance(prompt, str):
        return [list(tokenizer.encode(check_text(prompt, "prompt", max_chars)))]
    if isinstance(prompt, list) and prompt:
        if all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            return [list(prompt)]
        check_count(len(prompt) * n, "prompt", "requests (prompts x n)", limits.max_requests)
        if all(isinstance(p, str) for p in prompt):
            return [list(tokenizer.encode(check_text(p, "prompt", max_chars))) for p in prompt]
        if all(isinstance(p, list) for p in prompt):
            return [list(p) for p in prompt]
    raise BadRequest(
        "prompt", "must be a string, a list of strings, a list of token ids, or a list of such lists"
    )


# ---- responses -----------------------------------------------------------------------------------


def _finish(out: RequestOutput) -> str | None:
    return out.finish_reason.type if out.finish_reason is not None else None


class _Choice:
    """Per-choice streaming state: what was already sent."""

    def __init__(self) -> None:
        self.text = ""
        self.tokens = 0
        self.done = False


def _logprobs(
    req: OpenAIRequest, out: RequestOutput, start: int, tokenizer: Any, text_offset: int = 0
) -> Any:
    if req.logprobs is None:
        return None
    ids = out.output_ids[start:]
    lps = out.output_logprobs[start:]
    tops = (out.output_top_logprobs or ())[start:] if req.logprobs else ()
    tok = [str(tokenizer.decode([t])) for t in ids]
    if req.chat:

        def entry(token: str, lp: float) -> dict[str, Any]:
            return {"token": token, "logprob": lp, "bytes": list(token.encode("utf-8"))}

        content = []
        for k, (token, lp) in enumerate(zip(tok, lps)):
            alts = [entry(str(tokenizer.decode([t])), a) for t, a in tops[k]] if k < len(tops) else []
            content.append({**entry(token, lp), "top_logprobs": alts})
        return {"content": content}
    offsets, pos = [], text_offset
    for token in tok:
        offsets.append(pos)
        pos += len(token)
    return {
        "tokens": tok,
        "token_logprobs": list(lps),
        "top_logprobs": [{str(tokenizer.decode([t])): a for t, a in top} for top in tops]
        if req.logprobs
        else None,
        "text_offset": offsets,
    }


def _usage(req: OpenAIRequest, outs: list[RequestOutput]) -> dict[str, int]:
    prompt = sum(len(p) for p in req.prompts)
    completion = sum(o.completion_tokens for o in outs)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def openai_response(req: OpenAIRequest, outs: list[RequestOutput], tokenizer: Any) -> dict[str, Any]:
    """The non-streaming answer for the final outputs (one per spec)."""
    choices = []
    for i, (out, spec) in enumerate(zip(outs, req.specs)):
        text = decode_output(tokenizer, out, spec.sampling_params) or ""
        choice: dict[str, Any] = {
            "index": i,
            "finish_reason": _finish(out),
            "logprobs": _logprobs(req, out, 0, tokenizer),
        }
        if req.chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        choices.append(choice)
    return {
        "id": req.id,
        "object": "chat.completion" if req.chat else "text_completion",
        "created": int(time.time()),
        "model": req.model,
        "choices": choices,
        "usage": _usage(req, outs),
    }


async def openai_stream(
    req: OpenAIRequest, stream: RequestStream, tokenizer: Any
) -> AsyncIterator[dict[str, Any]]:
    """Chunks of a streamed answer; the caller frames them (``data: ...``) and ends with [DONE]."""
    created, rid = int(time.time()), req.id
    kind = "chat.completion.chunk" if req.chat else "text_completion"
    states = [_Choice() for _ in req.specs]
    finals: dict[int, RequestOutput] = {}

    def chunk(
        index: int, text: str, finish: str | None, logprobs: Any, first: bool = False
    ) -> dict[str, Any]:
        body: dict[str, Any] = {"index": index, "finish_reason": finish, "logprobs": logprobs}
        if req.chat:
            body["delta"] = ({"role": "assistant"} if first else {}) | (
                {"content": text} if text or first else {}
            )
        else:
            body["text"] = text
        return {"id": rid, "object": kind, "created": created, "model": req.model, "choices": [body]}

    if req.chat:
        for i in range(len(states)):
            yield chunk(i, "", None, None, first=True)
    async for index, out in stream:
        state = states[index]
        full = decode_output(tokenizer, out, req.specs[index].sampling_params) or ""
        if not out.finished and full.endswith("\ufffd"):
            continue  # inside a multi-byte character: wait for the rest
        # A stop string trimmed at the end can make the text shorter: nothing more to send then.
        delta = full[len(state.text) :] if full.startswith(state.text) else ""
        if out.finished:
            finals[index] = out
        elif not delta:
            continue
        logprobs = _logprobs(req, out, state.tokens, tokenizer, len(state.text))
        state.text += delta
        state.tokens = out.completion_tokens
        yield chunk(index, delta, _finish(out), logprobs)
    if req.include_usage:
        outs = [finals[i] for i in sorted(finals)]
        yield {
            "id": rid,
            "object": kind,
            "created": created,
            "model": req.model,
            "choices": [],
            "usage": _usage(req, outs),
        }
