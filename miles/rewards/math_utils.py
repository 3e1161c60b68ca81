"""Answer extraction, normalisation and equivalence for math rewards.

Extraction (:func:`extract_answer`): the last ``\\boxed{...}`` (or ``\\fbox{...}``, or
``\\boxed 5``) with nested braces; else the last ``Answer: ...`` line (Minerva/DAPO style);
else the last number in the text.

Normalisation (:func:`normalize_answer`) follows the Hendrycks MATH ``strip_string`` rules:
drop ``$``, ``\\left``/``\\right``, ``\\!``, spaces, trailing ``.``; ``\\dfrac``/``\\tfrac``
-> ``\\frac``; ``\\frac12`` -> ``\\frac{1}{2}``; ``a/b`` -> ``\\frac{a}{b}`` for integers;
``\\text{...}`` units after a value removed (``5 \\text{ cm}`` -> ``5``), bare units from a
short list too; ``\\%``/``%`` and ``^\\circ`` removed; thousands separators (``1,000``)
removed; ``0.50`` -> ``0.5``; a leading ``x =`` dropped.

Equivalence (:func:`is_equiv`): equal after normalisation, or equal as numbers (integers,
decimals, ``\\frac{a}{b}``, ``a/b``, negatives, with exact :class:`fractions.Fraction`
arithmetic); when ``math-verify`` is installed it is consulted last (symbolic equivalence:
``\\sqrt{2}/2`` vs ``\\frac{\\sqrt2}{2}``, intervals, sets). Without it the check is the
sympy-free string/number comparison above, which misses purely symbolic equalities.
"""

from __future__ import annotations

import re
import threading
from fractions import Fraction
from typing import Any

__all__ = [
    "extract_answer",
    "extract_boxed",
    "extract_final_answer_line",
    "has_math_verify",
    "is_equiv",
    "last_boxed_only",
    "normalize_answer",
    "to_number",
]

_BOXED_PREFIXES = ("\\boxed", "\\fbox")


def last_boxed_only(text: str) -> str | None:
    """The last ``\\boxed{...}`` / ``\\fbox{...}`` / ``\\boxed x`` including the command, or None.

    Braces are matched (nesting counted); an unclosed box returns None.
    """
    start = max(text.rfind(p) for p in _BOXED_PREFIXES)
    if start < 0:
        return None
    prefix = next(p for p in _BOXED_PREFIXES if text.startswith(p, start))
    rest = text[start + len(prefix) :]
    if rest.startswith(" "):  # "\boxed 5": the argument runs to the next "$" or whitespace
        arg = rest[1:].split("$")[0].split()
        return f"{prefix} {arg[0]}" if arg else None
    if not rest.startswith("{"):
        return None
    depth = 0
    for i, ch in enumerate(rest):
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return prefix + rest[: i + 1]
    return None


def extract_boxed(text: str) -> str | None:
    """The content of the last boxed expression (nested braces kept), or None if there is none."""
    boxed = last_boxed_only(text)
    if boxed is None:
        return None
    prefix = next(p for p in _BOXED_PREFIXES if boxed.startswith(p))
    inner = boxed[len(prefix) :]
    if inner.startswith(" "):
        return inner[1:]
    return inner[1:-1]


_ANSWER_LINE = re.compile(r"(?i)answer\s*[:：]\s*(.+)")
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


def extract_final_answer_line(text: str) -> str | None:
    """The text after the last ``Answer:`` (case-insensitive) up to the end of its line, or None."""
    matches = _ANSWER_LINE.findall(text)
    if not matches:
        return None
    answer = matches[-1].strip()
    # "Answer: $42$." -> "42"
    answer = answer.rstrip(".").strip()
    if answer.startswith("$") and answer.endswith("$") and len(answer) > 1:
        answer = answer.strip("$").strip()
    return answer or None


def extract_answer(text: str, *, fallback: bool = True) -> str | None:
    """The final answer of a response: last boxed, else last ``Answer:`` line, else last number.

    With ``fallback=False`` only a boxed answer counts.
    """
    boxed = extract_boxed(text)
    if boxed is not None or not fallback:
        return boxed
    line = extract_final_answer_line(text)
    if line is not None:
        return line
    numbers = _NUMBER.findall(text)
    return numbers[-1] if numbers else None


# ------------------------------------------------------------------------------ normalisation

_UNITS = (
    "degrees",
    "degree",
    "cm",
    "centimeters",
    "meters",
    "meter",
    "m",
    "km",
    "kg",
    "g",
    "grams",
    "inches",
    "inch",
    "feet",
    "ft",
    "units",
    "unit",
    "dollars",
    "cents",
    "hours",
    "hour",
    "minutes",
    "seconds",
    "sq",
    "square",
    "mph",
    "miles",
)
_TEXT_UNIT = re.compile(r"^(.*?\S)\s*\\(?:text|textbf|mbox|mathrm)\{\s*[^{}]*\}\s*(?:\^\{?\d\}?)?$")
_BARE_UNIT = re.compile(r"^(-?[\d.,/]+)\s*(?:" + "|".join(_UNITS) + r")(?:\^\d|²|³)?$")
_THOUSANDS = re.compile(r"(?<![\d.])(\d{1,3}(?:,\d{3})+)(?![\d])")


def _fix_fracs(s: str) -> str:
    """``\\frac12`` -> ``\\frac{1}{2}``, ``\\frac1{2}`` -> ``\\frac{1}{2}``."""
    parts = s.split("\\frac")
    out = parts[0]
    for part in parts[1:]:
        out += "\\frac"
        if part.startswith("{") or len(part) < 2:
            out += part
            continue
        a, rest = part[0], part[1:]
        if rest.startswith("{"):
            out += "{" + a + "}" + rest
        else:
            out += "{" + a + "}{" + rest[0] + "}" + rest[1:]
    return out


def _slash_to_frac(s: str) -> str:
    m = re.fullmatch(r"(-?\d+)/(\d+)", s)
    return f"\\frac{{{m.group(1)}}}{{{m.group(2)}}}" if m else s


def normalize_answer(answer: str) -> str:
    """Canonical string form of an answer for comparison (rules in the module docstring)."""
    s = str(answer).strip()
    s = s.replace("\n", "").replace("\\!", "").replace("\\,", "").replace("\\;", "")
    s = s.strip("$").strip()
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = s.replace("\\left", "").replace("\\right", "")
    s = s.replace("^{\\circ}", "").replace("^\\circ", "").replace("°", "")
    s = s.replace("\\%", "").replace("%", "")
    s = s.replace("\\$", "")
    # Units: "5 \text{ cm}" and "5 cm" -> "5" (only after a value, so "\text{yes}" survives).
    m = _TEXT_UNIT.match(s)
    if m and re.search(r"\d", m.group(1)):
        s = m.group(1)
    s = re.sub(r"\\text\{\s*([^{}]*?)\s*\}", r"\1", s)
    m = _BARE_UNIT.match(s)
    if m:
        s = m.group(1)
    s = _THOUSANDS.sub(lambda mm: mm.group(1).replace(",", ""), s)
    s = s.rstrip(".")
    # "x = 5" -> "5" (a short name on the left only, so equations like "y = 2x" stay whole)
    m = re.fullmatch(r"[a-zA-Z]\s*=\s*(.+)", s)
    if m:
        s = m.group(1)
    s = s.replace(" ", "")
    s = _fix_fracs(s)
    s = _slash_to_frac(s)
    if s.startswith("."):
        s = "0" + s
    if s.startswith("-."):
        s = "-0" + s[1:]
    # "0.50" -> "0.5", "2.0" -> "2"
    if re.fullmatch(r"-?\d+\.\d+", s):
        s = s.rstrip("0").rstrip(".")
    if s == "-0":
        s = "0"
    return s


_FRAC = re.compile(r"(-?)\\frac\{(-?\d+(?:\.\d+)?)\}\{(-?\d+(?:\.\d+)?)\}")


def to_number(answer: str) -> Fraction | None:
    """The exact value of a normalised numeric answer (int, decimal, ``\\frac{a}{b}``, ``a/b``)."""
    s = normalize_answer(answer)
    try:
        if re.fullmatch(r"-?\d+(?:\.\d+)?(?:e-?\d+)?", s):
            return Fraction(s)
        m = _FRAC.fullmatch(s)
        if m:
            den = Fraction(m.group(3))
            if den == 0:
                return None
            value = Fraction(m.group(2)) / den
            return -value if m.group(1) else value
    except (ValueError, ZeroDivisionError):
        return None
    return None


# ------------------------------------------------------------------------------ equivalence


def has_math_verify() -> bool:
    """Whether ``math-verify`` is importable (checked once)."""
    return _math_verify() is not None


_MV: Any = None
_MV_CHECKED = False


def _math_verify() -> Any:
    global _MV, _MV_CHECKED
    if not _MV_CHECKED:
        try:
            import math_verify

            _MV = math_verify
        except ImportError:
            _MV = None
        _MV_CHECKED = True
    return _MV


def _math_verify_equiv(pred: str, gold: str) -> bool:
    mv = _math_verify()
    if mv is None:
        return False
    # math-verify times out with signal.alarm, which only works in the main thread.
    timeout = 5 if threading.current_thread() is threading.main_thread() else None
    try:
        gold_parsed = mv.parse(f"${gold}$", parsing_timeout=timeout)
        pred_parsed = mv.parse(f"${pred}$", parsing_timeout=timeout)
        if not gold_parsed or not pred_parsed:
            return False
        return bool(mv.verify(gold_parsed, pred_parsed, timeout_seconds=timeout))
    except Exception:  # a parser failure on odd LaTeX is "not equivalent", never a crash
        return False


def is_equiv(pred: str | None, gold: Any, *, use_math_verify: bool = True) -> bool:
    """Whether the answer ``pred`` equals the reference ``gold`` (rules in the module docstring).

    ``gold`` may be a number or a string (a boxed reference is unboxed first).
    """
    if pred is None or gold is None:
        return False
    gold_text = str(gold)
    if "\\boxed" in gold_text or "\\fbox" in gold_text:
        gold_text = extract_boxed(gold_text) or gold_text
    a, b = normalize_answer(pred), normalize_answer(gold_text)
    if not a or not b:
        return False
    if a == b:
        return True
    na, nb = to_number(a), to_number(b)
    if na is not None and nb is not None:
        return na == nb
    if use_math_verify:
        return _math_verify_equiv(a, b)
    return False
