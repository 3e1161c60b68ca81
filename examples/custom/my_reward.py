"""The reward of examples/custom: partial credit for arithmetic answers.

slime's reward signature, ``async def reward(args, sample) -> float``; ``sample.response`` is the
generated text and ``sample.label`` the row's ``answer`` (``--label-key answer``). Miles finds
this file because ``miles train`` runs in the folder that holds it
(``--custom-rm-path my_reward.reward``).
"""

from __future__ import annotations

import re
from typing import Any

_NUMBER = re.compile(r"-?\d{1,18}")


def closeness(response: str, answer: str) -> float:
    """1.0 for the right number; 1 / (1 + distance) for a wrong one (the last number in the
    response counts); -1.0 for a response without a number."""
    numbers = _NUMBER.findall(response)
    if not numbers:
        return -1.0
    return 1.0 / (1.0 + abs(int(numbers[-1]) - int(answer)))


async def reward(args: Any, sample: Any) -> float:
    # A reward that calls a judge over the network would `await` it here; Miles bounds every
    # call by --reward-timeout.
    return closeness(sample.response, str(sample.label))
