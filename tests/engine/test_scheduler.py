"""Prefill admission: a request whose prefix another request is computing waits for it without
holding up the requests behind it; a request that does not fit still stops admission."""

from __future__ import annotations

from miles.engine.kv_cache import BlockAllocator
from miles.engine.request import Request
from miles.engine.scheduler import Scheduler
from miles.types import SamplingParams


def _req(rid: str, ids: list[int]) -> Request:
    return Request(rid, list(ids), SamplingParams())


def _computed(alloc: BlockAllocator, out) -> None:
    """What the engine does after a prefill forward: the scheduled tokens are computed."""
    for item in out.batch:
        item.request.num_computed_tokens += item.num_tokens
        alloc.mark_computed(item.request)


def test_prefix_waiters_are_deferred_not_blocking():
    alloc = BlockAllocator(num_blocks=64, block_size=4)
    sched = Scheduler(alloc, max_running_requests=16, max_num_batched_tokens=1000)
    group_a = list(range(10))  # 2 full blocks + 2 tokens
    group_b = list(range(100, 110))
    reqs = [
        _req("a1", group_a),
        _req("a2", group_a),
        _req("a3", group_a),
        _req("b1", group_b),
        _req("b2", group_b),
    ]
    for r in reqs:
        sched.add(r)
    first = sched.schedule()
    # a2, a3 wait for a1's prompt blocks and b2 for b1's; b1 is not held up behind a2 (it was:
    # the loop stopped at the first waiter, so a GRPO rollout admitted one prompt per step).
    assert [item.request.request_id for item in first.batch] == ["a1", "b1"]
    assert [r.request_id for r in sched.waiting] == ["a2", "a3", "b2"]  # in their order
    _computed(alloc, first)
    second = sched.schedule()
    assert [item.request.request_id for item in second.batch] == ["a2", "a3", "b2"]
    assert [item.num_tokens for item in second.batch] == [2, 2, 2]  # the shared 8 tokens cached
    assert all(item.request.cached_tokens == 8 for item in second.batch)
    assert not sched.waiting


def test_a_request_that_does_not_fit_still_stops_admission():
    alloc = BlockAllocator(num_blocks=4, block_size=4)
    sched = Scheduler(alloc, max_running_requests=16, max_num_batched_tokens=1000)
    big, small = (
        _req(
            "big",
            list(range(40)),
        ),
        _req("small", [1, 2, 3]),
    )  # big needs 10 blocks
    sched.add(big)
    sched.add(small)
    assert sched.schedule().batch == []  # first come, first served: small waits behind big
    assert [r.request_id for r in sched.waiting] == ["big", "small"]


def test_deferred_requests_keep_their_place_ahead_of_later_arrivals():
    alloc = BlockAllocator(num_blocks=64, block_size=4)
    sched = Scheduler(alloc, max_running_requests=2, max_num_batched_tokens=1000)
    shared = list(range(10))
    for rid in ("a1", "a2"):
        sched.add(_req(rid, shared))
    sched.add(_req("c", list(range(50, 55))))
    first = sched.schedule()
    assert [item.request.request_id for item in first.batch] == ["a1", "c"]  # max 2 running
    sched.add(_req("d", list(range(70, 75))))
    assert [r.request_id for r in sched.waiting] == ["a2", "d"]
