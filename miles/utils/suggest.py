"""Closest-match suggestions for misspelled flags, keys and names."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


def closest(word: str, candidates: Iterable[str], *, cutoff: float = 0.6) -> str | None:
    """The candidate most similar to ``word`` (difflib ratio >= ``cutoff``), or None."""
    pool = list(dict.fromkeys(candidates))
    matches = difflib.get_close_matches(word, pool, n=1, cutoff=cutoff)
    if matches:
        return matches[0]
    # A short prefix of a long flag ("--rollout-temp") scores a low ratio but is obvious.
    prefixed = [c for c in pool if c.startswith(word) and len(word) >= 4]
    return min(prefixed, key=len) if prefixed else None


def did_you_mean(word: str, candidates: Iterable[str], *, cutoff: float = 0.6) -> str:
    """``"; did you mean X?"`` for the closest candidate, or ``""`` when none is close."""
    match = closest(word, candidates, cutoff=cutoff)
    return f"; did you mean {match}?" if match else ""
