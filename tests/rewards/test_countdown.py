"""TinyZero's countdown reward: format 0.1, correct 1.0, never a crash."""

from __future__ import annotations

import pytest

from miles.rewards.countdown import countdown_reward, evaluate_expression, extract_equation

LABEL = {"target": 24, "numbers": [3, 4, 2]}


@pytest.mark.parametrize(
    ("response", "score"),
    [
        ("<answer>3*4*2</answer>", 1.0),
        ("<think>try</think>\n<answer> (4 * 3) * 2 </answer>", 1.0),
        ("<answer>1+1</answer> then <answer>2*3*4</answer>", 1.0),  # the last tag counts
        ("no answer tag: 3*4*2", 0.0),
        ("<answer>3*4</answer>", 0.1),  # a number unused
        ("<answer>3*4*2*2</answer>", 0.1),  # a number reused
        ("<answer>3*4*5</answer>", 0.1),  # a number not given
        ("<answer>(3+4)*2</answer>", 0.1),  # valid but wrong value
        ("<answer>3/(4-4)*2</answer>", 0.1),  # division by zero (also wrong numbers)
        ("<answer>3*(4*2</answer>", 0.1),  # syntax error
        ("<answer>__import__('os')</answer>", 0.1),  # disallowed characters
        ("<answer>(4-2)**3*3</answer>", 0.1),  # ** is evaluated by TinyZero's eval, not here
        ("<answer>24</answer>", 0.1),
    ],
)
def test_countdown(response, score):
    assert countdown_reward(response, LABEL) == score


def test_division_by_zero_with_right_numbers():
    label = {"target": 1, "numbers": [2, 2, 5]}
    assert countdown_reward("<answer>5/(2-2)</answer>", label) == 0.1


def test_float_division_and_json_label():
    label = '{"target": 3, "numbers": [7, 2, 1]}'
    assert countdown_reward("<answer>(7-1)/2</answer>", label) == 1.0
    assert countdown_reward("<answer>7/2</answer>", {"target": 3.5, "numbers": [7, 2]}) == 1.0


@pytest.mark.parametrize("label", [None, "not json", {"target": 1}, {"target": 1, "numbers": "12"}])
def test_bad_label_raises(label):
    with pytest.raises(ValueError, match="countdown label"):
        countdown_reward("<answer>1</answer>", label)


def test_evaluate_expression():
    assert evaluate_expression("(1 + 2) * -3") == -9.0
    assert evaluate_expression("8 / 4 / 2") == 1.0
    for bad in ("2 ** 3", "7 // 2", "1 / 0", "()", "1 +", "a + 1", "1" * 300):
        assert evaluate_expression(bad) is None


def test_extract_equation():
    assert extract_equation("<answer> 1+2 </answer>") == "1+2"
    assert extract_equation("<answer>1+\n2</answer>") is None  # one line, as TinyZero
