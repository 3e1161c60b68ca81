"""What a sampled token does to its request: it is appended, the stop conditions are checked
(stop token or EOS past ``min_new_tokens``, stop strings, ``max_new_tokens``, the context
length), and the text is decoded when someone needs it.

Text is decoded every step only for streamed requests (or while stop strings need it); a
non-streamed request's text is decoded once, when it finishes (:func:`decode_text` from the
engine's finish and abort paths). As SGLang, a matched stop token is trimmed from the text (not
from ``output_ids``) unless ``no_stop_trim``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from miles.engine.request import FinishReason, Request


def decode_text(req: Request, tokenizer: Any, trim_last: bool = False) -> None:
    """Set ``req.text`` to its decoded output (without the last token with ``trim_last``)."""
    ids = req.output_ids[:-1] if trim_last else req.output_ids
    skip = req.sampling_params.skip_special_tokens
    try:
        req.text = str(tokenizer.decode(ids, skip_special_tokens=skip))
    except TypeError:  # a minimal tokenizer with decode(ids) only
        req.text = str(tokenizer.decode(ids))
    req.decoded_upto = len(req.output_ids)


def ensure_text(req: Request, tokenizer: Any) -> None:
    """Decode ``req``'s text if it lags its output (a non-streamed request that finishes or is
    aborted). No tokenizer: no text."""
    if tokenizer is not None and req.decoded_upto != len(req.output_ids):
        decode_text(req, tokenizer)


def check_stop_strings(req: Request) -> FinishReason | None:
    """The earliest stop string in ``req.text``, which is cut before it unless ``no_stop_trim``."""
    text = req.text or ""
    hits = [(text.find(s), s) for s in req.sampling_params.stop if s in text]
    if not hits:
        return None
    pos, stop = min(hits)
    if not req.sampling_params.no_stop_trim:
        req.text = text[:pos]
    return FinishReason("stop", matched=stop)


def append_token(
    req: Request,
    token: int,
    logprob: float,
    top: list[tuple[int, float]],
    *,
    weight_version: int,
    eos_token_ids: Sequence[int],
    tokenizer: Any,
    context_length: int,
) -> FinishReason | None:
    """Append ``token`` (sampled under weight version ``weight_version``, a
    ``WeightVersion.step``) to ``req``; return why the request is now finished, or ``None``."""
    p = req.sampling_params
    req.output_ids.append(token)
    req.output_logprobs.append(logprob)
    req.output_weight_versions.append(weight_version)
    if req.top_logprobs_num > 0:
        req.output_top_logprobs.append(top)
    reason: FinishReason | None = None
    is_stop = token in p.stop_token_ids or (not p.ignore_eos and token in eos_token_ids)
    if is_stop and len(req.output_ids) >= p.min_new_tokens:
        reason = FinishReason("stop", matched=token)
    stop_token = reason is not None
    if tokenizer is not None and reason is None and p.stop and len(req.output_ids) >= p.min_new_tokens:
        decode_text(req, tokenizer)
        reason = check_stop_strings(req)
    if reason is None and len(req.output_ids) >= p.max_new_tokens:
        reason = FinishReason("length", matched=len(req.output_ids))
    if reason is None and req.num_tokens >= context_length:
        reason = FinishReason("length", matched=len(req.output_ids))
    if tokenizer is not None and req.decoded_upto != len(req.output_ids) and (req.stream or reason):
        decode_text(req, tokenizer, trim_last=stop_token and not p.no_stop_trim)
    return reason
