"""``Request`` is compared and hashed by identity (the scheduler's queues use ``==``)."""

from __future__ import annotations

from miles.engine.request import Request
from miles.types import SamplingParams


def test_requests_compare_by_identity():
    a = Request("r", [1, 2, 3], SamplingParams())
    b = Request("r", [1, 2, 3], SamplingParams())
    assert a == a and a != b  # equal fields, different requests
    queue = [b, a]
    queue.remove(a)  # removes that very request, not the first equal-looking one
    assert queue == [b] and queue[0] is b
    assert len({a, b}) == 2  # hashable: usable as a set or dict key
