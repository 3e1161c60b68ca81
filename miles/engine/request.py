"""One generation request inside the engine, and the record the engine hands back for it.

Lifecycle: ``WAITING`` (queued, no KV blocks) -> ``RUNNING`` (holds blocks for all its known
tokens; prefill may span several steps) -> ``FINISHED``. Preemption moves a running request back
to ``WAITING`` and drops its blocks; it is recomputed from scratch (its generated tokens become
part of the prompt that is prefilled again, so nothing sampled is lost). Retraction
(``Engine.pause_generation("retract")``) does the same to every running request at once.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch

from miles.types import SamplingParams, WeightVersion


class RequestStatus(str, enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(frozen=True)
class FinishReason:
    """Why a request stopped, shaped like SGLang's ``meta_info.finish_reason``.

    ``type`` is ``stop`` (EOS, a stop token id or a stop string; ``matched`` is that id or
    string), ``length`` (``max_new_tokens``, the context length or the KV capacity; ``matched``
    is ``None``) or ``abort`` (``message`` says why).
    """

    type: Literal["stop", "length", "abort"]
    matched: int | str | None = None
    message: str | None = None

    def to_dict(self) -> dict[str, object]:
        out: dict[str, object] = {"type": self.type}
        if self.type == "stop":
            out["matched"] = self.matched
        elif self.type == "length":
            out["length"] = self.matched
        else:
            out["message"] = self.message
        return out


@dataclass(eq=False)
class Request:
    """Mutable engine-side state of one request. Compared (and hashed) by identity: the queues
    remove and look up requests with ``==``, and a field-by-field dataclass comparison made
    finishing a rollout's requests a quadratic number of comparisons of every field, a visible
    part of its host time (docs/performance.md, "Figures behind design choices").

    ``block_table[i]`` is the KV block holding tokens ``[i * block_size, (i + 1) * block_size)``
    of ``all_token_ids``; ``block_hashes[i]`` is the chained prefix hash of full block ``i``
    (registered blocks only). ``num_computed_tokens`` tokens have their K/V in the cache; the
    rest of ``all_token_ids`` is fed to the model in the next steps.

    ``output_weight_versions[i]`` is the ``WeightVersion.step`` of the weights whose forward
    gave the logits ``output_ids[i]`` was sampled from (an overlapped step's: the version it was
    launched under). It grows with ``output_ids`` and, like them, survives preemption and
    retraction: a token keeps the version that sampled it even when its K/V are recomputed later
    under other weights.
    """

    request_id: str
    prompt_ids: list[int]
    sampling_params: SamplingParams
    weight_version: WeightVersion = field(default_factory=WeightVersion)
    return_prompt_logprobs: bool = False
    top_logprobs_num: int = 0
    arrival_index: int = 0
    output_ids: list[int] = field(default_factory=list)
    output_logprobs: list[float] = field(default_factory=list)
    output_weight_versions: list[int] = field(default_factory=list)
    output_top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    # logprob of prompt token i + 1 given prompt tokens <= i (raw model distribution).
    prompt_logprobs: list[float] = field(default_factory=list)
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: FinishReason | None = None
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)
    num_ready_blocks: int = 0  # leading blocks of block_table whose K/V are computed
    num_computed_tokens: int = 0
    cached_tokens: int = 0
    num_preemptions: int = 0
    text: str | None = None
    # Whether every step's cumulative output is wanted (streaming) or only the final one; a
    # non-streamed request's text is decoded when needed (stop strings, finish), not every step.
    stream: bool = True
    decoded_upto: int = 0  # output tokens ``text`` covers
    # Rollout routing replay: host buffer int32 [capacity, moe_layers, top_k] whose first
    # num_routed_rows rows are the experts of tokens 0.. (see miles.engine.routing).
    return_routed_experts: bool = False
    routed_experts: torch.Tensor | None = None
    num_routed_rows: int = 0

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    def token_slice(self, start: int, end: int) -> list[int]:
        """``all_token_ids[start:end]`` without building the whole list (a decode step reads one
        token of each request; concatenating prompt and output for it was O(length))."""
        n = len(self.prompt_ids)
        if end <= n:
            return self.prompt_ids[start:end]
        if start >= n:
            return self.output_ids[start - n : end - n]
        return self.prompt_ids[start:] + self.output_ids[: end - n]

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def num_remaining(self) -> int:
        """Tokens not yet fed to the model (1 for a request in decode)."""
        return self.num_tokens - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status == RequestStatus.FINISHED


@dataclass(frozen=True)
class RequestOutput:
    """What the engine reports for a request after a step (or at the end).

    ``output_logprobs[i]`` is the log-probability of ``output_ids[i]`` under the distribution it
    was sampled from (see ``miles.engine.sampler``). ``prompt_logprobs`` (when asked for) has
    ``prompt_tokens - 1`` entries: token ``i + 1`` given the tokens up to ``i``. ``text`` is the
    decoded output (stop string trimmed unless ``no_stop_trim``) when the engine has a tokenizer.
    ``routed_experts`` (finished requests that asked for it): int32 ``[tokens - 1, moe_layers,
    top_k]``, the experts each fed token used (fewer rows if aborted before all were fed).
    ``output_weight_versions[i]`` is the weight version (``WeightVersion.step``) that sampled
    ``output_ids[i]`` (one per output token; non-decreasing as long as every weight update sets
    a version no lower than the one before). ``weight_version`` is that of the request's last
    forward.
    """

    request_id: str
    output_ids: tuple[int, ...]
    output_logprobs: tuple[float, ...]
    finish_reason: FinishReason | None
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    weight_version: WeightVersion
    text: str | None = None
    prompt_logprobs: tuple[float, ...] | None = None
    output_top_logprobs: tuple[tuple[tuple[int, float], ...], ...] | None = None
    routed_experts: np.ndarray | None = None
    output_weight_versions: tuple[int, ...] = ()

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @classmethod
    def of(cls, req: Request) -> RequestOutput:
        return cls(
            request_id=req.request_id,
            output_ids=tuple(req.output_ids),
            output_logprobs=tuple(req.output_logprobs),
            finish_reason=req.finish_reason,
            prompt_tokens=len(req.prompt_ids),
            completion_tokens=len(req.output_ids),
            cached_tokens=req.cached_tokens,
            weight_version=req.weight_version,
            text=req.text,
            prompt_logprobs=tuple(req.prompt_logprobs) if req.return_prompt_logprobs else None,
            output_top_logprobs=(
                tuple(tuple(t) for t in req.output_top_logprobs) if req.top_logprobs_num > 0 else None
            ),
            routed_experts=_routed_experts(req),
            output_weight_versions=tuple(req.output_weight_versions),
        )


def _routed_experts(req: Request) -> np.ndarray | None:
    """Only at the end (a streamed request would copy its whole record every step)."""
    buf = req.routed_experts
    if not req.return_routed_experts or req.finish_reason is None or buf is None:
        return None
    n = max(0, min(req.num_routed_rows, req.num_tokens - 1))
    return buf[:n].numpy().copy()
