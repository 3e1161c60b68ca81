"""Resumable training checkpoints (torch.distributed.checkpoint) and export to HF safetensors.

Layout (slime's convention)::

    DIR/latest_checkpointed_iteration.txt   "10"
    DIR/iter_0000010/dcp/                   model + optimizer (policy, critic), DCP shards
    DIR/iter_0000010/trainer_state.pt       LR schedulers, counters (rank 0)
    DIR/iter_0000010/rng_rank00000.pt       python / numpy / torch / CUDA RNG states, per rank
    DIR/iter_0000010/meta.json              step, architecture (parameter shapes), extra_state

Model and optimizer state go through ``get_state_dict``/``set_state_dict`` and ``dcp.save``/
``dcp.load``: each FSDP2 rank writes its own shards, and a checkpoint loads on another number of
ranks or in a single process (no process group needed). A save is atomic: everything is written
into ``DIR/.iter_0000010.tmp``, renamed into place with ``os.replace``, and only then the tracker
file is replaced (itself written to a temporary file first). A crash at any point leaves the
previous checkpoint and tracker intact. How often to save (``--save-interval``) is the caller's.

A :class:`~miles.train.optim.CpuOffloadedOptimizer` saves its state in the plain AdamW's layout
(same FQN keys, dtypes and global shapes), so checkpoints load with ``--optimizer-cpu-offload``
on or off whatever the saving run used. Its fp32 master weights are saved only when they hold
more than the parameters (low-precision parameters), as ``<unit>.master.<name>``; a run that
does not use them ignores them, and an offloaded run loading a checkpoint without them takes the
masters from the loaded parameters. Implementation flags of the optimizer (``fused``,
``foreach``, ...) are the loading run's, not the checkpoint's.
"""

from __future__ import annotations

import functools
import json
import os
import random
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
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

from miles.models import CausalLM, ModelSpec
from miles.models.loading import CheckpointError, build_model, load_config, save_hf
from miles.train.expert_parallel import global_param_shapes
from miles.train.optim import IMPL_FLAGS, CpuOffloadedOptimizer
from miles.train.trainer_sleep import awake

if TYPE_CHECKING:
    from miles.train.trainer import Trainer

TRACKER = "latest_checkpointed_iteration.txt"
FORMAT_VERSION = 1


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


def _rank(trainer: Trainer) -> int:
    return dist.get_rank(trainer.group) if trainer.dp_size > 1 else 0


def _barrier(trainer: Trainer) -> None:
    if trainer.dp_size > 1:
        dist.barrier(group=trainer.group)


def _units(trainer: Trainer) -> dict[str, tuple[nn.Module, torch.optim.Optimizer]]:
    units: dict[str, tuple[nn.Module, torch.optim.Optimizer]] = {"policy": (trainer.model, trainer.optimizer)}
    if trainer.critic is not None:
        units["critic"] = (trainer.critic.model, trainer.critic.optimizer)
    return units


def _shapes(model: nn.Module) -> dict[str, list[int]]:
    # DTensor.shape is the global shape, and an expert-parallel model lists every expert, so
    # sharded and plain models compare equal.
    return global_param_shapes(model)


def _rng_state() -> dict[str, Any]:
    """RNG states in plain types and tensors, so that ``torch.load(weights_only=True)`` reads them."""
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    try:
        import numpy as np

        kind, keys, pos, has_gauss, gauss = np.random.get_state(legacy=True)
        state["numpy"] = (kind, torch.from_numpy(np.asarray(keys, dtype=np.int64)), pos, has_gauss, gauss)
    except ImportError:
        pass
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(state["torch"])
    if "numpy" in state:
        import numpy as np

        kind, keys, pos, has_gauss, g = state["numpy"]
        np.random.set_state((kind, keys.numpy().astype("uint32"), pos, has_gauss, g))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@contextmanager
def _quiet_single_process() -> Iterator[None]:
    # DCP warns on every call without a process group; single-process use is intended here.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _write_meta(path: Path, meta: dict[str, Any]) -> None:
    (path / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True))


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
    """
    root = Path(directory)
    final = iteration_dir(root, step)
    tmp = root / f".{final.name}.tmp"
    rank = _rank(trainer)
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():  # left by a crashed save
            shutil.rmtree(tmp)
        tmp.mkdir()
    _barrier(trainer)
    state = {}
    for name, (model, optimizer) in _units(trainer).items():
        msd, osd = get_state_dict(model, optimizer)
        state[name] = {"model": msd, "optim": osd}
        if isinstance(optimizer, CpuOffloadedOptimizer) and optimizer.has_separate_masters:
            state[name]["master"] = optimizer.master_state_dict(model)
    with _quiet_single_process():
        dcp.save(state, checkpoint_id=tmp / "dcp", process_group=trainer.group, no_dist=trainer.dp_size == 1)
    torch.save(_rng_state(), tmp / f"rng_rank{rank:05d}.pt")
    if rank == 0:
        schedulers = {"policy": trainer.scheduler.state_dict()}
        if trainer.critic is not None:
            schedulers["critic"] = trainer.critic.scheduler.state_dict()
        torch.save({"schedulers": schedulers}, tmp / "trainer_state.pt")
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
    _barrier(trainer)
    if rank == 0:
        if final.exists():  # saving the same step again: the new one wins
            old = root / f".{final.name}.old"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old)
        else:
            os.replace(tmp, final)
        _write_atomic(root / TRACKER, f"{step}\n")
    _barrier(trainer)
    return final


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
    meta: dict[str, Any] = json.loads((path / "meta.json").read_text())
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: checkpoint format {meta.get('format_version')}, expected {FORMAT_VERSION}"
        )
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


@_trainer_awake
def load_checkpoint(
    directory: str | os.PathLike[str], trainer: Trainer, step: int | None = None
) -> dict[str, Any]:
    """Restore what :func:`save_checkpoint` saved into ``trainer``; returns its ``extra_state``.

    ``directory``: the checkpoint root (the tracker's step, or ``step``) or an iteration
    directory. Collective, like the save; the number of ranks may differ from the save's
    (then ranks without a saved RNG state take rank 0's). The next ``train_step`` is then the
    one the saved run would have taken next, bit for bit on the same hardware.
    """
    path = _resolve(directory, step)
    meta = _read_meta(path)
    units = _units(trainer)
    for name, (model, _) in units.items():
        _check_architecture(path, meta, name, model)
    saved_keys = dcp.FileSystemReader(path / "dcp").read_metadata().state_dict_metadata.keys()
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
    with _quiet_single_process():
        dcp.load(state, checkpoint_id=path / "dcp", process_group=trainer.group, no_dist=trainer.dp_size == 1)
    for name, (model, optimizer) in units.items():
        osd = state[name]["optim"]
        # The loading run's implementation (fused on CUDA, CPU AdamW offloaded), whichever the
        # saving run used; torch's load_state_dict would take the checkpoint's.
        for saved, group in zip(osd["param_groups"], optimizer.param_groups):
            saved.update({k: group[k] for k in IMPL_FLAGS if k in group})
        set_state_dict(model, optimizer, model_state_dict=state[name]["model"], optim_state_dict=osd)
        if isinstance(optimizer, CpuOffloadedOptimizer) and "master" not in state[name]:
            optimizer.load_masters_from_params()  # the parameters were just written directly
    extra = torch.load(path / "trainer_state.pt", weights_only=True)
    trainer.scheduler.load_state_dict(extra["schedulers"]["policy"])
    if trainer.critic is not None:
        trainer.critic.scheduler.load_state_dict(extra["schedulers"]["critic"])
    rng = path / f"rng_rank{_rank(trainer):05d}.pt"
    _set_rng_state(torch.load(rng if rng.is_file() else path / "rng_rank00000.pt", weights_only=True))
    trainer.step = int(meta["trainer_step"])
    trainer.skipped_steps = int(meta["skipped_steps"])
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
    ranks. ``tokenizer_source``: also save that tokenizer alongside.
    """
    path = _resolve(checkpoint_dir, step)
    meta = _read_meta(path)
    spec = base if isinstance(base, ModelSpec) else load_config(base)
    model: CausalLM = build_model(spec)
    _check_architecture(path, meta, "policy", model)
    msd = get_model_state_dict(model)
    state = {"policy": {"model": msd}}
    with _quiet_single_process():
        dcp.load(state, checkpoint_id=path / "dcp", no_dist=True)
    set_model_state_dict(model, state["policy"]["model"])
    return save_hf(model, out_dir, dtype=dtype, tokenizer_source=tokenizer_source)
