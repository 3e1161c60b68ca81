"""Where an engine's new weights come from: a checkpoint on disk, or a broadcast from the trainer.

What comes from outside is bounded before anything is allocated for it: a checkpoint's
safetensors headers (names, shapes, dtypes) are checked against the model before any tensor is
read, and a broadcast's names, dtypes and shapes before any receive buffer exists, so an update
never allocates more than the parameters it may set. Unreadable files (truncated, bad headers,
GGUF garbage) raise ``WeightUpdateError`` naming the file. The tensors read or received are then
applied by ``miles.engine.weight_load`` (values checked, all or nothing).

Broadcast groups follow SGLang's ``init_custom_process_group``: a ``TCPStore`` at
``master_address:master_port`` (served by rank 0, the trainer), wrapped in a
``PrefixStore(group_name)``, and a ``ProcessGroupGloo``/``ProcessGroupNCCL`` constructed on it
directly: no default process group is needed in the engine process. The trainer side calls
:func:`init_custom_process_group` with ``rank=0``.
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from miles.engine.weight_load import WeightUpdateError, WeightUpdater, parse_dtype
from miles.models.transformer import CausalLM

# safetensors header dtype codes of floating tensors (any of them casts to the parameter's).
_SAFETENSORS_FLOAT = frozenset({"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"})


# ---- a checkpoint on disk --------------------------------------------------------------------


def read_checkpoint_tensors(model: CausalLM, model_path: str) -> list[tuple[str, torch.Tensor]]:
    """Every tensor of an HF directory (or GGUF) for ``model``; the checkpoint must be complete.

    Safetensors headers are checked against the model (names, shapes, floating dtypes) before any
    tensor is read, so a checkpoint of another model never loads. Anything unreadable (a missing
    ``config.json``, a truncated file, a bad header or index, GGUF garbage) raises
    ``WeightUpdateError`` naming the path; values are checked by the update itself.
    """
    from miles.models.loading import resolve_checkpoint

    try:
        src = resolve_checkpoint(model_path)
    except (ValueError, OSError) as e:
        raise WeightUpdateError(f"cannot read weights from {model_path}: {e}") from e
    if src.kind == "gguf":
        try:
            from miles.models.gguf_reader import iter_gguf_tensors

            tensors = list(iter_gguf_tensors(src.path, dict(model.spec.hf_config)))
        except MemoryError:
            raise
        except Exception as e:  # the reader's errors on garbage are many and untyped
            raise WeightUpdateError(f"cannot read weights from {src.path}: {type(e).__name__}: {e}") from e
    else:
        tensors = _read_safetensors(model, src.path)
    names = {n for n, _ in tensors}
    tied = model.spec.tie_word_embeddings
    expected = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    missing = sorted(n for n in expected - names if not (tied and n == "lm_head.weight"))
    if missing:
        raise WeightUpdateError(f"{model_path}: missing tensors ({len(missing)}): {', '.join(missing[:8])}")
    return [(n, t) for n, t in tensors if not _skipped(n)]


def _skipped(name: str) -> bool:
    # A buffer older exporters saved, not a parameter: skipped as load_model does.
    return name.endswith("rotary_emb.inv_freq")


def _safetensors_files(path: Path) -> list[Path]:
    """The shards of an HF directory: those its index names (plain file names in ``path``), or
    every ``*.safetensors`` without an index."""
    index = path / "model.safetensors.index.json"
    if not index.is_file():
        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise WeightUpdateError(f"cannot read weights from {path}: no *.safetensors files")
        return files
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as e:
        raise WeightUpdateError(f"{index}: not a safetensors index ({type(e).__name__}: {e})") from e
    if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
        raise WeightUpdateError(f"{index}: weight_map must map tensor names to file names")
    out = []
    for f in sorted(set(weight_map.values())):
        shard = path / f
        if Path(f).name != f or f in ("", ".", "..") or not shard.is_file():
            raise WeightUpdateError(f"{index} lists {f!r}, which is not a file in {path}")
        out.append(shard)
    return out


def _read_safetensors(model: CausalLM, path: Path) -> list[tuple[str, torch.Tensor]]:
    """Every tensor of the directory's shards, after checking each header against ``model``."""
    from safetensors import SafetensorError, safe_open

    updater = WeightUpdater(model)
    params = updater._params()
    files = _safetensors_files(path)
    current = files[0]
    try:
        seen: dict[str, Path] = {}
        for current in files:  # headers only: nothing is read yet
            with safe_open(str(current), framework="pt") as handle:
                for name in handle.keys():  # noqa: SIM118 - safe_open is not a Mapping
                    if name in seen:
                        raise WeightUpdateError(f"{current}: tensor {name!r} is also in {seen[name].name}")
                    seen[name] = current
                    if not _skipped(name):
                        _check_header(updater, params, current, name, handle.get_slice(name))
        tensors = []
        for current in files:
            with safe_open(str(current), framework="pt") as handle:
                names = [n for n in handle.keys() if not _skipped(n)]  # noqa: SIM118
                tensors += [(name, handle.get_tensor(name)) for name in names]
    except (SafetensorError, OSError) as e:
        raise WeightUpdateError(f"cannot read weights from {current}: {e}") from e
    return tensors


def _check_header(
    updater: WeightUpdater, params: dict[str, torch.nn.Parameter], file: Path, name: str, meta: Any
) -> None:
    dtype = meta.get_dtype()
    if dtype not in _SAFETENSORS_FLOAT:
        raise WeightUpdateError(f"{file}: tensor {name!r} has dtype {dtype}, not a floating type")
    try:
        updater.check_meta(name, meta.get_shape(), torch.float32, params)
    except WeightUpdateError as e:
        raise WeightUpdateError(f"{file}: {e}") from None


# ---- broadcast groups ------------------------------------------------------------------------


@dataclass
class UpdateGroup:
    """A trainer<->engine broadcast group: the backend (``ProcessGroupGloo``/``ProcessGroupNCCL``),
    the store it rendezvoused through (kept alive with it), and where its tensors live."""

    backend: Any
    store: dist.TCPStore
    device: torch.device
    rank: int
    world_size: int

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> None:
        self.backend.broadcast(tensor, src).wait()


def init_custom_process_group(
    master_address: str,
    master_port: int,
    rank: int,
    world_size: int,
    group_name: str,
    backend: str = "gloo",
    timeout: datetime.timedelta = datetime.timedelta(minutes=10),
) -> UpdateGroup:
    """A process group outside the default one (the trainer side calls this with ``rank=0``).

    Rank 0 serves the ``TCPStore``; the store is prefixed by ``group_name`` so several groups can
    share one address. Works without ``init_process_group`` in this process.
    """
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"backend must be 'gloo' or 'nccl', got {backend!r}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside the world of size {world_size}")
    store = dist.TCPStore(
        master_address,
        int(master_port),
        world_size,
        is_master=rank == 0,
        timeout=timeout,
        wait_for_workers=False,
    )
    prefixed = dist.PrefixStore(group_name, store)
    backend_obj: Any
    if backend == "gloo":
        backend_obj = dist.ProcessGroupGloo(prefixed, rank, world_size, timeout)
        device = torch.device("cpu")
    else:
        opts = dist.ProcessGroupNCCL.Options()
        opts._timeout = timeout
        backend_obj = dist.ProcessGroupNCCL(prefixed, rank, world_size, opts)
        device = torch.device("cuda", torch.cuda.current_device())
    return UpdateGroup(backend_obj, store, device, rank, world_size)


def broadcast_receive(
    group: UpdateGroup,
    names: Sequence[str],
    dtypes: Sequence[str],
    shapes: Sequence[Sequence[int]],
    updater: WeightUpdater,
) -> list[tuple[str, torch.Tensor]]:
    """Receive one broadcast (from rank 0) per tensor, in order, into fresh buffers.

    The names, dtypes and shapes come from the network: all of them are checked against the
    model's parameters (each name once, its shape that of the parameter, a floating dtype) before
    the first buffer is allocated, so an update allocates at most one buffer per parameter of the
    parameter's size. A refused update receives nothing (the sender's broadcast then fails by its
    group's timeout)."""
    for what, seq in (("names", names), ("dtypes", dtypes), ("shapes", shapes)):
        if not isinstance(seq, Sequence) or isinstance(seq, str):
            raise WeightUpdateError(f"{what} must be a list, got {type(seq).__name__}")
    if not len(names) == len(dtypes) == len(shapes):
        raise WeightUpdateError(
            f"names, dtypes and shapes differ in length: {len(names)}, {len(dtypes)}, {len(shapes)}"
        )
    params = updater._params()
    if len(names) > len(params) + 1:  # + 1: a tied model's lm_head.weight
        raise WeightUpdateError(f"{len(names)} tensors for a model of {len(params)} parameters")
    plan: list[tuple[str, torch.dtype, tuple[int, ...]]] = []
    seen: set[str] = set()
    for name, dtype_name, shape in zip(names, dtypes, shapes):
        if not isinstance(name, str):
            raise WeightUpdateError(f"tensor names must be strings, got {name!r:.40}")
        if name in seen:
            raise WeightUpdateError(f"tensor {name!r} is named twice in one update")
        seen.add(name)
        dims = _shape(name, shape)
        dtype = parse_dtype(dtype_name)
        updater.check_meta(name, dims, dtype, params)
        plan.append((name, dtype, dims))
    out = []
    for name, dtype, dims in plan:
        buf = torch.empty(dims, dtype=dtype, device=group.device)
        group.broadcast(buf, 0)
        out.append((name, buf))
    return out


def _shape(name: str, shape: Any) -> tuple[int, ...]:
    if (
        not isinstance(shape, Sequence)
        or isinstance(shape, str)
        or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
    ):
        raise WeightUpdateError(
            f"tensor {name!r:.120}: shape must be a list of integers >= 0, got {shape!r:.40}"
        )
    return tuple(shape)
