"""Continuous batching: which requests feed which tokens in the next forward.

Two queues. ``waiting`` (FIFO; preempted requests go back to its front) holds requests without
KV blocks; ``running`` (admission order) holds requests with blocks for all their known tokens.

Each step is either a *prefill* step or a *decode* step:

- prefill: first the running requests whose prompt is only partly computed (chunked prefill),
  then newly admitted waiting requests, each taking up to the remaining per-step token budget
  ``max_num_batched_tokens`` (a prompt may be split across steps). Admission stops at the first
  request that does not fit (no blocks, or ``max_running_requests`` reached) to keep FIFO order,
  or whose shared prefix is still being computed by another request (it joins next step and
  reuses those blocks);
- decode, when there is nothing to prefill: one token for every running request. A request that
  needs a new block and finds none preempts the most recently admitted running request (by
  recompute: its blocks are freed and it returns to the front of ``waiting``); when it is the
  only one left and the cache is still full it cannot grow and is reported ``out_of_capacity``.

:meth:`Scheduler.retract` does to every running request at once what preemption does to one.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Container
from dataclasses import dataclass, field

from miles.engine.kv_cache import AllocStatus, BlockAllocator
from miles.engine.model_runner import ScheduledRequest
from miles.engine.request import FinishReason, Request, RequestStatus


@dataclass
class SchedulerOutput:
    batch: list[ScheduledRequest]
    is_prefill: bool
    preempted: list[Request] = field(default_factory=list)
    # Running alone with a full cache: the engine finishes these with reason ``length``.
    out_of_capacity: list[Request] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(item.num_tokens for item in self.batch)


class Scheduler:
    def __init__(
        self, allocator: BlockAllocator, max_running_requests: int, max_num_batched_tokens: int
    ) -> None:
        if max_running_requests < 1 or max_num_batched_tokens < 1:
            raise ValueError(
                "max_running_requests and max_num_batched_tokens must be >= 1, got "
                f"{max_running_requests} and {max_num_batched_tokens}"
            )
        self.allocator = allocator
        self.max_running_requests = max_running_requests
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0

    def add(self, req: Request) -> None:
        req.status = RequestStatus.WAITING
        self.waiting.append(req)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        """Pick the next step's batch (empty when there is nothing to do)."""
        prefill = self._schedule_prefill()
        if prefill:
            return SchedulerOutput(prefill, is_prefill=True)
        return self._schedule_decode()

    def _schedule_prefill(self) -> list[ScheduledRequest]:
        budget = self.max_num_batched_tokens
        batch: list[ScheduledRequest] = []
        for req in self.running:
            if budget == 0:
                return batch
            if req.num_remaining > 1:
                n = min(req.num_remaining, budget)
                batch.append(ScheduledRequest(req, n))
                budget -= n
        deferred: list[Request] = []
        while self.waiting and budget > 0 and len(self.running) < self.max_running_requests:
            req = self.waiting[0]
            status = self.allocator.allocate(req)
            if status == AllocStatus.WAIT_FOR_PREFIX:
                # A request in flight is computing this one's prefix: it joins a later step and
                # shares those blocks. The requests behind it are not held up (a GRPO rollout's
                # groups used to be admitted one prompt per step: the rest of each group waited
                # for its first sample's prompt, and everything queued behind them too).
                deferred.append(self.waiting.popleft())
                continue
            if status != AllocStatus.OK:
                break  # no space: first come, first served
            self.waiting.popleft()
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            n = min(req.num_remaining, budget)
            batch.append(ScheduledRequest(req, n))
            budget -= n
        self.waiting.extendleft(reversed(deferred))  # back at the front, in their order
        return batch

    def _schedule_decode(self) -> SchedulerOutput:
        out = SchedulerOutput([], is_prefill=False)
        pending = deque(self.running)
        self.running = []
        while pending:
            req = pending.popleft()
            while not self.allocator.append_slot(req):
                if not pending:
                    break
                victim = pending.pop()
                self._preempt(victim)
                out.preempted.append(victim)
            else:
                self.running.append(req)
                out.batch.append(ScheduledRequest(req, 1))
                continue
            if self.running:
                self._preempt(req)
                out.preempted.append(req)
            else:
                self.allocator.free(req)
                out.out_of_capacity.append(req)
        return out

    def schedule_decode_ahead(self, pending: Container[int]) -> list[ScheduledRequest] | None:
        """The next decode step while the tokens sampled for ``pending`` (``id()`` of requests) are not
        appended yet, or ``None`` when that step could differ from what :meth:`schedule` would
        pick once they are: a waiting request could be admitted (prefill comes first), a
        running one is still in prefill, or some request would need a block that is not free
        (preemption). A pending request feeds that token next, so it counts one more token."""
        if self.waiting and len(self.running) < self.max_running_requests:
            return None
        bs = self.allocator.block_size
        need = 0
        for req in self.running:
            known = req.num_tokens + (id(req) in pending)
            if known != req.num_computed_tokens + 1:
                return None
            need += len(req.block_table) * bs < known
        if need > self.allocator.num_free_blocks:
            return None
        batch = []
        for req in self.running:
            self.allocator.append_slot(req, req.num_tokens + (id(req) in pending))
            batch.append(ScheduledRequest(req, 1))
        return batch

    def _preempt(self, req: Request) -> None:
        self.allocator.free(req)
        req.status = RequestStatus.WAITING
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(req)

    def retract(self) -> list[Request]:
        """Move every running request back to ``waiting`` and free its blocks (SGLang's
        ``retract``); returns them, in admission order.

        Each is then what a preempted request is: its prompt and the output sampled so far are
        prefilled again when it is admitted next (from the prefix cache where its blocks are
        still cached and ready). They go to the front of ``waiting`` in their admission order,
        ahead of the requests already waiting, so they are readmitted first and in the order
        they ran. Not counted as preemptions: those measure KV pressure, and this is the
        caller's choice."""
        retracted, self.running = self.running, []
        for req in reversed(retracted):
            self.allocator.free(req)
            req.status = RequestStatus.WAITING
            self.waiting.appendleft(req)
        return retracted

    def finish(self, req: Request, reason: FinishReason) -> None:
        """Remove ``req`` from the queues, return its blocks and mark it finished."""
        if req.status == RequestStatus.RUNNING and req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        if req.block_table:
            self.allocator.free(req)
        req.status = RequestStatus.FINISHED
        req.finish_reason = reason

    def abort(self, request_id: str | None = None) -> list[Request]:
        """Finish one request (or all with ``None``) with reason ``abort``; returns them."""
        targets = [
            r for r in [*self.running, *self.waiting] if request_id is None or r.request_id == request_id
        ]
        for req in targets:
            self.finish(req, FinishReason("abort", message="aborted by the client"))
        return targets
