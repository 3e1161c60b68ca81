"""The engine's weight-update API (SGLang's ``update_weights_*`` family), mixed into ``Engine``.

Every update is atomic (validated in full, then applied), bumps ``weight_version`` and flushes
the prefix cache unless told not to. An overlapped step in flight is read first (``_drain``), so
its tokens are reported under the weights they were sampled with.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

from miles.engine.kv_cache import BlockAllocator
from miles.engine.weights import (
    UpdateGroup,
    WeightUpdateError,
    WeightUpdater,
    broadcast_receive,
    init_custom_process_group,
    read_checkpoint_tensors,
)
from miles.models.transformer import CausalLM
from miles.types import WeightVersion


class EngineStateError(RuntimeError):
    """The engine cannot do this now (busy, memory released, ...); the message says why."""


class WeightSyncMixin:
    """Weight updates for ``Engine``: from tensors (whole or bucketed), a checkpoint on disk, or
    a broadcast group the trainer leads. Uses the engine's model, allocator, version and state."""

    model: CausalLM
    allocator: BlockAllocator
    _version: WeightVersion
    _weights: WeightUpdater
    _groups: dict[str, UpdateGroup]
    _released: dict[str, Any]
    _drain: Callable[[], None]  # the engine's: read the overlapped step in flight, if any

    @property
    def weight_version(self) -> str:
        """The version of the weights in use (SGLang's ``weight_version``, a decimal string)."""
        return str(self._version)

    def get_weight_version(self) -> str:
        return self.weight_version

    def update_weights_from_tensors(
        self,
        named_tensors: Iterable[Any],
        weight_version: str | None = None,
        flush_cache: bool = True,
    ) -> None:
        """Set parameters from ``(HF name, tensor)`` pairs (or a sequence of buckets of pairs).

        All-or-nothing: an unknown name, a wrong shape or a non-floating dtype raises
        ``WeightUpdateError`` naming the tensor, and no parameter changes. Floating tensors are cast
        to the model's dtype. A subset of the parameters may be given. ``weight_version`` defaults
        to the current one plus one.
        """
        self._check_updatable()
        if self._weights.in_session:
            raise WeightUpdateError("a bucketed weight update is in progress: commit or abort it first")
        self._weights.apply(named_tensors)
        self._after_update(weight_version, flush_cache)

    def begin_weight_update(self) -> None:
        """Start a bucketed update: ``update_weights_bucket`` stages, ``commit`` applies all."""
        self._check_updatable()
        self._weights.begin()

    def update_weights_bucket(self, named_tensors: Iterable[Any]) -> None:
        """Validate and stage one bucket (a copy: the caller may reuse its buffers).

        A bad bucket raises ``WeightUpdateError``, stages nothing, and makes ``commit`` refuse:
        the caller then calls ``abort_weight_update``.
        """
        self._weights.stage(named_tensors)

    def commit_weight_update(self, weight_version: str | None = None, flush_cache: bool = True) -> None:
        """Apply every staged bucket at once, then flush the prefix cache and set the version."""
        self._check_updatable()
        self._weights.commit()
        self._after_update(weight_version, flush_cache)

    def abort_weight_update(self) -> None:
        """Drop the staged buckets; the weights stay as they were."""
        self._weights.abort()

    def update_weights_from_disk(
        self, model_path: str, weight_version: str | None = None, flush_cache: bool = True
    ) -> None:
        """Load every parameter from an HF directory (or GGUF) and apply it atomically.

        The checkpoint must hold the whole model (missing or unexpected tensors are refused).
        """
        self._check_updatable()
        tensors = read_checkpoint_tensors(self.model, model_path)
        self._weights.apply(tensors)
        self._after_update(weight_version, flush_cache)

    def init_weights_update_group(
        self,
        master_address: str,
        master_port: int,
        rank_offset: int,
        world_size: int,
        group_name: str,
        backend: str = "gloo",
    ) -> None:
        """Join the trainer's broadcast group as rank ``rank_offset`` (the trainer is rank 0)."""
        if group_name in self._groups:
            raise ValueError(f"weights update group {group_name!r} already exists")
        self._groups[group_name] = init_custom_process_group(
            master_address, master_port, rank_offset, world_size, group_name, backend
        )

    def update_weights_from_distributed(
        self,
        names: Sequence[str],
        dtypes: Sequence[str],
        shapes: Sequence[Sequence[int]],
        group_name: str,
        weight_version: str | None = None,
        flush_cache: bool = True,
    ) -> None:
        """Receive each tensor by broadcast from rank 0 of ``group_name``, then apply atomically.

        Every tensor is received before validation, so a refused update never leaves the trainer
        blocked in a broadcast nobody joins.
        """
        group = self._groups.get(group_name)
        if group is None:
            raise ValueError(f"no weights update group {group_name!r}: call init_weights_update_group first")
        self._check_updatable()
        received = broadcast_receive(group, names, dtypes, shapes)
        self._weights.apply(received)
        self._after_update(weight_version, flush_cache)

    def destroy_weights_update_group(self, group_name: str) -> None:
        """Forget the group (unknown names are ignored, as SGLang callers expect)."""
        group = self._groups.pop(group_name, None)
        if group is not None and hasattr(group.backend, "shutdown"):
            group.backend.shutdown()

    def _check_updatable(self) -> None:
        self._drain()
        if "weights" in self._released:
            raise EngineStateError("weights are released: resume_memory_occupation(['weights']) first")

    def _after_update(self, weight_version: str | None, flush_cache: bool) -> None:
        if flush_cache:
            # K/V computed under the old weights must not serve new requests. Running (paused
            # in place) requests keep their own blocks; only the prefix map is dropped.
            self.allocator.reset_prefix_cache()
        self._version = (
            self._version.next() if weight_version is None else WeightVersion.parse(weight_version)
        )
