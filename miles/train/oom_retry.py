"""OOM recovery in gradient accumulation: a micro-batch that runs out of memory is split in two.

:func:`run_with_oom_retry` runs the micro-batches of one step, in order, through the caller's
function (the forward and backward of one micro-batch). A ``torch.OutOfMemoryError`` raised in it
frees the CUDA cache, splits that micro-batch into two halves by sequences (:func:`oom_halves`)
and runs them instead, at most ``max_retries`` splits per step. An error from the backward
(:class:`BackwardOutOfMemoryError`) may leave part of the micro-batch's gradient accumulated: the
caller's ``restart`` resets the step (gradients, metric sums) and the run starts over from the
first micro-batch of the new plan. The result is the step without OOM's when every micro-batch
loss is normalised by the global normaliser, as the trainer's are.

Not under FSDP: every FSDP rank must run the same forwards and backwards (each gathers
parameters), and a split on one rank would hang the others in their collectives, so there the
error is re-raised with advice.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch


class BackwardOutOfMemoryError(torch.OutOfMemoryError):
    """Out of memory in a micro-batch's backward: part of its gradient may be accumulated."""


def oom_halves(
    bin_: list[int], num_tokens: int, retries: int, max_retries: int, fsdp: bool, err: torch.OutOfMemoryError
) -> list[list[int]]:
    """The two halves of micro-batch ``bin_`` (sequence indices) to retry after ``err``, or a
    ``torch.OutOfMemoryError`` that says why it cannot be split."""
    why = None
    if fsdp:
        # Every FSDP rank must run the same forwards (each gathers parameters); a split on one
        # rank only would hang the others in their collectives.
        why = "micro-batch splitting is disabled under FSDP; lower max_tokens_per_gpu"
    elif len(bin_) < 2:
        why = "a single sequence cannot be split; lower the response length or max_tokens_per_gpu"
    elif retries >= max_retries:
        why = f"gave up after {retries} micro-batch splits (max_oom_retries)"
    if why is not None:
        msg = f"out of memory in a micro-batch of {len(bin_)} sequences / {num_tokens} tokens: {why}"
        raise torch.OutOfMemoryError(msg) from err
    mid = len(bin_) // 2
    return [bin_[:mid], bin_[mid:]]


def run_with_oom_retry(
    plan: Sequence[list[int]],
    run: Callable[[list[int]], None],
    *,
    restart: Callable[[], None],
    lengths: Sequence[int],
    max_retries: int,
    fsdp: bool,
) -> int:
    """Run ``run(bin_)`` on each micro-batch of ``plan`` (sequence indices, ``[]`` for a padding
    micro-batch, which runs sequence 0), in order; returns the number of OOM splits it took.

    ``lengths``: each sequence's tokens (for the error message); ``restart``: called after an
    OOM in a backward (:class:`BackwardOutOfMemoryError`), before the plan runs again from its
    first micro-batch."""
    todo, retries, i = list(plan), 0, 0
    while i < len(todo):
        bin_ = todo[i]
        halves: list[list[int]] | None = None
        in_backward = False
        try:
            run(bin_)
        except torch.OutOfMemoryError as e:
            tokens = sum(lengths[k] for k in (bin_ or [0]))
            halves = oom_halves(bin_, tokens, retries, max_retries, fsdp, e)
            in_backward = isinstance(e, BackwardOutOfMemoryError)
        if halves is None:
            i += 1
            continue
        # Outside the except block: the traceback's frames, and the activations they held, are gone.
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        todo, retries = todo[:i] + halves + todo[i + 1 :], retries + 1
        if in_backward:
            restart()
            i = 0
    return retries


__all__ = ["BackwardOutOfMemoryError", "oom_halves", "run_with_oom_retry"]
