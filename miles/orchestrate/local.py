"""The embedded placement: trainer and engine in one process, on one device (CPU or one GPU).

With ``--advantage-estimator ppo`` the trainer also holds the critic (:mod:`miles.train.critic`).

Weights go from trainer to engine in memory (HF-named buckets of
``--update-weight-buffer-size``). With ``--offload-rollout`` the engine releases its memory
(weights and KV cache) while the trainer works, and with ``--offload-train`` the trainer sleeps
(state in CPU memory) while the engine generates; both are on with ``--colocate`` or ``--offload``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from dataclasses import dataclass
from typing import Any

import torch

from miles.buffer.batching import build_train_batch
from miles.config import MilesConfig
from miles.engine.async_engine import AsyncEngine
from miles.engine.client import EngineClient, LocalEngineClient
from miles.engine.engine import Engine
from miles.kernels import batch_invariant
from miles.models.loading import load_model
from miles.orchestrate.build import build_trainer, compute_dtype, default_kv_tokens
from miles.orchestrate.placement import Part
from miles.train.checkpoint import load_checkpoint, save_checkpoint
from miles.train.rl_step import rl_step
from miles.train.trainer import Trainer
from miles.train.trainer_sleep import awake
from miles.train.weight_export import iter_weight_buckets, save_trainer_hf
from miles.types import Group
from miles.utils.progress import announce


def init_single_process_group(device: torch.device) -> None:
    """A one-rank default process group (NCCL on CUDA, gloo on CPU) for FSDP2 in one process;
    a group that already exists is kept."""
    import torch.distributed as dist

    if dist.is_initialized():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)


@dataclass
class LocalPlacement:
    """The trainer and the engine of one embedded run (a :class:`~miles.orchestrate.placement.Placement`)."""

    config: MilesConfig
    trainer: Trainer
    engine: AsyncEngine
    device: torch.device
    num_engines: int = 1

    @classmethod
    def start(
        cls,
        config: MilesConfig,
        demand: tuple[int, int],
        *,
        tokenizer: Any,
        mixed_precision: bool | None = None,
    ) -> LocalPlacement:
        """Load the trainer's models and the engine's copy, and start the engine's thread.

        ``demand`` sizes the KV cache (:func:`miles.orchestrate.build.kv_demand`) unless
        ``--sglang-max-total-tokens`` is given; the engine decodes with ``tokenizer``.
        ``mixed_precision`` (default: on CUDA): the policy is FSDP2-wrapped on a one-rank group
        with fp32 master weights and compute in the engine's dtype, so the trainer runs the very
        arithmetic the engine runs (required for true-on-policy mode on a GPU)."""
        m, e = config.model, config.engine
        assert m.hf_checkpoint is not None
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        # Process-wide: the engine's steps (another thread) and the trainer share the kernels.
        # --sglang-enable-deterministic-inference alone also switches them: one process, one set.
        batch_invariant.set_batch_invariant(config.deterministic_mode or e.enable_deterministic_inference)
        dtype = compute_dtype(config, device)
        fsdp = mixed_precision if mixed_precision is not None else device.type == "cuda"
        if fsdp:
            init_single_process_group(device)
        trainer = build_trainer(config, device, fsdp=fsdp)
        announce(f"loading the engine's copy of {m.hf_checkpoint} ({dtype}) ...")
        engine_model = load_model(m.hf_checkpoint, dtype=dtype, device=device)
        max_tokens = e.max_total_tokens or default_kv_tokens(
            config, engine_model.spec, engine_model.dtype, demand, device
        )
        logging.getLogger("miles.engine").setLevel(e.log_level.upper())  # the engine's own log level
        engine = Engine(engine_model, tokenizer, dataclasses.replace(e, max_total_tokens=max_tokens))
        # Asynchronous modes generate while the trainer trains: on a GPU the engine then queues
        # its kernels on a stream of its own, beside the trainer's (push_weights synchronizes).
        own_stream = config.rollout.async_mode != "off"
        return cls(config, trainer, AsyncEngine(engine, own_stream=own_stream).start(), device)

    def engine_client(self) -> EngineClient:
        return LocalEngineClient(self.engine)

    def train(self, groups: list[Group], step: int) -> dict[str, float]:
        return rl_step(self.trainer, build_train_batch(groups), group_size=len(groups[0]), step=step)

    def push_weights(self, version: int) -> float:
        """Hand the engine the trainer's weights in ``--update-weight-buffer-size`` buckets,
        applied at once as ``version``; returns the seconds it took.

        The update runs on the engine's thread between two steps, so requests in flight (a
        ``--partial-rollout``) are paused around it as ``--pause-generation-mode`` says: in place
        (their KV kept) or retracted (prefilled again under the new weights)."""
        start = time.perf_counter()
        dtype = self.engine.engine.model.dtype
        size = self.config.placement.update_weight_buffer_size
        buckets = list(iter_weight_buckets(self.trainer.model, dtype, size))
        mode = self.config.rollout.update_pause_mode
        cuda = self.device.type == "cuda"
        if cuda:  # the engine may read them on its own stream (asynchronous modes)
            torch.cuda.current_stream(self.device).synchronize()

        def apply(engine: Engine) -> None:
            try:
                if mode == "abort":  # nothing is in flight: nothing to pause
                    engine.update_weights_from_tensors(buckets, weight_version=str(version))
                    return
                engine.pause_generation(mode)
                try:
                    engine.update_weights_from_tensors(buckets, weight_version=str(version))
                finally:
                    engine.continue_generation()
            finally:
                if cuda:  # its copies are done before this thread frees the buckets
                    torch.cuda.current_stream(self.device).synchronize()

        asyncio.run(self.engine.call(apply))
        return time.perf_counter() - start

    def sleep(self, part: Part) -> None:
        p = self.config.placement
        if part == "engines" and p.offload_rollout:
            asyncio.run(self.engine.call(lambda engine: engine.release_memory_occupation(None)))
        elif part == "trainers" and p.offload_train:
            self.trainer.sleep()

    def wake(self, part: Part) -> None:
        p = self.config.placement
        if part == "engines" and p.offload_rollout:
            asyncio.run(self.engine.call(lambda engine: engine.resume_memory_occupation(None)))
        elif part == "trainers" and p.offload_train:
            self.trainer.wake_up()

    def save_checkpoint(self, directory: str, step: int, extra: dict[str, Any]) -> None:
        save_checkpoint(directory, self.trainer, step, extra)  # wakes a sleeping trainer

    def load_checkpoint(self, directory: str) -> dict[str, Any]:
        return load_checkpoint(directory, self.trainer)

    def save_hf(self, directory: str) -> None:
        assert self.config.model.hf_checkpoint is not None
        with awake(self.trainer):  # gathered when sharded (one-rank FSDP2 on CUDA)
            save_trainer_hf(self.trainer.model, directory, tokenizer_source=self.config.model.hf_checkpoint)

    def stop(self) -> None:
        self.engine.close()
        batch_invariant.set_batch_invariant(False)


__all__ = ["LocalPlacement", "init_single_process_group"]
