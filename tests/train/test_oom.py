"""OOM recovery: a micro-batch that runs out of memory is split in two and retried."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from miles.train.oom_retry import BackwardOutOfMemoryError, run_with_oom_retry
from miles.train.trainer import Trainer
from tests.tolerance import assert_grads_close, assert_metrics_close, reduction_tol, step_terms
from tests.train.helpers import LENGTHS, POLICY, grads, inject_oom, make_batch, make_model, sections

CONFIG = dict(POLICY, use_tis=True, micro_batch_size=len(LENGTHS))  # one micro-batch of 50 tokens


def _inputs() -> tuple[Any, torch.Tensor, torch.Tensor]:
    return make_batch(), make_batch(seed=1).rollout_logprobs * 0.5, make_batch(seed=2).rollout_logprobs


@pytest.mark.parametrize("where", ["forward", "backward"])
def test_oom_split_retry_equals_step_without_oom(where: str) -> None:
    batch, old, ref = _inputs()
    plain = Trainer(make_model(), *sections(**CONFIG))
    want = plain.accumulate_gradients(batch, old, ref)
    assert want["oom_retries"] == 0

    model = make_model()
    trainer = Trainer(model, *sections(**CONFIG))
    seen = inject_oom(trainer, where, max_tokens=40)
    got = trainer.accumulate_gradients(batch, old, ref)
    assert got["oom_retries"] == 1 and trainer.oom_retries == 1
    assert seen[0] == sum(LENGTHS) and sorted(seen[-2:]) == [24, 26]  # split in two by sequences
    # The halves are GEMMs of other shapes: equal to rounding (tests/tolerance.py).
    terms = step_terms(model.spec, batch.num_tokens)
    assert_metrics_close(got, want, terms, skip={"oom_retries"})
    # The gradient (what the optimizer step sees) is the step without OOM's. Compared before
    # Adam: its first update g / |g| turns fp32 rounding in near-zero gradients into O(lr).
    assert_grads_close(grads(model), grads(plain.model), terms)
    # And through train_step: the retry count is reported, the step is taken.
    metrics = Trainer(make_model(), *sections(**CONFIG)).train_step(batch, old, ref)
    assert metrics["train/oom_retries"] == 0 and metrics["train/skipped_steps"] == 0
    trainer.optimizer.zero_grad(set_to_none=True)
    inject_oom(trainer, where, max_tokens=40)
    step = trainer.train_step(batch, old, ref)
    assert step["train/oom_retries"] == 1 and step["train/skipped_steps"] == 0
    loss = metrics["train/loss"]
    assert abs(step["train/loss"] - loss) <= reduction_tol(max(abs(loss), 1.0), terms)


def test_oom_on_a_single_sequence_reraises_clearly() -> None:
    batch, old, ref = _inputs()
    trainer = Trainer(make_model(), *sections(**CONFIG))
    inject_oom(trainer, "forward", max_tokens=10, times=100)  # the 11- and 12-token sequences too
    with pytest.raises(torch.OutOfMemoryError, match="single sequence cannot be split"):
        trainer.train_step(batch, old, ref)


def test_oom_retries_are_bounded() -> None:
    batch, old, ref = _inputs()
    trainer = Trainer(make_model(), *sections(**CONFIG), max_oom_retries=1)  # 50 -> 24 + 26 -> gives up
    inject_oom(trainer, "forward", max_tokens=4, times=100)
    with pytest.raises(torch.OutOfMemoryError, match=r"gave up after 1 micro-batch splits"):
        trainer.train_step(batch, old, ref)


def test_retry_splits_in_place_and_restarts_after_a_backward_oom() -> None:
    """A forward OOM retries the two halves where the micro-batch was; a backward OOM (gradients
    possibly half accumulated) restarts the plan from its first micro-batch, after ``restart``."""
    runs: list[list[int]] = []
    failures = {(0, 1, 2, 3): torch.OutOfMemoryError("forward"), (4, 5): BackwardOutOfMemoryError("backward")}
    restarts = []

    def run(bin_: list[int]) -> None:
        runs.append(bin_)
        err = failures.pop(tuple(bin_), None)
        if err is not None:
            raise err

    retries = run_with_oom_retry(
        [[0, 1, 2, 3], [4, 5]], run, restart=lambda: restarts.append(len(runs)), lengths=[1] * 6,
        max_retries=3, fsdp=False,
    )  # fmt: skip
    assert retries == 2 and restarts == [4]
    assert runs == [[0, 1, 2, 3], [0, 1], [2, 3], [4, 5], [0, 1], [2, 3], [4], [5]]
    with pytest.raises(torch.OutOfMemoryError, match="disabled under FSDP"):
        run_with_oom_retry([[0, 1]], _oom, restart=lambda: None, lengths=[1, 1], max_retries=3, fsdp=True)


def _oom(bin_: list[int]) -> None:
    raise torch.OutOfMemoryError("injected")
