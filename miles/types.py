"""Shared records passed between subsystems (DESIGN.md §2).

One spelling per concept: ``*_ids`` for token ids, ``logprobs`` for natural-log probabilities,
``response_len`` for the number of generated tokens. Subsystems pass these records, never loose
dicts of tensors.

This module must stay importable without torch (``miles --help`` is instant): tensors appear
only in annotations, which are strings here.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np
    import torch


# --------------------------------------------------------------------------------------------
# Sampling parameters (SGLang's `sampling_params` object, same field names)
# --------------------------------------------------------------------------------------------


# Bounds on what one request may ask for. SGLang has none for most of these; a server needs
# them, or one request can queue unbounded work (``n = 10**30``) or keep a per-step check busy.
MAX_N = 1024  # samples of one prompt: above any GRPO group size in use; more are separate requests
MAX_STOP_STRINGS = 64
MAX_STOP_STRING_CHARS = 1024
MAX_STOP_TOKEN_IDS = 1024
MAX_TOKENS = 2**31 - 1  # max_new_tokens / min_new_tokens / top_k / token ids: int32 (the context caps them)
# Below this a temperature is greedy: the logits are divided by it, and a divisor this small
# turns fp32 logits into infinities (1e-45 is 0 or subnormal in fp32; 1/1e-300 is inf) and
# the distribution into NaN. At 1e-6 the scaled logits stay finite for any logit below
# 3.4e32 in magnitude, and a logit gap of 1e-4 is already 100 nats: the distribution is the
# argmax to within fp32's resolution, so nothing is lost. SGLang uses the same threshold.
GREEDY_TEMPERATURE = 1e-6
# repetition_penalty multiplies or divides the logits: within [1/100, 100] a finite fp32 logit
# stays finite for any logit a model produces (below 3.4e36 in magnitude). SGLang allows [0, 2].
REPETITION_PENALTY_RANGE = (0.01, 100.0)


@dataclass(frozen=True)
class SamplingParams:
    """How to sample one request; field names and meanings follow SGLang's ``sampling_params``.

    ``temperature == 0`` means greedy, and so does any temperature below ``GREEDY_TEMPERATURE``
    (see there). ``top_k == -1`` disables top-k. ``sampling_seed`` makes the request's output
    depend only on the seed and the token position, never on what else shares the batch.
    Log-probabilities returned for sampled tokens are under the distribution actually sampled
    from (after temperature, top-k, top-p and min-p).

    Every field is type-checked and bounded on construction (``ValueError`` naming the field):
    JSON booleans for the flags, finite numbers, and the counts and sizes above (``MAX_N``,
    ``MAX_STOP_*``, ``MAX_TOKENS``, a 64-bit ``sampling_seed``), so no request can make the engine
    loop or allocate without bound. Checks that need the model (token ids below the vocabulary
    size) are the engine's, at ``add_request``.
    """

    max_new_tokens: int = 128
    min_new_tokens: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    no_stop_trim: bool = False
    sampling_seed: int | None = None
    n: int = 1

    def __post_init__(self) -> None:
        # Accept lists (JSON) and a single stop string, as SGLang does; store tuples (hashable).
        # Anything else is refused here, before tuple() turns a dict into its keys.
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        elif isinstance(self.stop, list):
            object.__setattr__(self, "stop", tuple(self.stop))
        if isinstance(self.stop_token_ids, list):
            object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first invalid field."""
        lo_rep, hi_rep = REPETITION_PENALTY_RANGE
        checks: list[tuple[str, bool, str]] = [
            (
                "max_new_tokens",
                _is_int(self.max_new_tokens, 0, MAX_TOKENS),
                f"an integer in [0, {MAX_TOKENS}]",
            ),
            (
                "min_new_tokens",
                _is_int(self.min_new_tokens, 0, MAX_TOKENS),
                f"an integer in [0, {MAX_TOKENS}]",
            ),
            ("temperature", _is_num(self.temperature) and self.temperature >= 0, "a finite number >= 0"),
            ("top_p", _is_num(self.top_p) and 0 < self.top_p <= 1, "a number in (0, 1]"),
            (
                "top_k",
                (_is_int(self.top_k) and self.top_k == -1) or _is_int(self.top_k, 1, MAX_TOKENS),
                f"-1 or an integer in [1, {MAX_TOKENS}]",
            ),
            ("min_p", _is_num(self.min_p) and 0 <= self.min_p <= 1, "a number in [0, 1]"),
            (
                "repetition_penalty",
                _is_num(self.repetition_penalty) and lo_rep <= self.repetition_penalty <= hi_rep,
                f"a number in [{lo_rep:g}, {hi_rep:g}] (1 = off)",
            ),
            (
                "frequency_penalty",
                _is_num(self.frequency_penalty) and -2 <= self.frequency_penalty <= 2,
                "a number in [-2, 2]",
            ),
            (
                "presence_penalty",
                _is_num(self.presence_penalty) and -2 <= self.presence_penalty <= 2,
                "a number in [-2, 2]",
            ),
            ("n", _is_int(self.n, 1, MAX_N), f"an integer in [1, {MAX_N}]"),
            (
                "stop",
                isinstance(self.stop, tuple)
                and len(self.stop) <= MAX_STOP_STRINGS
                and all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_STRING_CHARS for s in self.stop),
                f"a string or a list of at most {MAX_STOP_STRINGS} non-empty strings of at most "
                f"{MAX_STOP_STRING_CHARS} characters",
            ),
            (
                "stop_token_ids",
                isinstance(self.stop_token_ids, tuple)
                and len(self.stop_token_ids) <= MAX_STOP_TOKEN_IDS
                and all(_is_int(t, 0, MAX_TOKENS) for t in self.stop_token_ids),
                f"a list of at most {MAX_STOP_TOKEN_IDS} token ids in [0, {MAX_TOKENS}]",
            ),
            ("ignore_eos", isinstance(self.ignore_eos, bool), "true or false"),
            ("skip_special_tokens", isinstance(self.skip_special_tokens, bool), "true or false"),
            (
                "spaces_between_special_tokens",
                isinstance(self.spaces_between_special_tokens, bool),
                "true or false",
            ),
            ("no_stop_trim", isinstance(self.no_stop_trim, bool), "true or false"),
            (
                "sampling_seed",
                self.sampling_seed is None or _is_int(self.sampling_seed, -(2**63), 2**64 - 1),
                "null or an integer in [-2**63, 2**64) (64 bits, signed or not)",
            ),
        ]
        for name, ok, expected in checks:
            if not ok:
                raise ValueError(
                    f"sampling_params.{name} must be {expected}, got {_show(getattr(self, name))}"
                )
        if self.min_new_tokens > self.max_new_tokens:
            raise ValueError(
                f"sampling_params.min_new_tokens ({self.min_new_tokens}) exceeds max_new_tokens ({self.max_new_tokens})"
            )

    @property
    def greedy(self) -> bool:
        """Whether the request takes the argmax: ``temperature`` below ``GREEDY_TEMPERATURE``."""
        return self.temperature < GREEDY_TEMPERATURE

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SamplingParams:
        """Build from a JSON object; unknown fields raise ``ValueError`` naming them."""
        known = {f.name for f in fields(cls)}
        # Names cut short: they come from a request.
        unknown = sorted(str(k) if len(str(k)) <= 40 else str(k)[:37] + "..." for k in set(data) - known)
        if unknown:
            raise ValueError(
                f"unknown sampling_params field(s): {', '.join(unknown[:8])}; "
                f"known: {', '.join(sorted(known))}"
            )
        return cls(**{k: v for k, v in data.items() if v is not None or k == "sampling_seed"})

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["stop"] = list(self.stop)
        out["stop_token_ids"] = list(self.stop_token_ids)
        return out


def _is_int(x: object, lo: int | None = None, hi: int | None = None) -> bool:
    """An ``int`` (not a ``bool``), within ``[lo, hi]`` where given."""
    if not isinstance(x, int) or isinstance(x, bool):
        return False
    return (lo is None or x >= lo) and (hi is None or x <= hi)


def _is_num(x: object) -> bool:
    """A finite ``int`` or ``float`` (not a ``bool``; an int too large for a float is not finite)."""
    if not isinstance(x, (int, float)) or isinstance(x, bool):
        return False
    try:
        return math.isfinite(x)
    except OverflowError:
        return False


def _show(value: object, limit: int = 80) -> str:
    """``repr`` cut to ``limit`` characters: the value in an error comes from a request."""
    if isinstance(value, int) and value.bit_length() > 64:
        return f"an integer of {value.bit_length()} bits"  # str() of a huge int is slow, or refused
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --------------------------------------------------------------------------------------------
# Weight versions
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, order=True)
class WeightVersion:
    """The version of the policy weights an engine serves; every response reports it.

    ``step`` counts weight updates pushed by the trainer (0 = the weights loaded at start).
    On the wire (SGLang's ``weight_version``) it is the decimal string of ``step``.
    """

    step: int = 0

    def __str__(self) -> str:
        return str(self.step)

    def next(self) -> WeightVersion:
        return WeightVersion(self.step + 1)

    @classmethod
    def parse(cls, text: str | int) -> WeightVersion:
        try:
            step = int(text)
        except (TypeError, ValueError):
            raise ValueError(f"weight_version must be a non-negative integer, got {text!r}") from None
        if step < 0:
            raise ValueError(f"weight_version must be a non-negative integer, got {text!r}")
        return cls(step)


# --------------------------------------------------------------------------------------------
# Samples and groups
# --------------------------------------------------------------------------------------------


class SampleStatus(str, enum.Enum):
    """Terminal state of a sample. Only ``completed`` and ``truncated`` samples are trained on."""

    PENDING = "pending"
    COMPLETED = "completed"  # stopped on EOS, a stop token or a stop string
    TRUNCATED = "truncated"  # hit max_new_tokens / the context limit
    ABORTED = "aborted"  # aborted by the engine or the user (e.g. partial rollout)
    FAILED = "failed"  # generation or reward raised; ``Sample.error`` says why

    @property
    def trainable(self) -> bool:
        return self in (SampleStatus.COMPLETED, SampleStatus.TRUNCATED)


@dataclass
class Sample:
    """One prompt and one response: the unit of data between rollout and training.

    Deliberately mutable: it is filled in stages (generate, then reward, then advantages), and
    slime-style custom hooks mutate and return it.

    Shapes (``R = response_len``):
      - ``prompt_ids``: prompt token ids (chat template applied), length P.
      - ``response_ids``: generated token ids, length R (tool/env tokens included, masked out).
      - ``rollout_logprobs``: log-prob of each response token under the sampling distribution of
        the engine, length R (0.0 where the policy did not produce the token).
      - ``loss_mask``: 1 where the policy produced the token and it is trained on, 0 otherwise;
        length R. ``None`` means all ones.
      - ``routed_experts``: int32 array ``[P + R - 1, num_moe_layers, top_k]`` of the experts the
        engine chose per token (rollout routing replay), or ``None``.
      - ``weight_versions``: the engine weight version(s) the response was generated under; more
        than one when a partial rollout spanned a weight update.
      - ``response_versions``: the weight version (``WeightVersion.step``) that produced each
        response token, length R, non-decreasing; ``None`` when the engine does not report it.
        Read it through :meth:`token_versions`, which treats a list of another length (a hook
        appended tokens without it) as unknown.
    """

    prompt: str | list[dict[str, Any]] = ""
    prompt_ids: list[int] = field(default_factory=list)
    response: str = ""
    response_ids: list[int] = field(default_factory=list)
    rollout_logprobs: list[float] | None = None
    loss_mask: list[int] | None = None
    label: Any = None
    reward: float | None = None
    status: SampleStatus = SampleStatus.PENDING
    weight_versions: list[str] = field(default_factory=list)
    response_versions: list[int] | None = None
    routed_experts: np.ndarray | None = None
    index: int = 0  # position of the sample within the rollout
    group_index: int = 0  # index of the prompt (group) it belongs to
    metadata: dict[str, Any] = field(default_factory=dict)
    error: str | None = None

    @property
    def response_len(self) -> int:
        return len(self.response_ids)

    @property
    def total_len(self) -> int:
        return len(self.prompt_ids) + len(self.response_ids)

    def token_versions(self) -> list[int] | None:
        """``response_versions`` when it has one entry per response token, else ``None`` (not
        reported, or a slime-style hook appended tokens without extending it: unknown)."""
        v = self.response_versions
        return list(v) if v is not None and len(v) == self.response_len else None

    def effective_loss_mask(self) -> list[int]:
        return [1] * self.response_len if self.loss_mask is None else list(self.loss_mask)

    def check(self) -> None:
        """Raise ``ValueError`` if the per-token fields disagree in length."""
        r = self.response_len
        if self.rollout_logprobs is not None and len(self.rollout_logprobs) != r:
            raise ValueError(
                f"sample {self.index}: rollout_logprobs has {len(self.rollout_logprobs)} entries, response_ids has {r}"
            )
        if self.loss_mask is not None and len(self.loss_mask) != r:
            raise ValueError(
                f"sample {self.index}: loss_mask has {len(self.loss_mask)} entries, response_ids has {r}"
            )


@dataclass(frozen=True)
class Group:
    """The ``n`` samples generated for one prompt (the unit GRPO normalises over)."""

    index: int
    samples: tuple[Sample, ...]

    def __post_init__(self) -> None:
        if not self.samples:
            raise ValueError(f"group {self.index} has no samples")

    @property
    def rewards(self) -> list[float | None]:
        return [s.reward for s in self.samples]

    def __len__(self) -> int:
        return len(self.samples)


# --------------------------------------------------------------------------------------------
# Trainer input
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainBatch:
    """Packed tensors for the trainer: B sequences concatenated into T tokens, no padding.

    Token-aligned tensors have shape ``[T]``; entry ``t`` refers to *predicting token t* from the
    tokens before it, so the first token of every sequence carries no loss (mask 0).

      - ``input_ids`` int64 ``[T]``; ``positions`` int64 ``[T]`` (restart at 0 per sequence).
      - ``cu_seqlens`` int32 ``[B + 1]``: sequence ``i`` is ``[cu_seqlens[i], cu_seqlens[i+1])``.
      - ``loss_mask`` float32 ``[T]``: 1 on response tokens the policy produced.
      - ``rollout_logprobs`` float32 ``[T]``: the engine's log-prob of each token (0 elsewhere).
      - ``advantages`` float32 ``[T]`` and ``returns`` (PPO) float32 ``[T]``.
      - ``rewards`` float32 ``[B]``; ``response_lens`` int64 ``[B]``.
      - ``sample_indices``: the ``Sample.index`` of each sequence, for logging and dumps.
      - ``routed_experts``: int32 ``[T, num_moe_layers, top_k]`` for routing replay, or None.
      - ``rollout_versions``: int64 ``[T]``, the weight version that produced each response
        token (prompt tokens: the sequence's oldest), or None when a sample does not report it.
    """

    input_ids: torch.Tensor
    positions: torch.Tensor
    cu_seqlens: torch.Tensor
    loss_mask: torch.Tensor
    rollout_logprobs: torch.Tensor
    advantages: torch.Tensor
    rewards: torch.Tensor
    response_lens: torch.Tensor
    sample_indices: tuple[int, ...]
    returns: torch.Tensor | None = None
    routed_experts: torch.Tensor | None = None
    weight_versions: tuple[str, ...] = ()
    rollout_versions: torch.Tensor | None = None

    @property
    def num_sequences(self) -> int:
        return int(self.cu_seqlens.numel()) - 1

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.numel())

    def check(self) -> None:
        """Raise ``ValueError`` naming the first tensor whose shape disagrees with the packing."""
        t, b = self.num_tokens, self.num_sequences
        per_token = ("positions", "loss_mask", "rollout_logprobs", "advantages", "rollout_versions")
        for name in per_token:
            if getattr(self, name) is None:
                continue
            n = int(getattr(self, name).numel())
            if n != t:
                raise ValueError(f"TrainBatch.{name} has {n} entries, input_ids has {t}")
        for name in ("rewards", "response_lens"):
            n = int(getattr(self, name).numel())
            if n != b:
                raise ValueError(f"TrainBatch.{name} has {n} entries for {b} sequences")
        if len(self.sample_indices) != b:
            raise ValueError(
                f"TrainBatch.sample_indices has {len(self.sample_indices)} entries for {b} sequences"
            )
        if int(self.cu_seqlens[-1]) != t:
            raise ValueError(f"TrainBatch.cu_seqlens ends at {int(self.cu_seqlens[-1])}, input_ids has {t}")
