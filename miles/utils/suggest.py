"""Closest-match suggestions for misspelled flags, keys and names."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


def closest(word: str, candidates: Iterable[str], *, cutoff: float = 0.6) -> str | None:
    """The candidate ``word`` is a prefix of (the shortest one), else the most similar candidate
    (difflib ratio >= ``cutoff``), or None.

    A prefix wins over similarity: ``--rollout-temp`` is closer by ratio to ``--rollout-stop``
    than to ``--rollout-temperature``, but it is plainly the start of the latter."""
    pool = list(dict.fromkeys(candidates))
    # At least 3 characters past the dashes, so "--" or "--r" is no one's prefix.
    if len(word.lstrip("-")) >= 3:
        prefixed = [c for c in pool if c.startswith(word)]
        if prefixed:
            return min(prefixed, key=lambda c: (len(c), c))
    matches = difflib.get_close_matches(word, pool, n=1, cutoff=cutoff)
    return matches[0] if matches else None


def did_you_mean(word: str, candidates: Iterable[str], *, cutoff: float = 0.6) -> str:
    """``"; did you mean X?"`` for the closest candidate, or ``""`` when none is close."""
    match = closest(word, candidates, cutoff=cutoff)
    return f"; did you mean {match}?" if match else ""
