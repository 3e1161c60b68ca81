"""Resumable training checkpoints (torch.distributed.checkpoint) and export to HF safetensors.

Layout (slime's convention)::

    DIR/latest_checkpointed_iteration.txt   "10"
    DIR/iter_0000010/dcp/                   model + optimizer (policy, critic), DCP shards
    DIR/iter_0000010/trainer_state.pt       LR schedulers, counters (rank 0)
    DIR/iter_0000010/rng_rank00000.pt       python / numpy / torch / CUDA RNG states, per rank
    DIR/iter_0000010/meta.json              step, architecture (parameter shapes), extra_state
    DIR/iter_0000010/manifest.json          size and SHA-256 of every other file, written last

Model and optimizer state go through ``get_state_dict``/``set_state_dict`` and ``dcp.save``/
``dcp.load``: each FSDP2 rank writes its own shards, and a checkpoint loads on another number of
ranks or in a single process (no process group needed). A save is atomic: everything is written
into ``DIR/.iter_0000010.tmp``, renamed into place with ``os.replace``, and only then the tracker
file is replaced (itself written to a temporary file first). A crash at any point leaves the
previous checkpoint and tracker intact; a save that fails (a full disk: ``CheckpointError`` naming
the file it was writing) removes what it wrote. How often to save (``--save-interval``) is the
caller's.

Integrity. Every rank hashes the files it wrote; rank 0 gathers the digests into
``manifest.json`` (which carries its own digest) before the rename that publishes the checkpoint.
A load verifies every file against the manifest (the work split over the ranks) before it reads
any of them, and raises ``CheckpointError`` naming a file that is missing, extra, or whose
checksum differs. Checkpoints from before the manifest (``format_version`` 1) load with a warning
that they are unverified; their DCP items are all read once, without keeping them, before any
state changes. Files may be hostile: nothing is unpickled but through an allow-list (DCP's
``.metadata`` through :class:`~miles.train.checkpoint_dcp.MetadataUnpickler`, everything else
through ``torch.load(weights_only=True)``), and the DCP metadata is checked (item files inside
``dcp/``, byte ranges inside their files, chunks inside their tensors) before it is used. A file
that does not parse raises ``CheckpointError`` naming it. Verification, metadata, trainer state
and RNG states are all checked before the model, optimizer, schedulers or RNG change, so a load
that fails on any of them leaves the trainer as it was.

A :class:`~miles.train.optim.CpuOffloadedOptimizer` saves its state in the plain AdamW's layout
(same FQN keys, dtypes and global shapes), so checkpoints load with ``--optimizer-cpu-offload``
on or off whatever the saving run used. Its fp32 master weights are saved only when they hold
more than the parameters (low-precision parameters), as ``<unit>.master.<name>``; a run that
does not use them ignores them, and an offloaded run loading a checkpoint without them takes the
masters from the loaded parameters. Implementation flags of the optimizer (``fused``,
``foreach``, ...) are the loading run's, not the checkpoint's.

This module is the public API and the only one that talks between ranks: it shares the work of a
load out over them and makes them agree on every outcome. Its parts, each stating its contract:
:mod:`~miles.train.checkpoint_files` (writes and reads whose errors name the file),
:mod:`~miles.train.checkpoint_manifest` (the checksums), :mod:`~miles.train.checkpoint_dcp`
(reading DCP's files safely) and :mod:`~miles.train.checkpoint_state` (the scheduler and RNG state
files, checked before they are applied).
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, cast

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import Metadata
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

from miles.models import CausalLM, ModelSpec
from miles.models.loading import CheckpointError, build_model, load_config, save_hf
from miles.train.checkpoint_dcp import SafeLoadPlanner, SafeReader, dry_read
from miles.train.checkpoint_files import (
    NamedFileSystem,
    Writer,
    dcp_error,
    read_json,
    save_torch,
    write_atomic,
    write_error,
    write_json,
)
from miles.train.checkpoint_manifest import (
    MANIFEST,
    read_manifest,
    verify_files,
    write_digests,
    write_manifest,
)
from miles.train.checkpoint_state import (
    check_rng_state,
    check_schedulers,
    load_torch,
    rng_state,
    set_rng_state,
)
from miles.train.expert_parallel import global_param_shapes
from miles.train.optim import IMPL_FLAGS, CpuOffloadedOptimizer
from miles.train.trainer_sleep import awake

if TYPE_CHECKING:
    from miles.train.trainer import Trainer

__all__ = [
    "FORMAT_VERSION",
    "TRACKER",
    "CheckpointError",
    "export_hf",
    "iteration_dir",
    "latest_step",
    "load_checkpoint",
    "save_checkpoint",
]

logger = logging.getLogger(__name__)

TRACKER = "latest_checkpointed_iteration.txt"
FORMAT_VERSION = 2  # 2: manifest.json with a checksum of every file; 1: none (still loads)
_FORMAT_VERSIONS = (1, 2)

_F = TypeVar("_F", bound=Callable[..., Any])


def iteration_dir(directory: str | os.PathLike[str], step: int) -> Path:
    """``DIR/iter_0000010`` for step 10."""
    return Path(directory) / f"iter_{step:07d}"


def latest_step(directory: str | os.PathLike[str]) -> int | None:
    """The step named by ``DIR/latest_checkpointed_iteration.txt``, or None without a tracker."""
    tracker = Path(directory) / TRACKER
    if not tracker.is_file():
        return None
    text = tracker.read_text().strip()
    if not text.isdigit():
        raise CheckpointError(f"{tracker} should hold an iteration number, got {text!r}")
    return int(text)


def _rank(trainer: Trainer | None) -> int:
    return dist.get_rank(trainer.group) if trainer is not None and trainer.dp_size > 1 else 0


def _world(trainer: Trainer | None) -> int:
    return trainer.dp_size if trainer is not None else 1


def _all_ok(trainer: Trainer | None, ok: bool) -> bool:
    """Collective (a barrier too): whether every rank is ``ok``, so that all ranks fail together
    rather than some waiting forever for a rank that raised."""
    if trainer is None or trainer.dp_size == 1:
        return ok
    flag = torch.tensor([int(ok)], dtype=torch.int32, device=trainer.device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=trainer.group)
    return bool(flag.item())


def _units(trainer: Trainer) -> dict[str, tuple[nn.Module, torch.optim.Optimizer]]:
    units: dict[str, tuple[nn.Module, torch.optim.Optimizer]] = {"policy": (trainer.model, trainer.optimizer)}
    if trainer.critic is not None:
        units["critic"] = (trainer.critic.model, trainer.critic.optimizer)
    return units


def _schedulers(trainer: Trainer) -> dict[str, Any]:
    schedulers = {"policy": trainer.scheduler}
    if trainer.critic is not None:
        schedulers["critic"] = trainer.critic.scheduler
    return schedulers


def _shapes(model: nn.Module) -> dict[str, list[int]]:
    # DTensor.shape is the global shape, and an expert-parallel model lists every expert, so
    # sharded and plain models compare equal.
    return global_param_shapes(model)


@contextmanager
def _quiet_single_process() -> Iterator[None]:
    # DCP warns on every call without a process group; single-process use is intended here.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


# --------------------------------------------------------------------------------------------
# Save
# --------------------------------------------------------------------------------------------


def _trainer_awake(fn: _F) -> _F:
    """Run ``fn(directory, trainer, ...)`` with the trainer's state on its device: a trainer put
    to sleep for the rollout (colocated offload) holds it in CPU memory, and DCP saves and loads
    the device tensors. Asleep again afterwards if it was."""

    @functools.wraps(fn)
    def wrapper(directory: Any, trainer: Trainer, *args: Any, **kwargs: Any) -> Any:
        with awake(trainer):
            return fn(directory, trainer, *args, **kwargs)

    return cast(_F, wrapper)


@_trainer_awake
def save_checkpoint(
    directory: str | os.PathLike[str],
    trainer: Trainer,
    step: int,
    extra_state: dict[str, Any] | None = None,
) -> Path:
    """Save the trainer's full state as ``DIR/iter_{step:07d}`` and point the tracker at it.

    Collective: every data-parallel rank calls it with the same arguments (DIR on a filesystem
    all ranks see). ``extra_state``: JSON-serialisable caller state (data position, rollout id),
    returned by :func:`load_checkpoint`. Returns the iteration directory.

    A failure on any rank (``CheckpointError`` ``no space left on device while writing PATH``
    for a full disk) raises on every rank, removes what this save wrote and leaves the previous
    checkpoint and the tracker as they were.
    """
    root = Path(directory)
    final = iteration_dir(root, step)
    tmp = root / f".{final.name}.tmp"
    rank = _rank(trainer)
    error: BaseException | None = None
    if rank == 0:
        try:
            root.mkdir(parents=True, exist_ok=True)
            if tmp.exists():  # left by a crashed save
                shutil.rmtree(tmp)
            tmp.mkdir()
        except Exception as e:
            error = e
    _agree(trainer, error, tmp, step)
    try:
        _write_parts(tmp, trainer, step, rank, extra_state)
    except (Exception, CheckpointException) as e:  # DCP's wrapper is a BaseException
        error = e
    _agree(trainer, error, tmp, step)
    if rank == 0:
        try:
            write_manifest(tmp, trainer.dp_size)
            _publish(root, tmp, final, step)
        except Exception as e:
            error = e
    _agree(trainer, error, tmp, step)
    return final


def _agree(trainer: Trainer, error: BaseException | None, tmp: Path, step: int) -> None:
    """Collective: raise on every rank if any failed (the failing rank its own error, a file
    system's as a CheckpointError naming the file), after rank 0 removed the unfinished save."""
    if _all_ok(trainer, error is None):
        return
    if _rank(trainer) == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    unchanged = f"step {step} was not saved; the previous checkpoint and {TRACKER} are unchanged"
    if error is None:
        raise CheckpointError(f"saving the checkpoint failed on another rank; {unchanged}")
    if isinstance(error, CheckpointException):
        error = dcp_error(error, tmp / "dcp")
    named = error if isinstance(error, CheckpointError) else write_error(tmp, error)
    if named is None:
        raise error
    raise CheckpointError(f"{named}; {unchanged}") from error


def _write_parts(
    tmp: Path, trainer: Trainer, step: int, rank: int, extra_state: dict[str, Any] | None
) -> None:
    """This rank's files (DCP shards, RNG; rank 0 also trainer state, meta.json) and their digests."""
    state = {}
    for name, (model, optimizer) in _units(trainer).items():
        msd, osd = get_state_dict(model, optimizer)
        state[name] = {"model": msd, "optim": osd}
        if isinstance(optimizer, CpuOffloadedOptimizer) and optimizer.has_separate_masters:
            state[name]["master"] = optimizer.master_state_dict(model)
    writer = Writer(tmp / "dcp")
    with _quiet_single_process():
        dcp.save(state, storage_writer=writer, process_group=trainer.group, no_dist=trainer.dp_size == 1)
    written = list(cast(NamedFileSystem, writer.fs).written)
    written.append(tmp / f"rng_rank{rank:05d}.pt")
    save_torch(rng_state(), written[-1])
    if rank == 0:
        schedulers = {name: s.state_dict() for name, s in _schedulers(trainer).items()}
        written.append(tmp / "trainer_state.pt")
        save_torch({"schedulers": schedulers}, written[-1])
        meta = {
            "format_version": FORMAT_VERSION,
            "step": step,
            "trainer_step": trainer.step,
            "skipped_steps": trainer.skipped_steps,
            "world_size": trainer.dp_size,
            "architectures": list(trainer.model.spec.hf_config.get("architectures", [])),
            "parameters": {name: _shapes(model) for name, (model, _) in _units(trainer).items()},
            "extra_state": extra_state or {},
        }
        _write_meta(tmp, meta)
        written.append(tmp / "meta.json")
    write_digests(tmp, rank, written)


def _write_meta(path: Path, meta: dict[str, Any]) -> None:
    write_json(path / "meta.json", meta)


def _publish(root: Path, tmp: Path, final: Path, step: int) -> None:
    old = root / f".{final.name}.old"
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():  # saving the same step again: the new one wins
        os.replace(final, old)
    os.replace(tmp, final)
    try:
        write_atomic(root / TRACKER, f"{step}\n")
    except BaseException:
        # The tracker still names the previous checkpoint: put everything back as it was.
        os.replace(final, tmp)
        if old.exists():
            os.replace(old, final)
        raise
    shutil.rmtree(old, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# Load
# --------------------------------------------------------------------------------------------


def _resolve(directory: str | os.PathLike[str], step: int | None) -> Path:
    """The iteration directory: ``step``'s, the tracker's, or ``directory`` itself if it is one."""
    root = Path(directory)
    if not root.is_dir():
        raise CheckpointError(f"checkpoint directory {root} does not exist")
    if step is None:
        if (root / "meta.json").is_file():
            return root
        step = latest_step(root)
        if step is None:
            raise CheckpointError(f"{root} holds no checkpoint: no {TRACKER} and no meta.json")
    path = iteration_dir(root, step)
    if not (path / "meta.json").is_file():
        raise CheckpointError(f"checkpoint {path} is missing or incomplete (no meta.json)")
    return path


def _read_meta(path: Path) -> dict[str, Any]:
    file = path / "meta.json"
    meta = read_json(file, "checkpoint meta.json")
    if not isinstance(meta, dict):
        raise CheckpointError(f"{file} is corrupted: not a JSON object")
    if meta.get("format_version") not in _FORMAT_VERSIONS:
        raise CheckpointError(
            f"{path}: checkpoint format {meta.get('format_version')}, expected one of {_FORMAT_VERSIONS}"
        )
    shapes = meta.get("parameters")
    checks = {
        "trainer_step": type(meta.get("trainer_step")) is int,
        "skipped_steps": type(meta.get("skipped_steps")) is int,
        "extra_state": isinstance(meta.get("extra_state"), dict),
        "parameters": isinstance(shapes, dict)
        and all(
            isinstance(unit, dict)
            and all(isinstance(s, list) and all(type(d) is int for d in s) for s in unit.values())
            for unit in shapes.values()
        ),
    }
    for key, ok in checks.items():
        if not ok:
            raise CheckpointError(f"{file} is corrupted: malformed {key!r}")
    return meta


def _check_architecture(path: Path, meta: dict[str, Any], unit: str, model: nn.Module) -> None:
    saved: dict[str, list[int]] | None = meta["parameters"].get(unit)
    if saved is None:
        raise CheckpointError(f"{path} has no {unit} state (saved: {', '.join(meta['parameters'])})")
    have = _shapes(model)
    problems = [f"missing {n}" for n in saved if n not in have]
    problems += [f"unexpected {n}" for n in have if n not in saved]
    problems += [
        f"{n}: saved {saved[n]}, model {have[n]}" for n in saved if n in have and saved[n] != have[n]
    ]
    if problems:
        arch = ", ".join(meta.get("architectures") or ["?"])
        shown = "; ".join(problems[:6]) + (f"; ... (+{len(problems) - 6} more)" if len(problems) > 6 else "")
        raise CheckpointError(
            f"{path} holds a {unit} of another architecture ({arch}) than the model: {shown}"
        )


def _verify_files(path: Path, trainer: Trainer | None) -> bool:
    """Check every file of ``path`` against its manifest (each rank a share of them); False for
    a checkpoint saved before manifests, which is only warned about. Collective."""
    manifest = path / MANIFEST
    if not manifest.is_file():
        meta = _read_meta(path)
        if meta["format_version"] >= 2:
            raise CheckpointError(f"{manifest} is missing: the checksums of {path} cannot be verified")
        logger.warning("%s has no checksums (saved before Miles recorded them): loading it unverified", path)
        return False
    files = read_manifest(path)
    error = verify_files(path, files, _rank(trainer), _world(trainer))
    if not _all_ok(trainer, error is None):
        raise error or CheckpointError(f"{path}: a file failed verification on another rank")
    return True


def _dry_read(path: Path, md: Metadata, trainer: Trainer | None) -> None:
    """Read every DCP item once (each rank a share of the files), keeping nothing, so that a
    checkpoint without checksums fails before any state is changed. Collective."""
    error = dry_read(path, md, _rank(trainer), _world(trainer))
    if not _all_ok(trainer, error is None):
        raise error or CheckpointError(f"{path}: an item failed to read on another rank")


def _dcp_load(state: dict[str, Any], path: Path, trainer: Trainer | None) -> None:
    """``dcp.load`` through :class:`SafeReader` and :class:`SafeLoadPlanner`, errors naming
    the file (or the directory, for a checkpoint that lacks keys the state wants)."""
    group = trainer.group if trainer is not None else None
    try:
        with _quiet_single_process():
            dcp.load(
                state,
                storage_reader=SafeReader(path),
                planner=SafeLoadPlanner(),
                process_group=group,
                no_dist=_world(trainer) == 1,
            )
    except CheckpointException as e:
        error = dcp_error(e, path)
        if isinstance(error, CheckpointError):
            raise error from None
        raise CheckpointError(f"{path}: {type(error).__name__}: {error}") from error


@_trainer_awake
def load_checkpoint(
    directory: str | os.PathLike[str], trainer: Trainer, step: int | None = None
) -> dict[str, Any]:
    """Restore what :func:`save_checkpoint` saved into ``trainer``; returns its ``extra_state``.

    ``directory``: the checkpoint root (the tracker's step, or ``step``) or an iteration
    directory. Collective, like the save; the number of ranks may differ from the save's
    (then ranks without a saved RNG state take rank 0's). The next ``train_step`` is then the
    one the saved run would have taken next, bit for bit on the same hardware.

    Every file is verified (checksums, structure) before anything of the trainer changes; a
    missing, corrupted or hostile file raises ``CheckpointError`` naming it.
    """
    path = _resolve(directory, step)
    verified = _verify_files(path, trainer)
    meta = _read_meta(path)
    units = _units(trainer)
    for name, (model, _) in units.items():
        _check_architecture(path, meta, name, model)
    metadata = SafeReader(path / "dcp").read_metadata()
    extra = load_torch(path / "trainer_state.pt")
    check_schedulers(path / "trainer_state.pt", extra, _schedulers(trainer))
    rng_path = path / f"rng_rank{_rank(trainer):05d}.pt"
    rng_path = rng_path if rng_path.is_file() else path / "rng_rank00000.pt"
    rng = load_torch(rng_path)
    check_rng_state(rng_path, rng)
    if not verified:
        _dry_read(path / "dcp", metadata, trainer)

    saved_keys = metadata.state_dict_metadata.keys()
    state: dict[str, Any] = {}
    for name, (model, optimizer) in units.items():
        msd, osd = get_state_dict(model, optimizer)
        state[name] = {"model": msd, "optim": osd}
        if (
            isinstance(optimizer, CpuOffloadedOptimizer)
            and optimizer.has_separate_masters
            and any(k.startswith(f"{name}.master.") for k in saved_keys)
        ):
            state[name]["master"] = optimizer.master_state_dict(model)
    _dcp_load(state, path / "dcp", trainer)
    for name, (model, optimizer) in units.items():
        osd = state[name]["optim"]
        # The loading run's implementation (fused on CUDA, CPU AdamW offloaded), whichever the
        # saving run used; torch's load_state_dict would take the checkpoint's.
        for saved, group in zip(osd["param_groups"], optimizer.param_groups):
            saved.update({k: group[k] for k in IMPL_FLAGS if k in group})
        set_state_dict(model, optimizer, model_state_dict=state[name]["model"], optim_state_dict=osd)
        if isinstance(optimizer, CpuOffloadedOptimizer) and "master" not in state[name]:
            optimizer.load_masters_from_params()  # the parameters were just written directly
    for name, scheduler in _schedulers(trainer).items():
        scheduler.load_state_dict(extra["schedulers"][name])
    set_rng_state(rng)
    trainer.step = meta["trainer_step"]
    trainer.skipped_steps = meta["skipped_steps"]
    extra_state: dict[str, Any] = meta["extra_state"]
    return extra_state


def export_hf(
    checkpoint_dir: str | os.PathLike[str],
    base: str | os.PathLike[str] | ModelSpec,
    out_dir: str | os.PathLike[str],
    dtype: str | torch.dtype = "bfloat16",
    *,
    step: int | None = None,
    tokenizer_source: str | os.PathLike[str] | None = None,
) -> Path:
    """Write the policy of a training checkpoint as HF safetensors + ``config.json`` at ``out_dir``.

    ``base``: the model the run started from (a checkpoint path, whose config is read) or its
    ``ModelSpec``. Single process, no process group: DCP reassembles the shards of any number of
    ranks. ``tokenizer_source``: also save that tokenizer alongside. The checkpoint is verified
    as by :func:`load_checkpoint`.
    """
    path = _resolve(checkpoint_dir, step)
    _verify_files(path, None)
    meta = _read_meta(path)
    spec = base if isinstance(base, ModelSpec) else load_config(base)
    model: CausalLM = build_model(spec)
    _check_architecture(path, meta, "policy", model)
    SafeReader(path / "dcp").read_metadata()  # checked, and its errors named, before DCP reads it
    msd = get_model_state_dict(model)
    state = {"policy": {"model": msd}}
    _dcp_load(state, path / "dcp", None)
    set_model_state_dict(model, state["policy"]["model"])
    return save_hf(model, out_dir, dtype=dtype, tokenizer_source=tokenizer_source)
