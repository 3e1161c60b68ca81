"""The engine's weight-update API (SGLang's ``update_weights_*`` family), mixed into ``Engine``.

Every update is atomic: its arguments (``weight_version``, ``flush_cache``) and every tensor
(name, shape, dtype, finite values) are validated first, then the weights are copied, the
prefix cache flushed unless told not to and ``weight_version`` set. A refused update raises
``WeightUpdateError`` (a ``ValueError``) and leaves weights, version and cache exactly as they
were. An overlapped step in flight is read first (``_drain``), so its tokens are reported under
the weights they were sampled with.
"""

from __future__ import annotations

import re
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

# SGLang's weight_version is a string; Miles' is the decimal step count (types.WeightVersion),
# bounded to 63 bits so every consumer can hold it in an int64.
_VERSION_RE = re.compile(r"[0-9]{1,19}")
_MAX_VERSION = 2**63 - 1


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
        weight_version: str | int | None = None,
        flush_cache: bool = True,
    ) -> None:
        """Set parameters from ``(HF name, tensor)`` pairs (or a sequence of buckets of pairs).

        All-or-nothing: an unknown name, a wrong shape, a non-floating dtype or a NaN/infinite
        value raises ``WeightUpdateError`` naming the tensor, and no parameter changes. Floating
        tensors are cast to the model's dtype. A subset of the parameters may be given.
        ``weight_version`` defaults to the current one plus one; a bad one is refused first.
        """
        self._check_updatable()
        version = self._new_version(weight_version, flush_cache)
        if self._weights.in_session:
            raise WeightUpdateError("a bucketed weight update is in progress: commit or abort it first")
        self._weights.apply(named_tensors)
        self._after_update(version, flush_cache)

    def begin_weight_update(self) -> None:
        """Start a bucketed update: ``update_weights_bucket`` stages, ``commit`` applies all."""
        self._check_updatable()
        self._weights.begin()

    def update_weights_bucket(self, named_tensors: Iterable[Any]) -> None:
        """Validate and stage one bucket (a copy: the caller may reuse its buffers).

        A bad bucket raises ``WeightUpdateError``, stages nothing, and makes ``commit`` refuse:
        the caller then calls ``abort_weight_update``. So does a bucket refused because the
        weights were released meanwhile.
        """
        try:
            self._check_updatable()
        except EngineStateError as e:
            self._weights.mark_failed(str(e))
            raise
        self._weights.stage(named_tensors)

    def commit_weight_update(self, weight_version: str | int | None = None, flush_cache: bool = True) -> None:
        """Apply every staged bucket at once, then flush the prefix cache and set the version.

        A bad ``weight_version`` refuses the commit and keeps the session (commit again or abort)."""
        self._check_updatable()
        version = self._new_version(weight_version, flush_cache)
        self._weights.commit()
        self._after_update(version, flush_cache)

    def abort_weight_update(self) -> None:
        """Drop the staged buckets; the weights stay as they were."""
        self._weights.abort()

    def update_weights_from_disk(
        self, model_path: str, weight_version: str | int | None = None, flush_cache: bool = True
    ) -> None:
        """Load every parameter from an HF directory (or GGUF) and apply it atomically.

        The checkpoint must hold the whole model (missing or unexpected tensors are refused); an
        unreadable one (truncated, bad header, GGUF garbage, no ``config.json``) is refused too.
        """
        self._check_updatable()
        version = self._new_version(weight_version, flush_cache)
        if not isinstance(model_path, str) or not model_path:
            raise WeightUpdateError(f"model_path must be a non-empty string, got {model_path!r}")
        tensors = read_checkpoint_tensors(self.model, model_path)
        self._weights.apply(tensors)
        self._after_update(version, flush_cache)

    def init_weights_update_group(
        self,
        master_address: str,
        master_port: int,
        rank_offset: int,
        world_size: int,
        group_name: str,
        backend: str = "gloo",
    ) -> None:
        """Join the trainer's broadcast group as rank ``rank_offset`` (the trainer is rank 0).

        The rendezvous blocks the calling thread; the HTTP server runs it on a worker thread
        (``init_custom_process_group``) and registers the result with
        :meth:`add_weights_update_group`, so generation goes on meanwhile."""
        if group_name in self._groups:
            raise ValueError(f"weights update group {group_name!r} already exists")
        self.add_weights_update_group(
            group_name,
            init_custom_process_group(
                master_address, master_port, rank_offset, world_size, group_name, backend
            ),
        )

    def has_weights_update_group(self, group_name: str) -> bool:
        """Whether a group of that name is registered (checked before a rendezvous starts)."""
        return group_name in self._groups

    def add_weights_update_group(self, group_name: str, group: UpdateGroup) -> None:
        """Register a group joined elsewhere (on another thread) under ``group_name``; a name
        already in use is refused and the new group shut down."""
        if group_name in self._groups:
            if hasattr(group.backend, "shutdown"):
                group.backend.shutdown()
            raise ValueError(f"weights update group {group_name!r} already exists")
        self._groups[group_name] = group

    def update_weights_from_distributed(
        self,
        names: Sequence[str],
        dtypes: Sequence[str],
        shapes: Sequence[Sequence[int]],
        group_name: str,
        weight_version: str | int | None = None,
        flush_cache: bool = True,
    ) -> None:
        """Receive each tensor by broadcast from rank 0 of ``group_name``, then apply atomically.

        The version, names, dtypes and shapes are checked (against the model's parameters) before
        anything is received, so a refused update allocates and receives nothing; received tensors
        are checked (finite values) before any is applied.
        """
        group = self._groups.get(group_name) if isinstance(group_name, str) else None
        if group is None:
            raise ValueError(f"no weights update group {group_name!r}: call init_weights_update_group first")
        self._check_updatable()
        version = self._new_version(weight_version, flush_cache)
        if self._weights.in_session:
            raise WeightUpdateError("a bucketed weight update is in progress: commit or abort it first")
        received = broadcast_receive(group, names, dtypes, shapes, self._weights)
        self._weights.apply(received)
        self._after_update(version, flush_cache)

    def destroy_weights_update_group(self, group_name: str) -> None:
        """Forget the group (unknown names are ignored, as SGLang callers expect)."""
        group = self._groups.pop(group_name, None)
        if group is not None and hasattr(group.backend, "shutdown"):
            group.backend.shutdown()

    def _check_updatable(self) -> None:
        self._drain()
        if "weights" in self._released:
            raise EngineStateError("weights are released: resume_memory_occupation(['weights']) first")

    def _new_version(self, weight_version: str | int | None, flush_cache: bool) -> WeightVersion:
        """The version an update will set, checked (with ``flush_cache``) before anything changes:
        ``None`` (the current one plus one), or a decimal string or integer in ``[0, 2**63)``."""
        if not isinstance(flush_cache, bool):
            raise WeightUpdateError(f"flush_cache must be true or false, got {flush_cache!r}")
        if weight_version is None:
            return self._version.next()
        if isinstance(weight_version, int) and not isinstance(weight_version, bool):
            step = weight_version
        elif isinstance(weight_version, str) and _VERSION_RE.fullmatch(weight_version):
            step = int(weight_version)
        else:
            step = -1
        if not 0 <= step <= _MAX_VERSION:
            raise WeightUpdateError(
                f"weight_version must be a decimal integer in [0, 2**63), got {weight_version!r}: "
                "nothing was updated"
            )
        return WeightVersion(step)

    def _after_update(self, version: WeightVersion, flush_cache: bool) -> None:
        """Only after the weights changed: nothing here can fail."""
        if flush_cache:
            # K/V computed under the old weights must not serve new requests. Running (paused
            # in place) requests keep their own blocks; only the prefix map is dropped.
            self.allocator.reset_prefix_cache()
        self._version = version
