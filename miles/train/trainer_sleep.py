"""Colocated mode: the trainer's state leaves the device while the engine generates.

:func:`sleep` moves the parameters, gradients and optimizer state of the policy, the critic and
an on-device reference model to CPU memory (pinned when the device is CUDA) and frees the device;
:func:`wake_up` brings them back. Both are idempotent (``Trainer.asleep``). :func:`awake` wakes it
for a block (checkpoints, export) and puts it back to sleep after.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch

from miles.train.offload import move_module, move_optimizer_state

if TYPE_CHECKING:
    from miles.train.trainer import Trainer


def _offload_targets(trainer: Trainer) -> tuple[list[torch.nn.Module], list[torch.optim.Optimizer]]:
    modules: list[torch.nn.Module] = [trainer.model]
    optimizers: list[torch.optim.Optimizer] = [trainer.optimizer]
    if trainer.critic is not None:
        modules.append(trainer.critic.model)
        optimizers.append(trainer.critic.optimizer)
    if trainer.ref_model is not None and not trainer.ref_offload:  # an offloaded ref is on CPU already
        modules.append(trainer.ref_model)
    return modules, optimizers


def sleep(trainer: Trainer) -> dict[str, float]:
    """Move parameters, gradients and optimizer state (policy, critic, reference) to CPU
    memory (pinned when the device is CUDA) and free the device. Idempotent. A
    CPU-offloaded optimizer's state is in CPU memory already and stays where it is.

    Returns ``{"perf/trainer_sleep_freed_bytes": n}``: the drop of
    ``torch.cuda.memory_allocated`` (0 on CPU, where the round trip is a no-op).
    """
    if trainer.asleep:
        return {"perf/trainer_sleep_freed_bytes": 0.0}
    cuda = trainer.device.type == "cuda"
    before = torch.cuda.memory_allocated(trainer.device) if cuda else 0
    modules, optimizers = _offload_targets(trainer)
    cpu = torch.device("cpu")
    for m in modules:
        move_module(m, cpu, pin_memory=cuda)
    for o in optimizers:
        move_optimizer_state(o, cpu, pin_memory=cuda)
    if cuda:
        torch.cuda.synchronize(trainer.device)
        torch.cuda.empty_cache()
    trainer.asleep = True
    after = torch.cuda.memory_allocated(trainer.device) if cuda else 0
    return {"perf/trainer_sleep_freed_bytes": float(before - after)}


def wake_up(trainer: Trainer) -> None:
    """Move everything :meth:`sleep` offloaded back to the device. Idempotent."""
    if not trainer.asleep:
        return
    modules, optimizers = _offload_targets(trainer)
    for m in modules:
        move_module(m, trainer.device)
    for o in optimizers:
        move_optimizer_state(o, trainer.device)
    if trainer.device.type == "cuda":
        torch.cuda.synchronize(trainer.device)
    trainer.asleep = False


@contextlib.contextmanager
def awake(trainer: Trainer) -> Iterator[None]:
    """The trainer on its device for the block (checkpoint save/load, export), asleep again after
    if it was asleep before."""
    was_asleep = trainer.asleep
    trainer.wake_up()
    try:
        yield
    finally:
        if was_asleep:
            trainer.sleep()
