"""AdamW construction and the LR schedule, against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from miles.train.optim import LRSchedule, build_optimizer, build_scheduler, param_groups


def _lrs(schedule: LRSchedule, steps: int) -> list[float]:
    p = torch.nn.Parameter(torch.zeros(2))
    opt = build_optimizer([p], lr=schedule.lr)
    sched = build_scheduler(opt, schedule)
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_warmup_then_constant() -> None:
    got = _lrs(LRSchedule(lr=1.0, warmup_steps=4), 6)
    assert got == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0, 1.0])


def test_warmup_then_linear_decay() -> None:
    got = _lrs(LRSchedule(lr=1.0, min_lr=0.2, warmup_steps=2, decay_style="linear", decay_steps=4), 9)
    # warm-up 0.5, 1.0; decay p = 0, 1/4, 2/4, 3/4, 1 -> 1 - 0.8 p; then min_lr.
    assert got == pytest.approx([0.5, 1.0, 1.0, 0.8, 0.6, 0.4, 0.2, 0.2, 0.2])


def test_cosine_decay() -> None:
    got = _lrs(LRSchedule(lr=2.0, min_lr=0.0, warmup_steps=0, decay_style="cosine", decay_steps=4), 6)
    want = [1.0 + math.cos(math.pi * k / 4) for k in range(5)] + [0.0]
    assert got == pytest.approx(want)
    assert got[2] == pytest.approx(1.0)


def test_scheduler_state_dict_resumes() -> None:
    schedule = LRSchedule(lr=1.0, min_lr=0.1, warmup_steps=2, decay_style="cosine", decay_steps=5)
    p = torch.nn.Parameter(torch.zeros(2))
    opt = build_optimizer([p], lr=1.0)
    sched = build_scheduler(opt, schedule)
    for _ in range(3):
        opt.step()
        sched.step()
    state = sched.state_dict()
    opt2 = build_optimizer([torch.nn.Parameter(torch.zeros(2))], lr=1.0)
    sched2 = build_scheduler(opt2, schedule)
    sched2.load_state_dict(state)
    opt2.step()
    sched2.step()
    opt.step()
    sched.step()
    assert (
        opt2.param_groups[0]["lr"]
        == pytest.approx(opt.param_groups[0]["lr"])
        == pytest.approx(schedule.lr_at(4))
    )


def test_invalid_schedules() -> None:
    with pytest.raises(ValueError, match="decay style"):
        LRSchedule(lr=1.0, decay_style="exp")
    with pytest.raises(ValueError, match="decay_steps"):
        LRSchedule(lr=1.0, decay_style="cosine")
    with pytest.raises(ValueError, match="min_lr"):
        LRSchedule(lr=1.0, min_lr=2.0)


def test_param_groups_no_decay_on_vectors_and_tied_once() -> None:
    emb = torch.nn.Embedding(10, 4)
    model = torch.nn.ModuleDict(
        {"emb": emb, "head": torch.nn.Linear(4, 10, bias=True), "norm": torch.nn.LayerNorm(4)}
    )
    model["head"].weight = emb.weight  # tied
    groups = param_groups(model, 0.1)
    decay, no_decay = groups[0]["params"], groups[1]["params"]
    assert len(decay) == 1 and decay[0] is emb.weight  # type: ignore[index]
    assert len(no_decay) == 3  # type: ignore[arg-type]
    assert groups[0]["weight_decay"] == 0.1 and groups[1]["weight_decay"] == 0.0
    opt = build_optimizer(groups, lr=1e-3, weight_decay=0.1)
    assert opt.defaults["fused"] is None  # the fused kernel is for CUDA only
