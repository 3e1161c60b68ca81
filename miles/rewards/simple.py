"""String rewards: ``exact`` / ``exact_ci`` (exact match), ``f1`` (SQuAD token F1) and
``starts_with_digit`` (a smoke-test reward a random model can learn).

A list label means "any of these": exact match takes any, F1 the maximum (as SQuAD).

- ``exact``: 1.0 if ``response.strip() == str(label).strip()``, else 0.0.
- ``exact_ci``: the same after ``casefold()``.
- ``starts_with_digit``: 1.0 if the response's first character is a digit, else 0.0; no label.
  A random-weight model emits a digit first about as often as not, so the reward rises within a
  few GRPO steps: the quickest check that a placement, a recipe or a GPU run learns at all.
- ``f1``: the token F1 of SQuAD v1.1's ``evaluate.py``: both texts lower-cased, punctuation
  and the articles ``a an the`` removed, whitespace-split; F1 of the multiset overlap
  (0.0 when either side is empty, unless both are, then 1.0 as in SQuAD 2.0).
"""

from __future__ import annotations

import re
import string
from collections import Counter
from typing import Any

from miles.types import Sample

__all__ = [
    "exact_match",
    "f1_score",
    "normalize_squad",
    "rm_exact",
    "rm_exact_ci",
    "rm_f1",
    "rm_starts_with_digit",
]


def _golds(label: Any) -> list[str]:
    if label is None:
        raise ValueError("this reward needs a label (set --label-key)")
    items = list(label) if isinstance(label, (list, tuple)) else [label]
    return [str(g) for g in items]


def exact_match(response: str, label: Any, *, case_sensitive: bool = True) -> float:
    """1.0 if the stripped response equals the stripped label (any label of a list)."""
    pred = response.strip()
    for gold in _golds(label):
        g = gold.strip()
        if pred == g or (not case_sensitive and pred.casefold() == g.casefold()):
            return 1.0
    return 0.0


_PUNCT = set(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_squad(text: str) -> str:
    """SQuAD's ``normalize_answer``: lower, drop punctuation, drop articles, squeeze spaces."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def _f1(pred: str, gold: str) -> float:
    p, g = normalize_squad(pred).split(), normalize_squad(gold).split()
    if not p or not g:
        return float(p == g)
    common = sum((Counter(p) & Counter(g)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(g)
    return 2 * precision * recall / (precision + recall)


def f1_score(response: str, label: Any) -> float:
    """Token F1 against the label (the best over a list of labels)."""
    return max(_f1(response, g) for g in _golds(label))


def rm_exact(args: Any, sample: Sample) -> float:
    return exact_match(sample.response, sample.label)


def rm_exact_ci(args: Any, sample: Sample) -> float:
    return exact_match(sample.response, sample.label, case_sensitive=False)


def rm_f1(args: Any, sample: Sample) -> float:
    return f1_score(sample.response, sample.label)


def rm_starts_with_digit(args: Any, sample: Sample) -> float:
    return float(sample.response[:1].isdigit())
