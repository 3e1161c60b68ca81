"""What the RL loop needs from a placement (where the trainer and the engines run).

Two implementations: :class:`miles.orchestrate.local.LocalPlacement` (one process) and
:class:`miles.orchestrate.ray.RayPlacement` (trainer ranks and engine servers as Ray actors).
Either way the loop's own process holds the prompt data, the rollout manager (which reaches the
engines through an ``EngineClient``) and the metrics; the placement runs the trainer's half of a
step, moves weights, and saves/loads the trainer's state.
"""

from __future__ import annotations

from typing import Any, Protocol

from miles.config import MilesConfig
from miles.rollout.dataset import PromptDataset
from miles.rollout.manager import RolloutManager
from miles.types import Group


class Placement(Protocol):
    config: MilesConfig
    tokenizer: Any
    dataset: PromptDataset
    eval_datasets: dict[str, PromptDataset]
    manager: RolloutManager

    def train(self, groups: list[Group], step: int) -> dict[str, float]:
        """The trainer's half of step ``step`` (:func:`miles.orchestrate.train_step.train_on`)."""
        ...

    def push_weights(self, version: int, *, send: bool = True) -> float:
        """Send the trainer's weights to every engine as ``version``; returns the seconds it took.
        ``send=False`` (a step between two syncs of ``--update-weights-interval``) only hands the
        device back to the engines (offload)."""
        ...

    def save_checkpoint(self, directory: str, step: int, extra: dict[str, Any]) -> None: ...

    def load_checkpoint(self, directory: str) -> dict[str, Any]:
        """Restore the trainer from the latest checkpoint under ``directory``; its ``extra`` state."""
        ...

    def save_hf(self, directory: str) -> None:
        """Export the policy as a Hugging Face directory."""
        ...

    def close(self) -> None: ...
