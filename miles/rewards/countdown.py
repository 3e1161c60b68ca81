"""The Countdown reward of TinyZero (``verl/utils/reward_score/countdown.py``).

Label: ``{"target": int, "numbers": [int, ...]}`` (a JSON string of that object is accepted).
The response must write an equation in ``<answer>...</answer>``; the last such tag counts.

Score, exactly as TinyZero's ``compute_score`` (``format_score=0.1``, ``score=1.0``):

- no ``<answer>`` tag: 0.0;
- the numbers in the equation (every run of digits, ``re.findall(r"\\d+")``), sorted, differ
  from the label's numbers sorted, i.e. a number unused, reused or not given: 0.1;
- the equation does not evaluate (bad syntax, division by zero, disallowed syntax): 0.1;
- it evaluates to the target (within 1e-5): 1.0; to anything else: 0.1.

Differences from TinyZero, both deliberate:

- TinyZero's ``solution_str`` includes the prompt, so it first cuts at ``Assistant:`` and keeps
  the last line; a Miles response has no prompt, so the last ``<answer>`` tag anywhere counts
  (an answer on one line, as in TinyZero: the tag's content may not span lines).
- TinyZero calls ``eval`` on anything matching ``[\\d+\\-*/().\\s]+``, which also accepts ``**``
  and ``//``. Here the expression is parsed with :mod:`ast` and only numbers, binary ``+ - * /``,
  unary ``-``/``+`` and parentheses are evaluated; ``**`` and ``//`` count as invalid (0.1).
"""

from __future__ import annotations

import ast
import json
import operator
import re
from collections.abc import Callable
from typing import Any

from miles.types import Sample

__all__ = ["countdown_reward", "evaluate_expression", "extract_equation", "rm_countdown"]

FORMAT_SCORE = 0.1
CORRECT_SCORE = 1.0

_ANSWER = re.compile(r"<answer>(.*?)</answer>")
_ALLOWED_CHARS = re.compile(r"^[\d+\-*/().\s]+$")
_BINARY: dict[type, Callable[[float, float], float]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
}
_MAX_EXPR_CHARS = 200  # a countdown equation is short; long inputs are not worth parsing


def extract_equation(response: str) -> str | None:
    """The content of the last ``<answer>...</answer>`` (stripped), or None."""
    matches = _ANSWER.findall(response)
    return matches[-1].strip() if matches else None


def evaluate_expression(expr: str) -> float | None:
    """Value of an arithmetic expression of numbers, ``+ - * /`` and parentheses; None if invalid.

    Never calls ``eval``: the expression is parsed with :mod:`ast` and walked; any other node
    (names, calls, ``**``, ``//``, ...) makes it invalid, as does division by zero.
    """
    if len(expr) > _MAX_EXPR_CHARS or not _ALLOWED_CHARS.match(expr):
        return None
    try:
        tree = ast.parse(expr, mode="eval")
        return _eval(tree.body)
    except (SyntaxError, ValueError, ZeroDivisionError, OverflowError, RecursionError):
        return None


def _eval(node: ast.AST) -> float:
    if isinstance(node, ast.Constant):
        if isinstance(node.value, bool) or not isinstance(node.value, (int, float)):
            raise ValueError(f"disallowed constant: {node.value!r}")
        return float(node.value)
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        return _BINARY[type(node.op)](_eval(node.left), _eval(node.right))
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        value = _eval(node.operand)
        return -value if isinstance(node.op, ast.USub) else value
    raise ValueError(f"disallowed syntax: {type(node).__name__}")


def _parse_label(label: Any) -> tuple[float, list[int]]:
    if isinstance(label, str):
        try:
            label = json.loads(label)
        except json.JSONDecodeError:
            raise ValueError(f"countdown label must be a JSON object, got {label!r}") from None
    if not isinstance(label, dict) or "target" not in label or "numbers" not in label:
        raise ValueError(f"countdown label must have 'target' and 'numbers', got {label!r}")
    numbers = label["numbers"]
    if not isinstance(numbers, (list, tuple)) or not all(isinstance(n, (int, float)) for n in numbers):
        raise ValueError(f"countdown label 'numbers' must be a list of integers, got {numbers!r}")
    return float(label["target"]), [int(n) for n in numbers]


def countdown_reward(response: str, label: Any) -> float:
    """TinyZero's Countdown score (rules in the module docstring)."""
    target, numbers = _parse_label(label)
    equation = extract_equation(response)
    if equation is None:
        return 0.0
    used = sorted(int(n) for n in re.findall(r"\d+", equation))
    if used != sorted(numbers):
        return FORMAT_SCORE
    value = evaluate_expression(equation)
    if value is None:
        return FORMAT_SCORE
    return CORRECT_SCORE if abs(value - target) < 1e-5 else FORMAT_SCORE


def rm_countdown(args: Any, sample: Sample) -> float:
    return countdown_reward(sample.response, sample.label)
