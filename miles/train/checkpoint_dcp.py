"""Reading the DCP part of a checkpoint (``dcp/``) safely: its files may be hostile.

Nothing is unpickled but through an allow-list: the ``.metadata`` file through
:class:`MetadataUnpickler` (DCP's record classes, torch sizes, dtypes and layouts, nothing else),
the non-tensor items (optimizer hyper-parameters) through ``torch.load(weights_only=True)``
(:class:`SafeLoadPlanner`). The metadata is bounded in size and checked before DCP uses it
(:func:`read_dcp_metadata`): item files inside ``dcp/``, byte ranges inside their files, chunks
inside their tensors. :class:`SafeReader` is DCP's reader doing both, with every error naming
its file. :func:`dry_read` reads items once, keeping nothing, to prove a checkpoint without
checksums readable before any state changes.

Every error is a ``CheckpointError`` naming the file. Nothing here communicates: the caller
shares the item files out over the ranks and agrees on the outcome (:mod:`miles.train.checkpoint`).
"""

from __future__ import annotations

import io
import pickle
import re
from pathlib import Path
from typing import Any, cast

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import ReadItem

from miles.models.loading import CheckpointError
from miles.train.checkpoint_files import MAX_FILE_BYTES, NamedFileSystem, read_error, sized

_MAX_METADATA_BYTES = 1 << 30  # dcp/.metadata: one entry per tensor chunk
_ITEM_FILE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")  # DCP's item files: __0_0.distcp

_DCP_METADATA = "torch.distributed.checkpoint.metadata"
_METADATA_GLOBALS = {
    *(
        (_DCP_METADATA, name)
        for name in (
            "Metadata",
            "MetadataIndex",
            "StorageMeta",
            "TensorProperties",
            "TensorStorageMetadata",
            "ChunkStorageMetadata",
            "BytesStorageMetadata",
            "_MEM_FORMAT_ENCODING",
        )
    ),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),  # torch.strided and the other layouts, by name
    ("pathlib", "PosixPath"),  # StorageMeta.checkpoint_id
    ("pathlib", "PurePosixPath"),
    ("pathlib._local", "PosixPath"),  # Python >= 3.13
    ("pathlib._local", "PurePosixPath"),
}


class MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP's ``.metadata``: its record classes, torch sizes, dtypes and layouts, and
    nothing else (what a ``.metadata`` of ours references, found with ``pickletools``)."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _METADATA_GLOBALS:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"refused global {module}.{name}")


class SafeReader(dcp.FileSystemReader):
    """DCP's reader with :class:`MetadataUnpickler` for the metadata (checked before use) and
    errors naming the file they come from."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.fs = NamedFileSystem()

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        path = Path(self._get_metadata_path(kwargs.get("rank")))
        metadata = read_dcp_metadata(path)
        storage_meta = metadata.storage_meta or StorageMeta()
        storage_meta.load_id = self.load_id
        metadata.storage_meta = storage_meta
        return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's planner, reading the non-tensor items (optimizer hyper-parameters) through
    ``torch.load(weights_only=True)`` rather than a full unpickling."""

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        obj = torch.load(value, weights_only=True)
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


def read_dcp_metadata(path: Path) -> Metadata:
    """The metadata file ``path`` (``dcp/.metadata``), unpickled through the allow-list and checked."""
    try:
        sized(path, _MAX_METADATA_BYTES, "DCP metadata file")
        with open(path, "rb") as f:
            metadata = MetadataUnpickler(f).load()
        _check_dcp_metadata(path, metadata)
    except CheckpointError:
        raise
    except Exception as e:  # any error of a hostile or broken pickle, or of records it left half-built
        raise read_error(path, e) from e
    return cast(Metadata, metadata)


def _check_dcp_metadata(path: Path, md: Any) -> None:
    """Everything DCP will take from the metadata is well-typed, every item lies inside a file
    of this ``dcp/`` directory, and every chunk inside its tensor."""

    def bad(what: str) -> CheckpointError:
        return CheckpointError(f"{path} is corrupted: {what}")

    def is_size(x: Any, n: int) -> bool:
        return isinstance(x, torch.Size) and len(x) == n and all(type(v) is int and v >= 0 for v in x)

    if not isinstance(md, Metadata):
        raise bad(f"holds a {type(md).__name__}, not DCP metadata")
    sdm, storage = md.state_dict_metadata, md.storage_data
    if not isinstance(sdm, dict) or not isinstance(storage, dict):
        raise bad("its tables are not dicts")
    if md.storage_meta is not None and not isinstance(md.storage_meta, StorageMeta):
        raise bad(f"storage_meta is a {type(md.storage_meta).__name__}")
    wanted: set[MetadataIndex] = set()
    for fqn, m in sdm.items():
        if not isinstance(fqn, str):
            raise bad(f"key {fqn!r} is not a string")
        if isinstance(m, BytesStorageMetadata):
            wanted.add(MetadataIndex(fqn))
            continue
        if not (
            isinstance(m, TensorStorageMetadata)
            and isinstance(m.properties.dtype, torch.dtype)
            and is_size(m.size, len(m.size))
            and isinstance(m.chunks, list)
        ):
            raise bad(f"{fqn}: malformed tensor entry")
        for c in m.chunks:
            if not (
                isinstance(c, ChunkStorageMetadata)
                and is_size(c.offsets, len(m.size))
                and is_size(c.sizes, len(m.size))
                and all(o + s <= d for o, s, d in zip(c.offsets, c.sizes, m.size))
            ):
                raise bad(f"{fqn}: a chunk lies outside the tensor's shape {list(m.size)}")
            wanted.add(MetadataIndex(fqn, c.offsets))
    sizes: dict[str, int] = {}
    for index, info in storage.items():
        if not (isinstance(index, MetadataIndex) and isinstance(info, _StorageInfo)):
            raise bad("malformed storage entry")
        name = info.relative_path
        if not (isinstance(name, str) and _ITEM_FILE.fullmatch(name)):
            raise bad(f"{index.fqn}: item file {name!r} is not a file of {path.parent}")
        if type(info.offset) is not int or type(info.length) is not int or info.offset < 0 or info.length < 0:
            raise bad(f"{index.fqn}: malformed byte range")
        if info.transform_descriptors:  # Miles writes none; a reader without them misreads
            raise bad(f"{index.fqn}: unsupported storage transforms {info.transform_descriptors!r}")
        if name not in sizes:
            sizes[name] = sized(path.parent / name, MAX_FILE_BYTES, "DCP item file")
        if info.offset + info.length > sizes[name]:
            raise CheckpointError(
                f"{path.parent / name} is truncated: {index.fqn} needs bytes up to "
                f"{info.offset + info.length}, the file has {sizes[name]}"
            )
    missing, unknown = wanted - set(storage), set(storage) - wanted
    if missing:
        raise bad(f"{min(i.fqn for i in missing)} has no stored data")
    if unknown:
        raise bad(f"stored item {min(i.fqn for i in unknown)} is not in the state dict's table")


def dry_read(path: Path, md: Metadata, rank: int, world: int) -> CheckpointError | None:
    """Read every item of rank ``rank``'s share (every ``world``-th, in name order) of the item
    files of the ``dcp/`` directory ``path``, keeping nothing; the error for the first item that
    fails to read or does not match ``md``, or None."""
    by_file: dict[str, list[tuple[MetadataIndex, _StorageInfo]]] = {}
    for index, info in md.storage_data.items():
        by_file.setdefault(info.relative_path, []).append((index, info))
    for name in sorted(by_file)[rank::world]:
        file = path / name
        try:
            with open(file, "rb") as f:
                for index, info in sorted(by_file[name], key=lambda x: x[1].offset):
                    f.seek(info.offset)
                    obj = torch.load(io.BytesIO(f.read(info.length)), map_location="cpu", weights_only=True)
                    _check_item(index, obj, md)
        except Exception as e:
            return e if isinstance(e, CheckpointError) else read_error(file, e)
    return None


def _check_item(index: MetadataIndex, obj: Any, md: Metadata) -> None:
    m = md.state_dict_metadata[index.fqn]
    if isinstance(m, BytesStorageMetadata):
        return
    chunk = next(c for c in m.chunks if c.offsets == index.offset)
    if not isinstance(obj, torch.Tensor) or obj.dtype != m.properties.dtype or obj.shape != chunk.sizes:
        got = f"{obj.dtype} {list(obj.shape)}" if isinstance(obj, torch.Tensor) else type(obj).__name__
        raise ValueError(f"{index.fqn}: expected {m.properties.dtype} {list(chunk.sizes)}, got {got}")
