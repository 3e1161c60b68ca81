"""``RolloutBuffer``: groups waiting to be trained on, with their weight versions and staleness.

In synchronous RL every group is consumed by the step that produced it. In asynchronous RL the
rollout of step ``k + 1`` runs while step ``k`` trains, so a group may be generated under older
weights than the trainer holds; ``pop`` drops groups staler than ``max_staleness`` weight
versions (counted in ``dropped_stale``) and returns the rest oldest-first.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable

from miles.types import Group


def group_version(group: Group) -> int:
    """The oldest weight version any token of the group was generated under (``-1`` if unknown)."""
    versions = [int(v) for s in group.samples for v in s.weight_versions if str(v).lstrip("-").isdigit()]
    return min(versions) if versions else -1


class RolloutBuffer:
    """FIFO of ``Group``s. Not thread-safe: the loop that owns it adds and pops."""

    def __init__(self, max_staleness: int | None = None) -> None:
        if max_staleness is not None and max_staleness < 0:
            raise ValueError(f"max_staleness must be >= 0 or None, got {max_staleness}")
        self.max_staleness = max_staleness
        self._groups: deque[Group] = deque()
        self.dropped_stale = 0

    def __len__(self) -> int:
        return len(self._groups)

    def add(self, groups: Iterable[Group]) -> None:
        self._groups.extend(groups)

    def pop(self, num_groups: int, current_version: int) -> list[Group]:
        """Up to ``num_groups`` groups, oldest first, skipping (and counting) too-stale ones."""
        if num_groups < 0:
            raise ValueError(f"num_groups must be >= 0, got {num_groups}")
        out: list[Group] = []
        while self._groups and len(out) < num_groups:
            group = self._groups.popleft()
            version = group_version(group)
            if (
                self.max_staleness is not None
                and version >= 0
                and current_version - version > self.max_staleness
            ):
                self.dropped_stale += 1
                continue
            out.append(group)
        return out

    def state_dict(self) -> dict[str, int]:
        # Queued groups are not checkpointed: a resumed run regenerates them from the data position.
        return {"dropped_stale": self.dropped_stale}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.dropped_stale = int(state.get("dropped_stale", 0))
