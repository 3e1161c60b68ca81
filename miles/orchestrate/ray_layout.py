"""Where the Ray placement puts every actor: a pure function of the placement flags.

slime's ``_get_placement_group_layout`` in spirit (DESIGN.md §8). No Ray here, so the layout is
tested without a cluster; :meth:`miles.orchestrate.ray.RayPlacement.start` turns it into
placement groups and actors.

- One bundle per trainer rank (``--actor-num-nodes`` × ``--actor-num-gpus-per-node``) in placement
  group 0; each bundle is ``{"CPU": 1}``, plus ``{"GPU": 1}`` on a GPU cluster.
- Disaggregated (``--rollout-num-gpus N``): one more group of ``N`` bundles, engine ``i`` on bundle ``i``.
- Colocated (``--colocate``): engine ``i`` shares trainer rank ``i mod ranks``'s bundle; each
  actor takes half of it.
- External engines (``--rollout-external-engine-addrs``): no engine actors at all.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from miles.config import PlacementConfig

Transport = Literal["distributed", "disk", "tensor"]


class RayPlacementError(RuntimeError):
    """A Ray layout that cannot be built (the message names the flags)."""


@dataclass(frozen=True)
class RayLayout:
    """The actors of one Ray run and the placement-group bundles they sit on."""

    trainer_ranks: int
    engines: int  # engine actors Miles starts; 0 with external engines
    external_urls: tuple[str, ...]  # engines deployed on their own, as URLs
    colocate: bool
    transport: Transport  # how weights reach the engines (``auto`` resolved)

    @property
    def share(self) -> float:
        """The fraction of a bundle each actor takes (colocated actors take turns on one device)."""
        return 0.5 if self.colocate else 1.0

    @property
    def group_sizes(self) -> tuple[int, ...]:
        """Bundles per placement group: the trainer ranks', then (disaggregated) the engines'."""
        if self.engines and not self.colocate:
            return (self.trainer_ranks, self.engines)
        return (self.trainer_ranks,)

    def trainer_bundle(self, rank: int) -> tuple[int, int]:
        """``(placement group, bundle)`` of trainer rank ``rank``."""
        if not 0 <= rank < self.trainer_ranks:
            raise IndexError(f"trainer rank {rank} of {self.trainer_ranks}")
        return (0, rank)

    def engine_bundle(self, index: int) -> tuple[int, int]:
        """``(placement group, bundle)`` of engine ``index``."""
        if not 0 <= index < self.engines:
            raise IndexError(f"engine {index} of {self.engines}")
        return (0, index % self.trainer_ranks) if self.colocate else (1, index)

    @property
    def logical_cpus(self) -> int:
        """Logical CPUs a local Ray cluster needs: one per bundle, plus one for short tasks."""
        return sum(self.group_sizes) + 1


def ray_layout(p: PlacementConfig) -> RayLayout:
    """The layout the flags ask for, or :class:`RayPlacementError` naming the flags that cannot work."""
    external = tuple(u if "://" in u else f"http://{u}" for u in p.rollout_external_engine_addrs)
    engines = 0 if external else (p.rollout_num_gpus or 0)
    if not external and engines < 1:
        raise RayPlacementError(
            "the Ray placement needs engines: --colocate, --rollout-num-gpus N (disaggregated) "
            "or --rollout-external-engine-addrs"
        )
    transport: Transport
    if p.update_weight_transport == "auto":
        transport = "tensor" if p.colocate else "distributed"
    else:
        transport = p.update_weight_transport
    if transport == "tensor" and not p.colocate:
        raise RayPlacementError(
            "--update-weight-transport tensor hands tensors over on a shared device: it needs --colocate "
            "(use distributed or disk)"
        )
    return RayLayout(p.actor_world_size, engines, external, p.colocate, transport)


__all__ = ["RayLayout", "RayPlacementError", "Transport", "ray_layout"]
