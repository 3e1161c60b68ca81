"""Math answer extraction, normalisation, equivalence and the math/dapo/deepscaler rewards."""

from __future__ import annotations

import pytest

from miles.rewards import math_utils
from miles.rewards.math import dapo_reward, deepscaler_reward, math_reward
from miles.rewards.math_utils import extract_answer, extract_boxed, is_equiv, normalize_answer, to_number


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (r"so \boxed{42}.", "42"),
        (r"\boxed{1} then \boxed{2}", "2"),
        (r"\boxed{\frac{1}{\sqrt{2}}}", r"\frac{1}{\sqrt{2}}"),
        (r"\boxed{\{1, 2\} \cup \{3\}}", r"\{1, 2\} \cup \{3\}"),
        (r"$\boxed 7$", "7"),
        (r"\fbox{x^{2}}", "x^{2}"),
        (r"\boxed{unclosed", None),
        ("no box", None),
    ],
)
def test_extract_boxed(text, expected):
    assert extract_boxed(text) == expected


def test_extract_answer_fallbacks():
    assert extract_answer("reasoning...\nAnswer: $-3$.") == "-3"
    assert extract_answer("first 3 then 12 and finally -7.5") == "-7.5"
    assert extract_answer(r"Answer: 5 but \boxed{6}") == "6"  # boxed wins
    assert extract_answer("Answer: 5", fallback=False) is None
    assert extract_answer("no digits here") is None


@pytest.mark.parametrize(
    ("raw", "norm"),
    [
        (r"\dfrac{1}{2}", r"\frac{1}{2}"),
        (r"\tfrac12", r"\frac{1}{2}"),
        ("3/4", r"\frac{3}{4}"),
        (r"5 \text{ cm}", "5"),
        ("12 cm", "12"),
        (r"50\%", "50"),
        (r"90^\circ", "90"),
        ("1,000,000", "1000000"),
        ("x = 3", "3"),
        ("0.50", "0.5"),
        (".5", "0.5"),
        (r"\left( 1, 2 \right)", "(1,2)"),
        (r"\text{yes}", "yes"),
    ],
)
def test_normalize(raw, norm):
    assert normalize_answer(raw) == norm


def test_to_number():
    assert to_number(r"-\frac{3}{4}") == to_number("-0.75")
    assert to_number(r"\frac{1}{0}") is None
    assert to_number("abc") is None


@pytest.mark.parametrize("use_mv", [False, True])
@pytest.mark.parametrize(
    ("pred", "gold", "ok"),
    [
        (r"\frac{1}{2}", "0.5", True),
        (r"\dfrac{1}{2}", r"\frac12", True),
        ("-3", -3, True),
        ("-3", "3", False),
        ("1,000", "1000", True),
        ("25%", "25", True),
        ("2", r"\boxed{2}", True),
        ("0.333", r"\frac{1}{3}", False),
        ("", "1", False),
    ],
)
def test_is_equiv(pred, gold, ok, use_mv):
    assert is_equiv(pred, gold, use_math_verify=use_mv) is ok


def test_symbolic_needs_math_verify():
    pred, gold = r"\frac{\sqrt{2}}{2}", r"\sqrt{2}/2"
    assert not is_equiv(pred, gold, use_math_verify=False)
    if math_utils.has_math_verify():
        assert is_equiv(pred, gold)


def test_math_reward():
    assert math_reward(r"We get \boxed{\dfrac{1}{2}}", "0.5") == 1.0
    assert math_reward(r"\boxed{-12}", -12) == 1.0
    assert math_reward(r"\boxed{12}", "-12") == 0.0
    assert math_reward("The answer: 1,000 dollars", "1000") == 1.0
    assert math_reward("nothing", "1") == 0.0
    assert math_reward(r"\boxed{7}", ["6", "7"]) == 1.0  # any of a list
    with pytest.raises(ValueError, match="label"):
        math_reward(r"\boxed{1}", None)


def test_dapo_reward_is_plus_minus_one():
    assert dapo_reward("long reasoning\nAnswer: 42", "42") == 1.0
    assert dapo_reward("Answer: 41", "42") == -1.0
    assert dapo_reward(r"\boxed{42}", "42") == -1.0  # DAPO reads "Answer:" only
    # only the last 300 characters are read
    assert dapo_reward("Answer: 42\n" + "x" * 400, "42") == -1.0


def test_deepscaler_requires_boxed_after_think():
    assert deepscaler_reward(r"<think>\boxed{1}</think> so \boxed{42}", "42") == 1.0
    assert deepscaler_reward(r"<think>\boxed{42}</think> Answer: 42", "42") == 0.0
    assert deepscaler_reward(r"no think tag \boxed{42}", "42") == 1.0
    assert deepscaler_reward("Answer: 42", "42") == 0.0
