"""What the RL loop needs from a placement: where the trainer and the engines run.

A placement owns the trainer (one rank, or the ranks of an FSDP2 group) and the engines, and
nothing else: the loop's process builds the prompt data, the rollout manager (which reaches the
engines through :meth:`Placement.engine_client`), the rewards and the metrics once, whatever the
placement. Two implementations: :class:`miles.orchestrate.local.LocalPlacement` (one process)
and :class:`miles.orchestrate.ray.RayPlacement` (trainer ranks and engine servers as Ray actors);
:func:`start_placement` picks one from the configuration.

Lifecycle, as the loop drives it (``miles.orchestrate.loop``)::

    placement = start_placement(config, demand, tokenizer, run_dir)   # trainer and engines up
    per step:  rollout through placement.engine_client()
               placement.sleep("engines"); placement.wake("trainers")  # --offload-rollout/-train
               metrics = placement.train(groups, step)
               placement.wake("engines"); placement.push_weights(step + 1); placement.sleep("trainers")
    on demand: save_checkpoint / load_checkpoint / save_hf
    placement.stop()

``sleep``/``wake`` do nothing unless the configuration offloads that part (``--offload-rollout``
for the engines, ``--offload-train`` for the trainers; on Ray only when colocated on GPUs): the
loop calls them at the same points whatever the flags.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Protocol

from miles.config import MilesConfig
from miles.engine.client import EngineClient
from miles.types import Group

Part = Literal["engines", "trainers"]


class Placement(Protocol):
    config: MilesConfig

    @property
    def num_engines(self) -> int:
        """Engines the rollout reaches (the rollout's concurrency scales with it)."""
        ...

    def engine_client(self) -> EngineClient:
        """The rollout's client of the engines (one engine, or the router in front of several)."""
        ...

    def train(self, groups: list[Group], step: int) -> dict[str, float]:
        """The trainer's half of step ``step`` (:func:`miles.train.rl_step.rl_step` on every rank)."""
        ...

    def push_weights(self, version: int) -> float:
        """Send the trainer's weights to every engine as ``version``; returns the seconds it took."""
        ...

    def sleep(self, part: Part) -> None:
        """Offload ``part`` (engines: release weights and KV cache; trainers: state to CPU memory)
        when the configuration asks for it; otherwise nothing."""
        ...

    def wake(self, part: Part) -> None:
        """Undo :meth:`sleep` (nothing when ``part`` is awake or not offloaded)."""
        ...

    def save_checkpoint(self, directory: str, step: int, extra: dict[str, Any]) -> None:
        """Save the trainer's state as step ``step`` under ``directory``, with the loop's ``extra``."""
        ...

    def load_checkpoint(self, directory: str) -> dict[str, Any]:
        """Restore the trainer from the latest checkpoint under ``directory``; its ``extra`` state."""
        ...

    def save_hf(self, directory: str) -> None:
        """Export the policy as a Hugging Face directory."""
        ...

    def stop(self) -> None:
        """Stop the engines and trainers and free what the placement holds."""
        ...


def start_placement(config: MilesConfig, demand: tuple[int, int], tokenizer: Any, run_dir: Path) -> Placement:
    """The placement the configuration asks for, started: Ray with ``--placement-backend ray``
    (or what implies it), else embedded in this process. ``demand`` is
    :func:`miles.orchestrate.build.kv_demand` (what the engines' KV cache must hold)."""
    if config.placement.use_ray:
        from miles.orchestrate.ray import RayPlacement

        return RayPlacement.start(config, demand, run_dir=run_dir)
    from miles.orchestrate.local import LocalPlacement

    return LocalPlacement.start(config, demand, tokenizer=tokenizer)


__all__ = ["Part", "Placement", "start_placement"]
