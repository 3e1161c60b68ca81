"""The overlapped decode schedule: the host prepares step N+1 while the device runs step N.

Without it a decode step is serial: schedule and build the inputs on the host, run the forward,
wait for the sampled tokens, append them and check the stop conditions, and only then schedule
the next step; the GPU idles while the host works (for a large batch of a small model the host's
part is a sizeable fraction of the GPU's: docs/performance.md). As SGLang's overlap scheduler,
the engine instead queues step N+1 before it reads step N's tokens:

1. schedule step N+1 counting each request of step N as one token longer (its sampled token,
   still on the device, is what it feeds next: the inputs are gathered on the device);
2. queue the forward and the sampling of step N+1 (nothing waits for the device);
3. then read step N's tokens (the device has long finished them) and append them, check the
   stop conditions and report the outputs, while the device runs step N+1.

A request that step N finishes is in step N+1 anyway; that row's token is dropped (the K/V it
stored is the request's true last token, so nothing wrong is cached). Outputs come one step
later than without overlap, and the tokens are the same: the model inputs are the same, greedy
rows take the same argmax and a seeded row's noise depends on its seed and token index only.
(Unseeded rows share the engine's generator, whose draws depend on the batch history anyway.)

Only steps whose outcome cannot depend on the tokens being read are overlapped: pure decode (no
prompt to prefill, no request waiting that could be admitted) whose every request samples in
the whole-batch path (no penalties, ``min_new_tokens`` reached, no top-k/top-p/min-p cut) and
finds its KV slot without preemption. Any other step first waits for the step in flight.
"""

from __future__ import annotations

from dataclasses import dataclass

from miles.engine.model_runner import DeviceTokens, ModelRunner, ScheduledRequest
from miles.engine.request import Request
from miles.engine.sampler import PendingSample, Sampler
from miles.engine.scheduler import Scheduler
from miles.types import WeightVersion


@dataclass
class InflightStep:
    """A decode step queued on the device whose sampled tokens the host has not read yet.

    ``requests[i]`` sampled row ``i`` of ``sample``; ``rows`` maps ``id(request)`` to its row.
    ``version``: the weights the step was launched under, which its tokens are reported with.
    Every weight update reads the step in flight first, so today the weights cannot change
    between launch and read; keeping the version with the step keeps the record right should
    that ever change.
    """

    requests: list[Request]
    rows: dict[int, int]
    sample: PendingSample
    version: WeightVersion

    def is_pending(self, req: Request) -> bool:
        """Whether ``req`` has a token in this step that is not appended yet."""
        row = self.rows.get(id(req))
        return row is not None and self.requests[row] is req


def plan_ahead(scheduler: Scheduler, inflight: InflightStep | None) -> list[ScheduledRequest] | None:
    """The next decode batch, scheduled before ``inflight``'s tokens are read, or ``None`` when
    that step cannot be overlapped (see the module docstring). Allocates the batch's KV slots."""
    running = scheduler.running
    if not running:
        return None
    pending = set()
    for req in running:
        is_pending = inflight is not None and inflight.is_pending(req)
        if is_pending:
            pending.add(id(req))
        if not Sampler.batchable(req, len(req.output_ids) + is_pending):
            return None
    return scheduler.schedule_decode_ahead(pending)


def launch_ahead(
    runner: ModelRunner,
    sampler: Sampler,
    batch: list[ScheduledRequest],
    inflight: InflightStep | None,
    version: WeightVersion,
) -> InflightStep:
    """Queue ``batch``'s forward and sampling; the rows of ``inflight``'s requests feed their
    tokens from the device. Advances each request's ``num_computed_tokens`` (its K/V is queued)."""
    rows: list[int] = []
    src: list[int] = []
    reqs = [item.request for item in batch]
    counts = []
    for i, req in enumerate(reqs):
        pending = inflight is not None and inflight.is_pending(req)
        if pending:
            assert inflight is not None
            rows.append(i)
            src.append(inflight.rows[id(req)])
        counts.append(len(req.output_ids) + pending)
    tokens = DeviceTokens(inflight.sample.tokens, rows, src) if inflight is not None and rows else None
    result = runner.run(batch, tokens)
    sample = sampler.sample_async(result.last_logits, reqs, [r.top_logprobs_num for r in reqs], counts)
    for req in reqs:
        req.num_computed_tokens += 1
        req.weight_version = version
    return InflightStep(reqs, {id(r): i for i, r in enumerate(reqs)}, sample, version)
