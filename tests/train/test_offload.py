"""Trainer.sleep / wake_up: a bit-exact round trip (CPU); freed device memory (CUDA)."""

from __future__ import annotations

import copy

import pytest
import torch

from miles.train.trainer import Trainer
from tests.train.helpers import make_batch, make_model, sections

CONFIG = dict(
    lr=1e-2,
    weight_decay=0.1,
    use_dynamic_batch_size=True,
    max_tokens_per_gpu=24,
    use_kl_loss=True,
    kl_loss_coef=0.1,
)


def _optimizer_state(trainer: Trainer) -> list[dict[str, torch.Tensor]]:
    return [{k: v.detach().clone() for k, v in s.items()} for s in trainer.optimizer.state.values()]


def _run(device: str, sleep: bool) -> tuple[dict[str, float], dict[str, torch.Tensor], float]:
    model = make_model("llama").to(device)
    ref = copy.deepcopy(model)
    trainer = Trainer(model, *sections(**CONFIG), device, ref_model=ref)
    trainer.train_step(make_batch(seed=1))
    freed = 0.0
    if sleep:
        params = {n: p.detach().clone() for n, p in model.named_parameters()}
        opt = _optimizer_state(trainer)
        freed = trainer.sleep()["perf/trainer_sleep_freed_bytes"]
        assert trainer.sleep()["perf/trainer_sleep_freed_bytes"] == 0.0  # idempotent
        with pytest.raises(RuntimeError, match="asleep"):
            trainer.train_step(make_batch(seed=2))
        trainer.wake_up()
        for n, p in model.named_parameters():
            assert p.device.type == torch.device(device).type and torch.equal(p, params[n]), n
        for before, after in zip(opt, _optimizer_state(trainer)):
            assert before.keys() == after.keys()
            for k in before:
                assert torch.equal(before[k].cpu(), after[k].cpu()), k
    metrics = trainer.train_step(make_batch(seed=2))
    return metrics, {n: p.detach().cpu() for n, p in model.named_parameters()}, freed


def test_sleep_wake_round_trip_is_exact_on_cpu() -> None:
    want_metrics, want_params, _ = _run("cpu", sleep=False)
    got_metrics, got_params, freed = _run("cpu", sleep=True)
    assert freed == 0.0  # nothing to free on CPU
    assert got_metrics == want_metrics
    for n in want_params:
        assert torch.equal(got_params[n], want_params[n]), n


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_sleep_frees_device_memory_on_cuda() -> None:
    want_metrics, want_params, _ = _run("cuda", sleep=False)
    got_metrics, got_params, freed = _run("cuda", sleep=True)
    # Policy, reference and AdamW moments of a model this size: well over its parameter bytes.
    n_bytes = sum(p.numel() * p.element_size() for p in make_model("llama").parameters())
    assert freed >= 3 * n_bytes
    assert got_metrics == want_metrics
    for n in want_params:
        assert torch.equal(got_params[n], want_params[n]), n
