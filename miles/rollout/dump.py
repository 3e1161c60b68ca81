"""Rollout dumps (``--save-debug-rollout-data`` / ``--load-debug-rollout-data``), without pickle.

A dump is one safetensors file: the groups as a JSON document, stored as the ``uint8`` tensor
``__json__`` (so its size is not bounded by safetensors' header limit), plus one tensor per
array-valued field (``Sample.routed_experts``: a numpy array or a torch tensor, given back as
the same kind). Every other field is a JSON value; metadata and labels must be JSON values
(strings as keys), and are given back as such (a tuple as a list). Writing is atomic
(a temporary file, fsync, ``os.replace``).

A dump may come from anywhere: loading bounds the file's size and the counts, checks the
document field by field and every array's dtype, and raises :class:`RolloutDumpError` naming
the file (and the group, sample and field) on anything malformed; nothing is unpickled.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any

import numpy as np

from miles.types import Group, Sample, SampleStatus

__all__ = ["MAX_DUMP_BYTES", "RolloutDumpError", "load_rollout_dump", "save_rollout_dump"]

FORMAT = "miles.rollout_dump"
VERSION = "1"
MAX_DUMP_BYTES = 64 << 30  # default bound on a dump's file size
MAX_GROUPS = 1 << 20
MAX_SAMPLES_PER_GROUP = 1 << 16
MAX_JSON_DEPTH = 64  # nesting of metadata, labels and chat prompts
_DOC = "__json__"
_ARRAY_KINDS = "biuf"  # numpy dtype kinds an array field may hold: bool, int, uint, float
_FIELDS = tuple(f.name for f in fields(Sample))


class RolloutDumpError(ValueError):
    """A rollout dump cannot be written (a field that is not a JSON value) or read (malformed,
    truncated, too large); the message names the file and, where there is one, the field."""


def save_rollout_dump(groups: Sequence[Group], path: str | os.PathLike[str]) -> None:
    """Write ``groups`` to ``path`` (its directory must exist), replacing it atomically."""
    from safetensors.numpy import save_file

    path = Path(path)
    arrays: dict[str, np.ndarray] = {}
    doc = {
        "groups": [
            {
                "index": group.index,
                "samples": [
                    _sample_doc(sample, arrays, f"{path}: group {i}, sample {j}")
                    for j, sample in enumerate(group.samples)
                ],
            }
            for i, group in enumerate(groups)
        ]
    }
    arrays[_DOC] = np.frombuffer(json.dumps(doc).encode(), dtype=np.uint8)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        save_file(arrays, str(tmp), metadata={"format": FORMAT, "version": VERSION})
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def load_rollout_dump(path: str | os.PathLike[str], *, max_bytes: int = MAX_DUMP_BYTES) -> list[Group]:
    """The groups :func:`save_rollout_dump` wrote to ``path``; :class:`RolloutDumpError` if the
    file is missing, larger than ``max_bytes``, or malformed in any way."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as e:
        raise RolloutDumpError(f"{path}: cannot read the rollout dump: {e.strerror or e}") from None
    if size > max_bytes:
        raise RolloutDumpError(f"{path}: {size} bytes, more than the {max_bytes} a rollout dump may hold")
    try:
        with safe_open(str(path), framework="numpy") as f:
            header = f.metadata() or {}
            if header.get("format") != FORMAT or header.get("version") != VERSION:
                raise RolloutDumpError(
                    f"{path}: not a Miles rollout dump (format {header.get('format')!r}, "
                    f"version {header.get('version')!r}; expected {FORMAT!r} version {VERSION!r})"
                )
            names = set(f.keys())
            if _DOC not in names:
                raise RolloutDumpError(f"{path}: no {_DOC} document")
            raw = f.get_tensor(_DOC)
            if raw.dtype != np.uint8 or raw.ndim != 1:
                raise RolloutDumpError(f"{path}: {_DOC} must be a 1-D uint8 tensor")
            try:
                doc = json.loads(raw.tobytes())
            except (ValueError, RecursionError) as e:  # ValueError: not JSON, or not UTF-8
                raise RolloutDumpError(f"{path}: {_DOC} is not a JSON document: {e}") from None
            reader = _Arrays(path, f, names - {_DOC})
            groups = _groups(path, doc, reader)
            reader.check_all_used()
    except (SafetensorError, OSError) as e:
        raise RolloutDumpError(
            f"{path}: not a readable rollout dump (a safetensors file written by save_rollout_dump): {e}"
        ) from None
    return groups


# ---------------------------------------------------------------------- writing


def _sample_doc(sample: Sample, arrays: dict[str, np.ndarray], where: str) -> dict[str, Any]:
    doc: dict[str, Any] = {}
    for name in _FIELDS:
        value = getattr(sample, name)
        if name == "status":
            doc[name] = SampleStatus(value).value
        elif name == "routed_experts":
            doc[name] = None if value is None else _array_ref(value, arrays, f"{where}: routed_experts")
        else:
            _check_json(value, f"{where}: {name}", tuples=True)
            doc[name] = value
    return doc


def _array_ref(value: Any, arrays: dict[str, np.ndarray], where: str) -> dict[str, str]:
    kind = "numpy"
    if not isinstance(value, np.ndarray):
        import torch

        if not isinstance(value, torch.Tensor):
            raise RolloutDumpError(
                f"{where} must be a numpy array or a torch tensor, got {type(value).__name__}"
            )
        kind = "torch"
        try:
            value = value.detach().cpu().numpy()
        except TypeError as e:  # bfloat16 and other dtypes numpy lacks
            raise RolloutDumpError(f"{where}: {e}") from None
    if value.dtype.kind not in _ARRAY_KINDS:
        raise RolloutDumpError(
            f"{where} has dtype {value.dtype}: only bool, integer and float arrays are dumped"
        )
    name = f"array.{len(arrays)}"
    arrays[name] = np.ascontiguousarray(value)
    return {"tensor": name, "type": kind}


# ---------------------------------------------------------------------- reading


class _Arrays:
    """The dump's tensors, each referenced once by a sample."""

    def __init__(self, path: Path, handle: Any, names: set[str]) -> None:
        self.path, self.handle, self.unused = path, handle, set(names)

    def take(self, ref: Any, where: str) -> Any:
        if not (
            isinstance(ref, dict) and set(ref) == {"tensor", "type"} and ref["type"] in ("numpy", "torch")
        ):
            raise RolloutDumpError(f"{where} must be null or {{'tensor': name, 'type': 'numpy'|'torch'}}")
        name = ref["tensor"]
        if name not in self.unused:
            raise RolloutDumpError(
                f"{where} names tensor {name!r}, which the file lacks or another field took"
            )
        self.unused.discard(name)
        array = self.handle.get_tensor(name)
        if array.dtype.kind not in _ARRAY_KINDS:
            raise RolloutDumpError(f"{where} has dtype {array.dtype}")
        if ref["type"] == "torch":
            import torch

            return torch.from_numpy(array)
        return array

    def check_all_used(self) -> None:
        if self.unused:
            raise RolloutDumpError(f"{self.path}: tensor {min(self.unused)!r} belongs to no sample")


def _groups(path: Path, doc: Any, arrays: _Arrays) -> list[Group]:
    if not isinstance(doc, dict) or set(doc) != {"groups"} or not isinstance(doc["groups"], list):
        raise RolloutDumpError(f"{path}: the document must be {{'groups': [...]}}")
    if len(doc["groups"]) > MAX_GROUPS:
        raise RolloutDumpError(f"{path}: {len(doc['groups'])} groups, more than {MAX_GROUPS}")
    groups = []
    for i, g in enumerate(doc["groups"]):
        where = f"{path}: group {i}"
        if not (isinstance(g, dict) and set(g) == {"index", "samples"} and _is_int(g["index"])):
            raise RolloutDumpError(f"{where} must be {{'index': int, 'samples': [...]}}")
        samples = g["samples"]
        if not isinstance(samples, list) or not 1 <= len(samples) <= MAX_SAMPLES_PER_GROUP:
            raise RolloutDumpError(
                f"{where}: 'samples' must be a list of 1 to {MAX_SAMPLES_PER_GROUP} samples"
            )
        groups.append(
            Group(
                g["index"], tuple(_sample(s, arrays, f"{where}, sample {j}") for j, s in enumerate(samples))
            )
        )
    return groups


def _sample(doc: Any, arrays: _Arrays, where: str) -> Sample:
    if isinstance(doc, dict) and "response_versions" not in doc:
        doc = {**doc, "response_versions": None}  # dumps written before samples carried it
    if not isinstance(doc, dict) or set(doc) != set(_FIELDS):
        have = sorted(doc) if isinstance(doc, dict) else type(doc).__name__
        raise RolloutDumpError(f"{where} must be an object with the fields {', '.join(_FIELDS)}; got {have}")
    for name, (ok, expected) in _CHECKS.items():
        _check_json(doc[name], f"{where}: {name}")
        if not ok(doc[name]):
            raise RolloutDumpError(f"{where}: {name} must be {expected}, got {_describe(doc[name])}")
    values = {name: doc[name] for name in _FIELDS}
    values["status"] = SampleStatus(doc["status"])
    if doc["routed_experts"] is not None:
        values["routed_experts"] = arrays.take(doc["routed_experts"], f"{where}: routed_experts")
    sample = Sample(**values)
    try:
        sample.check()
    except ValueError as e:
        raise RolloutDumpError(f"{where}: {e}") from None
    return sample


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_num(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _list_of(check: Any) -> Any:
    return lambda x: isinstance(x, list) and all(check(v) for v in x)


def _optional(check: Any) -> Any:
    return lambda x: x is None or check(x)


_MESSAGES = _list_of(lambda m: isinstance(m, dict))
_CHECKS: dict[str, tuple[Any, str]] = {
    "prompt": (lambda x: isinstance(x, str) or _MESSAGES(x), "a string or a list of message objects"),
    "prompt_ids": (_list_of(lambda v: _is_int(v) and v >= 0), "a list of token ids"),
    "response": (lambda x: isinstance(x, str), "a string"),
    "response_ids": (_list_of(lambda v: _is_int(v) and v >= 0), "a list of token ids"),
    "rollout_logprobs": (_optional(_list_of(_is_num)), "null or a list of numbers"),
    "loss_mask": (_optional(_list_of(_is_int)), "null or a list of integers"),
    "label": (lambda x: True, "a JSON value"),
    "reward": (_optional(_is_num), "null or a number"),
    "status": (
        lambda x: x in {s.value for s in SampleStatus},
        f"one of {', '.join(s.value for s in SampleStatus)}",
    ),
    "weight_versions": (_list_of(lambda v: isinstance(v, str)), "a list of strings"),
    "response_versions": (_optional(_list_of(lambda v: _is_int(v) and v >= 0)), "null or a list of versions"),
    "routed_experts": (lambda x: x is None or isinstance(x, dict), "null or a tensor reference"),
    "index": (_is_int, "an integer"),
    "group_index": (_is_int, "an integer"),
    "metadata": (lambda x: isinstance(x, dict), "an object"),
    "error": (_optional(lambda x: isinstance(x, str)), "null or a string"),
}


def _check_json(value: Any, where: str, *, tuples: bool = False, depth: int = 0) -> None:
    """``value`` is a JSON value (string keys, finite nesting); with ``tuples`` (writing) a tuple
    counts as a list. NaN and infinities are allowed: Python's json writes and reads them."""
    if depth > MAX_JSON_DEPTH:
        raise RolloutDumpError(f"{where}: nested deeper than {MAX_JSON_DEPTH}")
    if value is None or isinstance(value, (bool, int, str)):
        return
    if isinstance(value, float):
        return
    if isinstance(value, list) or (tuples and isinstance(value, tuple)):
        for i, v in enumerate(value):
            _check_json(v, f"{where}[{i}]", tuples=tuples, depth=depth + 1)
        return
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):
                raise RolloutDumpError(f"{where}: key {k!r} is not a string (JSON objects have string keys)")
            _check_json(v, f"{where}[{k!r}]", tuples=tuples, depth=depth + 1)
        return
    raise RolloutDumpError(f"{where} is a {type(value).__name__}, not a JSON value")


def _describe(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", type(None): "null"}.get(
        type(value), type(value).__name__
    )
