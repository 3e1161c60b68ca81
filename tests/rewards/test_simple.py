"""exact / exact_ci / f1."""

from __future__ import annotations

import pytest

from miles.rewards.simple import exact_match, f1_score, normalize_squad


def test_exact():
    assert exact_match("  Paris \n", "Paris") == 1.0
    assert exact_match("paris", "Paris") == 0.0
    assert exact_match("paris", "Paris", case_sensitive=False) == 1.0
    assert exact_match("4", 4) == 1.0
    assert exact_match("b", ["a", "b"]) == 1.0
    with pytest.raises(ValueError, match="label"):
        exact_match("x", None)


def test_f1_matches_squad():
    assert normalize_squad("The  Eiffel, Tower!") == "eiffel tower"
    assert f1_score("the Eiffel Tower", "Eiffel Tower") == 1.0
    # pred "eiffel tower paris" vs gold "eiffel tower": p=2/3, r=1 -> 0.8
    assert f1_score("Eiffel Tower, Paris", "Eiffel Tower") == pytest.approx(0.8)
    assert f1_score("London", "Paris") == 0.0
    assert f1_score("a b", ["c", "a b"]) == 1.0  # best of several golds
    assert f1_score("", "") == 1.0
    assert f1_score("the", "Paris") == 0.0


def test_starts_with_digit_needs_no_label():
    from miles.rewards import get_reward_function
    from miles.types import Sample

    rm = get_reward_function("starts_with_digit")
    assert [rm(None, Sample(response=r)) for r in ("7+1", " 7", "x9", "")] == [1.0, 0.0, 0.0, 0.0]
