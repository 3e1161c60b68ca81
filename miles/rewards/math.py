"""Math rewards: ``math`` (1/0, lenient extraction), ``dapo`` (+1/-1), ``deepscaler`` (1/0, boxed).

Each built-in exists twice: a pure function of ``(response, label)`` and the reward hook
``async``-free ``(args, sample) -> float`` that :mod:`miles.rewards.scoring` calls. The label
is the reference answer (a string or a number; a ``\\boxed{}`` reference is unboxed); a list
label means "any of these".

Rules (extraction and equivalence in :mod:`miles.rewards.math_utils`):

- ``math``: answer = last ``\\boxed{}``, else last ``Answer:`` line, else last number; 1.0 if
  equivalent to the label, else 0.0.
- ``dapo``: as DAPO / slime ``math_dapo``: only the last 300 characters are read, the answer
  is the last ``Answer: ...`` line (Minerva format); +1.0 if equivalent, -1.0 otherwise
  (missing answer included). slime returns ``{"score", "acc", "pred"}`` and needs
  ``--reward-key score``; Miles returns the float score directly.
- ``deepscaler``: the text after the last ``</think>`` (the whole response when there is
  none; slime gives 0 without ``</think>``/``###Response``); a ``\\boxed{}`` answer is
  required; 1.0 if equivalent, else 0.0.
"""

from __future__ import annotations

from typing import Any

from miles.rewards.math_utils import extract_answer, extract_boxed, extract_final_answer_line, is_equiv
from miles.types import Sample

__all__ = ["dapo_reward", "deepscaler_reward", "math_reward", "rm_dapo", "rm_deepscaler", "rm_math"]

_DAPO_TAIL_CHARS = 300  # DAPO's compute_score reads only the end of long reasoning traces


def _golds(label: Any) -> list[Any]:
    if label is None:
        raise ValueError("math reward needs a label (set --label-key)")
    return list(label) if isinstance(label, (list, tuple)) else [label]


def _matches(answer: str | None, label: Any) -> bool:
    return answer is not None and any(is_equiv(answer, g) for g in _golds(label))


def math_reward(response: str, label: Any) -> float:
    """1.0 if the extracted answer (boxed, ``Answer:``, or last number) equals the label."""
    _golds(label)
    return 1.0 if _matches(extract_answer(response), label) else 0.0


def dapo_reward(response: str, label: Any) -> float:
    """+1.0 if the last ``Answer:`` line of the response tail equals the label, else -1.0."""
    _golds(label)
    answer = extract_final_answer_line(response[-_DAPO_TAIL_CHARS:])
    return 1.0 if _matches(answer, label) else -1.0


def deepscaler_reward(response: str, label: Any) -> float:
    """1.0 if the boxed answer after the last ``</think>`` equals the label, else 0.0."""
    _golds(label)
    solution = response.rsplit("</think>", 1)[-1]
    return 1.0 if _matches(extract_boxed(solution), label) else 0.0


def rm_math(args: Any, sample: Sample) -> float:
    return math_reward(sample.response, sample.label)


def rm_dapo(args: Any, sample: Sample) -> float:
    return dapo_reward(sample.response, sample.label)


def rm_deepscaler(args: Any, sample: Sample) -> float:
    return deepscaler_reward(sample.response, sample.label)
