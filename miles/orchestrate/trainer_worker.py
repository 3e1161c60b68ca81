"""One trainer rank of a distributed run: what a Ray trainer actor holds (Ray-free itself).

Lifecycle, driven by :class:`miles.orchestrate.ray.RayPlacement` on every rank at once:
``TrainerWorker(config, rank, world_size, master)`` joins the default process group (NCCL on
GPU, gloo on CPU) and builds the FSDP2-sharded policy (plus reference model and critic) exactly
as the embedded placement does; then, per step, ``train`` (the groups packed into one batch, then
the shared :func:`miles.train.rl_step.rl_step`), ``push_weights``, and on demand
``save_checkpoint`` / ``load_checkpoint`` / ``save_hf``, ``sleep`` / ``wake_up`` (colocated
offload). Every method that gathers or reduces is collective: call it on all ranks together.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

from miles.buffer.batching import build_train_batch
from miles.config import MilesConfig
from miles.kernels import batch_invariant
from miles.orchestrate.build import build_trainer, compute_dtype
from miles.orchestrate.weight_transport import DiskSender, DistributedSender, TensorSender, WeightSender
from miles.train.checkpoint import load_checkpoint, save_checkpoint
from miles.train.rl_step import rl_step
from miles.train.trainer_sleep import awake
from miles.train.weight_export import iter_weight_buckets, save_trainer_hf
from miles.types import Group


def node_ip() -> str:
    """This host's address as other hosts reach it (loopback on a machine without a route)."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("10.255.255.255", 1))  # no packet is sent: it only picks the interface
            return str(s.getsockname()[0])
    except OSError:
        return "127.0.0.1"


class TrainerWorker:
    def __init__(self, config: MilesConfig, rank: int, world_size: int, master: tuple[str, int]) -> None:
        self.config = config
        self.rank, self.world_size = rank, world_size
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(0)  # Ray exposes this actor's GPU(s) as CUDA_VISIBLE_DEVICES
        self.device = torch.device("cuda", 0) if cuda else torch.device("cpu")
        dist.init_process_group(
            "nccl" if cuda else "gloo",
            init_method=f"tcp://{master[0]}:{master[1]}",
            rank=rank,
            world_size=world_size,
        )
        batch_invariant.set_batch_invariant(
            config.deterministic_mode or config.engine.enable_deterministic_inference
        )
        self.trainer = build_trainer(config, self.device, fsdp=True)
        self.dtype = getattr(torch, compute_dtype(config, self.device))
        self.sender: WeightSender | None = None

    def ready(self) -> int:
        return self.rank

    def train(self, groups: list[Group], step: int) -> dict[str, float]:
        """Every rank packs the same groups into the same global batch, then trains on its share."""
        return rl_step(self.trainer, build_train_batch(groups), group_size=len(groups[0]), step=step)

    # ---- weights to the engines ---------------------------------------------------------------

    def set_weight_transport(
        self, transport: str, *, master_address: str, directory: str | None, engines: Sequence[str]
    ) -> None:
        """``distributed`` / ``disk`` / ``tensor`` (see :mod:`miles.orchestrate.weight_transport`);
        ``engines``: every engine URL, in engine-index order (colocated: engine i is on rank i)."""
        self.all_engines = list(engines)
        size = self.config.placement.update_weight_buffer_size
        pause = self.config.rollout.update_pause_mode
        if transport == "distributed":
            backend = "nccl" if self.device.type == "cuda" else "gloo"
            self.sender = DistributedSender(
                self.rank, size, master_address=master_address, backend=backend, pause_mode=pause
            )
        elif transport == "disk":
            assert directory is not None
            self.sender = DiskSender(self.rank, size, directory=directory, pause_mode=pause)
        elif transport == "tensor":
            self.sender = TensorSender(self.rank, size, own_engines=self._own_engines, pause_mode=pause)
        else:
            raise ValueError(f"unknown weight transport {transport!r}")

    def _own_engines(self, engines: Sequence[str]) -> list[str]:
        # Colocated: engine i shares rank i's device (a restarted engine keeps its URL and index).
        return [u for u in engines if self.all_engines.index(u) % self.world_size == self.rank]

    def push_weights(self, version: int, engines: Sequence[str]) -> float:
        """Send the current weights as ``version`` to ``engines`` (their URLs); seconds it took."""
        assert self.sender is not None, "set_weight_transport first"
        start = time.perf_counter()
        self.sender.send(self.trainer.model, self.dtype, version, list(engines))
        return time.perf_counter() - start

    def resync_from_disk(self, version: int, engines: Sequence[str]) -> bool:
        """Re-load the last written directory into restarted ``engines`` (disk transport only; rank 0).
        False when there is nothing written yet or another transport is in use."""
        if isinstance(self.sender, DiskSender) and self.rank == 0 and self.sender.latest is not None:
            self.sender.load_into(engines, version)
            return True
        return False

    def forget_engine(self, url: str) -> None:
        if self.sender is not None:
            self.sender.forget(url)

    # ---- state ----------------------------------------------------------------------------------

    def save_checkpoint(self, directory: str, step: int, extra: dict[str, Any]) -> None:
        save_checkpoint(directory, self.trainer, step, extra)  # wakes a sleeping trainer

    def load_checkpoint(self, directory: str) -> dict[str, Any]:
        return load_checkpoint(directory, self.trainer)

    def save_hf(self, directory: str) -> None:
        """Rank 0 writes a Hugging Face directory (every rank gathers: collective)."""
        with awake(self.trainer):
            save_trainer_hf(
                self.trainer.model,
                directory,
                tokenizer_source=self.config.model.hf_checkpoint,
                write=self.rank == 0,
            )

    def sleep(self) -> dict[str, float]:
        return self.trainer.sleep()

    def wake_up(self) -> None:
        self.trainer.wake_up()

    def weights(self) -> dict[str, torch.Tensor]:
        """Full, HF-named CPU copies of the policy's weights in the engine dtype (tests compare
        them with the engines'). Collective."""
        out: dict[str, torch.Tensor] = {}
        for bucket in iter_weight_buckets(self.trainer.model, self.dtype, 1 << 30):
            out.update((n, t.detach().cpu()) for n, t in bucket)
        return out

    def close(self) -> None:
        if self.sender is not None:
            self.sender.close()
        if dist.is_initialized():
            dist.destroy_process_group()
        batch_invariant.set_batch_invariant(False)


__all__ = ["TrainerWorker", "node_ip"]
