"""SGLang's native ``/generate`` protocol, without HTTP: parse a request, build the response.

Shared by the HTTP server and ``LocalEngineClient`` so both give the same dicts. Field names
and shapes follow SGLang (DESIGN.md §5, reference/miles_slime.md §4.1):

request  ``text`` | ``input_ids`` (one prompt or a list), ``sampling_params`` (dict, or one per
         prompt), ``return_logprob``, ``logprob_start_len`` (-1: no prompt logprobs),
         ``top_logprobs_num``, ``return_text_in_logprobs``, ``return_routed_experts``, ``stream``,
         ``rid``;
response ``{"text", "output_ids", "meta_info": {"id", "finish_reason", "prompt_tokens",
         "completion_tokens", "cached_tokens", "weight_version", "e2e_latency",
         "output_token_logprobs": [[logprob, token_id, text|None], ...],
         "output_token_weight_versions": [int, ...], "input_token_logprobs",
         "output_top_logprobs", "routed_experts"}}`` (a list for a batch or ``n > 1``).
         ``output_token_weight_versions`` (Miles's own, with ``return_logprob``, one per output
         token like ``output_token_logprobs``) is the weight version that sampled each token;
         ``weight_version`` stays SGLang's, the request's last forward. ``routed_experts`` (MoE,
         when asked; final response only) is SGLang's: base64 of little-endian int32
         ``[prompt + output tokens - 1, moe_layers, top_k]``.

Every count a request controls is bounded (:class:`RequestLimits`): engine requests per call
(prompts x ``n``, checked before any is built), ``top_logprobs_num``, ``rid`` lengths, and the
characters of a text, refused before it is tokenized when it cannot fit the context. Parsing of
texts (tokenization) and of large bodies runs on the engine's preparation thread; small
pre-tokenized bodies are parsed inline, so a rollout reaches the engine as one admission
(:func:`prepare_generate`).

The other endpoints' bodies are typed requests (frozen dataclasses) read by one validator,
:func:`parse_request`, whose every refusal names the field.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import time
import types
import typing
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from miles.engine.async_engine import RequestSpec
from miles.engine.request import RequestOutput
from miles.types import SamplingParams

if TYPE_CHECKING:
    from miles.engine.async_engine import AsyncEngine

R = TypeVar("R")

GENERATE_FIELDS = frozenset(
    {
        "text",
        "input_ids",
        "sampling_params",
        "return_logprob",
        "logprob_start_len",
        "top_logprobs_num",
        "return_text_in_logprobs",
        "return_routed_experts",
        "stream",
        "rid",
        # accepted and ignored: they do not change the answer (sglang-router sends them)
        "model",
        "log_metrics",
        "no_logs",
    }
)
# SGLang fields the built-in engine does not implement: refused, by name, when they ask for
# something (a falsy value, as sglang-router sends by default, asks for nothing and passes).
UNSUPPORTED_FIELDS = frozenset(
    {
        "background",
        "return_bytes",
        "return_entropy",
        "image_data",
        "audio_data",
        "video_data",
        "input_embeds",
        "lora_path",
        "return_hidden_states",
        "return_indexer_topk",
        "token_ids_logprob",
        "custom_logit_processor",
        "session_params",
        "bootstrap_host",
        "bootstrap_port",
        "bootstrap_room",
    }
)


@dataclass(frozen=True)
class RequestLimits:
    """What one request may ask for; beyond it the answer is HTTP 400 naming the field."""

    max_requests: int = 1024  # engine requests one call creates: prompts x n (choices)
    max_top_logprobs: int = 20  # alternatives per token (the OpenAI API's bound)
    max_rid_chars: int = 256

    def __post_init__(self) -> None:
        for name in ("max_requests", "max_top_logprobs", "max_rid_chars"):
            if getattr(self, name) < 1:
                raise ValueError(f"RequestLimits.{name} must be >= 1, got {getattr(self, name)}")


DEFAULT_LIMITS = RequestLimits()

_LONGEST_TOKEN: weakref.WeakKeyDictionary[Any, int] = weakref.WeakKeyDictionary()


def max_text_chars(tokenizer: Any, context_length: int) -> int:
    """The most characters a text that fits ``context_length`` tokens can have.

    Every token covers at most as many characters as its longest vocabulary string (byte-level
    BPE and SentencePiece spell each covered character, or byte, in the token's string), so a
    longer text has more tokens than the context holds and is refused before it is tokenized."""
    try:
        longest = _LONGEST_TOKEN[tokenizer]
    except (KeyError, TypeError):
        vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
        longest = max((len(str(t)) for t in vocab), default=0) or 64
        with contextlib.suppress(TypeError):  # not weak-referenceable: computed again next time
            _LONGEST_TOKEN[tokenizer] = longest
    return context_length * longest


def check_text(text: str, field: str, limit: int) -> str:
    """``text`` if it is valid Unicode (no lone surrogates) of at most ``limit`` characters."""
    if len(text) > limit:
        raise BadRequest(
            field, f"the text has {len(text)} characters: more than the context can hold (at most {limit})"
        )
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise BadRequest(field, f"not valid Unicode text: {e.reason} at character {e.start}") from None
    return text


def check_count(count: int, field: str, what: str, limit: int) -> None:
    if count > limit:
        raise BadRequest(field, f"{count} {what} in one request: at most {limit}")


class BadRequest(ValueError):
    """Invalid client input; ``field`` names the offending request field (HTTP 400)."""

    def __init__(self, field: str | None, message: str) -> None:
        super().__init__(f"{field}: {message}" if field and not message.startswith(field) else message)
        self.field = field


def check_fields(
    payload: Mapping[str, Any], known: frozenset[str], unsupported: frozenset[str] = frozenset()
) -> None:
    """Raise ``BadRequest`` for a field the endpoint does not know (or does not implement)."""
    bad = sorted(k for k in set(payload) & unsupported if payload[k] not in (None, False, [], {}, ""))
    if bad:
        raise BadRequest(bad[0], f"{', '.join(bad)} not supported by the Miles engine")
    unknown = sorted(set(payload) - known - unsupported)
    if unknown:
        raise BadRequest(
            unknown[0], f"unknown field(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
        )


def expect(
    payload: Mapping[str, Any], name: str, kind: type | tuple[type, ...], default: Any, what: str
) -> Any:
    """``payload[name]`` checked against ``kind`` (bools are never ints here)."""
    value = payload.get(name, default)
    if value is None:
        return default
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        raise BadRequest(name, f"must be {what}, got {value!r}")
    return value


def parse_request(cls: type[R], payload: Mapping[str, Any]) -> R:
    """A typed request (a frozen dataclass) from a JSON object, every field checked by name.

    A field the class does not declare is refused (naming the known ones); ``null`` stands for
    the field's default; a field without a default is required. Each value must have its field's
    type: ``str``, ``int`` (never a ``bool``), ``float`` (an ``int`` too), ``bool``,
    ``Literal[...]`` (one of its values), ``list[X]`` (every item an ``X``), ``Any``, or a union
    of them. The class's ``__post_init__`` then checks what types cannot say (ranges, lengths),
    raising ``BadRequest`` naming the field."""
    fields = dataclasses.fields(cls)  # type: ignore[arg-type]
    hints = typing.get_type_hints(cls)
    check_fields(payload, frozenset(f.name for f in fields))
    values: dict[str, Any] = {}
    for f in fields:
        value = payload.get(f.name)
        if value is None:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise BadRequest(f.name, "is required")
            continue
        if not _has_type(value, hints[f.name]):
            raise BadRequest(f.name, f"must be {_type_words(hints[f.name])}, got {value!r:.80}")
        values[f.name] = value
    return cls(**values)


def _has_type(value: Any, tp: Any) -> bool:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_has_type(value, a) for a in args if a is not type(None))
    if origin is Literal:
        return any(type(value) is type(choice) and value == choice for choice in args)
    if origin is list or tp is list:
        return isinstance(value, list) and (not args or all(_has_type(v, args[0]) for v in value))
    if isinstance(value, bool):
        return tp is bool
    if tp is float:
        return isinstance(value, int | float)
    return isinstance(tp, type) and isinstance(value, tp)


_TYPE_WORDS = {str: "a string", int: "an integer", float: "a number", bool: "true or false", list: "a list"}


def _type_words(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_words(a) for a in args if a is not type(None))
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin is list and args and args[0] is not Any:
        return f"a list of {_type_words(args[0]).removeprefix('a ').removeprefix('an ')}s"
    return _TYPE_WORDS.get(origin or tp, str(tp))


def sampling_params(data: Any, field: str = "sampling_params") -> SamplingParams:
    if not isinstance(data, Mapping):
        raise BadRequest(field, f"must be a JSON object, got {type(data).__name__}")
    try:
        return SamplingParams.from_dict(data)
    except (TypeError, ValueError) as e:
        raise BadRequest(field, str(e)) from None


def check_prompt(ids: list[int], field: str, vocab_size: int, context_length: int) -> list[int]:
    if not ids:
        raise BadRequest(field, "the prompt is empty")
    if len(ids) >= context_length:
        raise BadRequest(field, f"the prompt has {len(ids)} tokens; the context length is {context_length}")
    for i, t in enumerate(ids):
        if not isinstance(t, int) or isinstance(t, bool):
            raise BadRequest(field, f"token ids must be integers, got {t!r} at position {i}")
        if not 0 <= t < vocab_size:
            raise BadRequest(
                field, f"token id {t} at position {i} is outside the vocabulary [0, {vocab_size})"
            )
    return ids


@dataclass(frozen=True)
class GenerateRequest:
    """A parsed ``/generate`` body: the engine requests plus how to shape their responses."""

    specs: list[RequestSpec]
    batched: bool  # answer with a list (a list of prompts, or n > 1)
    stream: bool
    return_logprob: bool
    logprob_start_len: int
    top_logprobs_num: int
    return_text_in_logprobs: bool
    return_routed_experts: bool = False


def parse_generate(
    payload: Any,
    tokenizer: Any,
    vocab_size: int,
    context_length: int,
    new_id: Callable[[], str],
    *,
    moe: bool = False,
    limits: RequestLimits = DEFAULT_LIMITS,
) -> GenerateRequest:
    """Validate a ``/generate`` body; ``BadRequest`` names the first bad field. ``moe``: the
    model has MoE layers (``return_routed_experts`` is refused otherwise). Counts are checked
    before the work they cost (tokenizing, building requests) is done."""
    if not isinstance(payload, Mapping):
        raise BadRequest(None, f"the body must be a JSON object, got {type(payload).__name__}")
    check_fields(payload, GENERATE_FIELDS, UNSUPPORTED_FIELDS)
    has_text, has_ids = payload.get("text") is not None, payload.get("input_ids") is not None
    if has_text == has_ids:
        raise BadRequest("text", "give exactly one of text or input_ids")
    if has_text:
        text = payload["text"]
        batched = isinstance(text, list)
        texts = text if batched else [text]
        if not texts or not all(isinstance(t, str) for t in texts):
            raise BadRequest("text", "must be a string or a non-empty list of strings")
        check_count(len(texts), "text", "prompts", limits.max_requests)
        if tokenizer is None:
            raise BadRequest("text", "this engine has no tokenizer: send input_ids")
        field, count = "text", len(texts)
    else:
        ids = payload["input_ids"]
        if not isinstance(ids, list):
            raise BadRequest("input_ids", "must be a list of token ids or a list of such lists")
        batched = bool(ids) and isinstance(ids[0], list)
        raw_prompts = ids if batched else [ids]
        if batched and not all(isinstance(p, list) for p in raw_prompts):
            raise BadRequest("input_ids", "a batch must be a list of lists of token ids")
        check_count(len(raw_prompts), "input_ids", "prompts", limits.max_requests)
        field, count = "input_ids", len(raw_prompts)

    raw_params = payload.get("sampling_params") or {}
    if isinstance(raw_params, list):
        if len(raw_params) != count:
            raise BadRequest("sampling_params", f"{len(raw_params)} given for {count} prompts")
        params = [sampling_params(p) for p in raw_params]
    else:
        params = [sampling_params(raw_params)] * count
    n_total = sum(p.n for p in params)
    check_count(n_total, "sampling_params", "requests (prompts x n)", limits.max_requests)

    if has_text:  # only now: tokenizing is the expensive part
        most = max_text_chars(tokenizer, context_length)
        raw_prompts = [list(tokenizer.encode(check_text(t, "text", most))) for t in texts]
    prompts = [check_prompt(p, field, vocab_size, context_length) for p in raw_prompts]

    return_logprob = expect(payload, "return_logprob", bool, False, "true or false")
    start = expect(payload, "logprob_start_len", int, -1, "an integer >= -1")
    if start < -1:
        raise BadRequest("logprob_start_len", f"must be an integer >= -1, got {start}")
    if return_logprob and start >= 0:
        for p in prompts:
            if start >= len(p):
                raise BadRequest("logprob_start_len", f"{start} is not inside the prompt ({len(p)} tokens)")
    top = expect(payload, "top_logprobs_num", int, 0, "an integer >= 0")
    if not 0 <= top <= limits.max_top_logprobs:
        raise BadRequest(
            "top_logprobs_num", f"must be an integer in [0, {limits.max_top_logprobs}], got {top}"
        )

    routed = expect(payload, "return_routed_experts", bool, False, "true or false")
    if routed and not moe:
        raise BadRequest("return_routed_experts", "this model has no MoE layers: no experts to return")

    rids = _rids(payload.get("rid"), len(prompts), batched, new_id, limits)
    specs: list[RequestSpec] = []
    for prompt, sp, r in zip(prompts, params, rids):
        for j in range(sp.n):
            specs.append(
                RequestSpec(
                    prompt_ids=prompt,
                    sampling_params=sp,
                    request_id=r if sp.n == 1 else f"{r}-{j}",
                    return_prompt_logprobs=return_logprob and start >= 0,
                    top_logprobs_num=top if return_logprob else 0,
                    return_routed_experts=routed,
                )
            )
    stream = expect(payload, "stream", bool, False, "true or false")
    if stream and n_total > 1:
        raise BadRequest("stream", "only one prompt with n = 1 can be streamed from /generate")
    return GenerateRequest(
        specs=specs,
        batched=batched or n_total > len(prompts),
        stream=stream,
        return_logprob=return_logprob,
        logprob_start_len=start,
        top_logprobs_num=top,
        return_text_in_logprobs=expect(payload, "return_text_in_logprobs", bool, False, "true or false"),
        return_routed_experts=routed,
    )


def _rids(
    rid: Any, count: int, batched: bool, new_id: Callable[[], str], limits: RequestLimits
) -> Sequence[str]:
    if rid is None:
        return [new_id() for _ in range(count)]
    if isinstance(rid, str) and not batched:
        rids = [rid]
    elif isinstance(rid, list) and len(rid) == count and all(isinstance(r, str) for r in rid):
        rids = rid
    else:
        raise BadRequest("rid", "must be a string (one prompt) or a list of strings, one per prompt")
    for r in rids:
        if not 0 < len(r) <= limits.max_rid_chars:
            raise BadRequest("rid", f"a rid has 1 to {limits.max_rid_chars} characters, got {len(r)}")
        check_text(r, "rid", limits.max_rid_chars)
    return rids


def decode_output(tokenizer: Any, out: RequestOutput, params: SamplingParams) -> str | None:
    """The output text as SGLang gives it: special tokens skipped (by default), the matched stop
    token or string cut. The engine builds it (one place for the rules); decoded here only when
    the engine had no tokenizer."""
    if out.text is not None or tokenizer is None:
        return out.text
    return str(tokenizer.decode(list(out.output_ids), skip_special_tokens=params.skip_special_tokens))


def generate_response(
    out: RequestOutput, spec: RequestSpec, req: GenerateRequest, tokenizer: Any, started: float
) -> dict[str, Any]:
    """One SGLang ``/generate`` response dict (cumulative when streamed)."""

    def tok_text(tid: int) -> str | None:
        if req.return_text_in_logprobs and tokenizer is not None:
            return str(tokenizer.decode([tid]))
        return None

    meta: dict[str, Any] = {
        "id": out.request_id,
        "finish_reason": out.finish_reason.to_dict() if out.finish_reason is not None else None,
        "prompt_tokens": out.prompt_tokens,
        "completion_tokens": out.completion_tokens,
        "cached_tokens": out.cached_tokens,
        "weight_version": str(out.weight_version),
        "e2e_latency": time.perf_counter() - started,
    }
    if req.return_logprob:
        meta["output_token_logprobs"] = [
            [lp, tid, tok_text(tid)] for lp, tid in zip(out.output_logprobs, out.output_ids)
        ]
        meta["output_token_weight_versions"] = list(out.output_weight_versions)
        inputs: list[list[Any]] = []
        if req.logprob_start_len >= 0 and out.prompt_logprobs is not None:
            ids = spec.prompt_ids
            for p in range(req.logprob_start_len, len(ids)):
                lp = None if p == 0 else out.prompt_logprobs[p - 1]
                inputs.append([lp, ids[p], tok_text(ids[p])])
        meta["input_token_logprobs"] = inputs
        if req.top_logprobs_num > 0 and out.output_top_logprobs is not None:
            meta["output_top_logprobs"] = [
                [[lp, tid, tok_text(tid)] for tid, lp in pos] for pos in out.output_top_logprobs
            ]
    if req.return_routed_experts and out.routed_experts is not None:
        meta["routed_experts"] = encode_routed_experts(out.routed_experts)
    return {
        "text": decode_output(tokenizer, out, spec.sampling_params),
        "output_ids": list(out.output_ids),
        "meta_info": meta,
    }


def encode_routed_experts(ids: Any) -> str:
    """SGLang's ``meta_info.routed_experts``: base64 of the little-endian int32 bytes."""
    return base64.b64encode(ids.astype("<i4", copy=False).tobytes()).decode("ascii")


async def prepare_generate(
    engine: AsyncEngine, payload: Any, limits: RequestLimits = DEFAULT_LIMITS
) -> GenerateRequest:
    """``parse_generate`` for ``engine``: inline for a small pre-tokenized body, else on the
    engine's preparation thread (off the event loop).

    Inline matters for reproducibility: the rollout's ``generate`` calls, made in one pass of the
    event loop, must reach the engine in that pass, as one admission (``AsyncEngine._enqueue_add``).
    Handed to a thread, each would come back whenever the thread finished it, and the engine's
    batches, hence its GEMM shapes and log-prob bits, would depend on timing. Checking a few
    thousand token ids costs the loop less than the hand-over; texts (tokenization) and large
    bodies go to the thread."""
    core = engine.engine

    def parse() -> GenerateRequest:
        return parse_generate(
            payload,
            core.tokenizer,
            core.vocab_size,
            core.context_length,
            engine.new_request_id,
            moe=core.routing is not None,
            limits=limits,
        )

    return parse() if _small_token_ids(payload) else await engine.offload(parse)


INLINE_TOKEN_IDS = 8192  # token ids a body may carry and still be parsed on the event loop


def _small_token_ids(payload: Any) -> bool:
    """Whether ``payload`` is pre-tokenized (no ``text``) with at most ``INLINE_TOKEN_IDS`` ids."""
    if not isinstance(payload, Mapping) or payload.get("text") is not None:
        return False
    ids = payload.get("input_ids")
    if not isinstance(ids, list) or len(ids) > INLINE_TOKEN_IDS:
        return False
    total = 0
    for item in ids:
        total += len(item) if isinstance(item, list) else 1
        if total > INLINE_TOKEN_IDS:
            return False
    return True


async def run_generate(
    engine: AsyncEngine, payload: Any, limits: RequestLimits = DEFAULT_LIMITS
) -> dict[str, Any] | list[dict[str, Any]]:
    """Serve one non-streaming ``/generate`` body on ``engine`` (what the server and
    ``LocalEngineClient`` both do). Raises ``BadRequest`` for invalid input, and the engine's
    ``EngineOverloaded`` (full) or ``EngineStateError`` (memory released) as they come."""
    started = time.perf_counter()
    core = engine.engine
    req = await prepare_generate(engine, payload, limits)
    try:
        outs = await engine.generate(req.specs)
    except ValueError as e:  # the engine's own checks (e.g. a rid already in use)
        raise BadRequest(None, str(e)) from None
    tokenizer = core.tokenizer
    results = [generate_response(o, s, req, tokenizer, started) for o, s in zip(outs, req.specs)]
    return results if req.batched else results[0]
