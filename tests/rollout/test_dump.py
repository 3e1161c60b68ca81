"""Rollout dumps: exact round trip of every Sample field, atomic writes, and malformed or
hostile files refused with the file, group, sample and field named (nothing unpickled)."""

from __future__ import annotations

import json
import os
import pickle
from dataclasses import fields
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

from miles.rollout import dump
from miles.rollout.dump import RolloutDumpError, load_rollout_dump, save_rollout_dump
from miles.types import Group, Sample, SampleStatus


def _groups() -> list[Group]:
    """Every field populated somewhere: chat and text prompts, per-token lists, routed experts
    (numpy and torch, as the engine and a custom hook give them), nested metadata, failures."""
    rng = np.random.default_rng(0)
    full = Sample(
        prompt="2+3=",
        prompt_ids=[1, 50, 7, 9],
        response="5 <eos>",
        response_ids=[11, 2, 0],
        rollout_logprobs=[-0.1, -1e-300, -23.456789012345678],
        loss_mask=[1, 1, 0],
        label={"target": 5, "numbers": [2, 3]},
        reward=0.75,
        status=SampleStatus.COMPLETED,
        weight_versions=["3", "4"],
        routed_experts=rng.integers(0, 8, size=(6, 2, 2), dtype=np.int32),
        index=0,
        group_index=0,
        metadata={"tools": [{"name": "calc", "args": {"x": 1.5}}], "turns": 2, "raw": None, "ok": True},
        error=None,
    )
    chat = Sample(
        prompt=[{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi ünïcødé"}],
        prompt_ids=[3, 4],
        response="hello",
        response_ids=[5, 6],
        label="7",
        status=SampleStatus.FAILED,
        weight_versions=["4"],
        routed_experts=torch.arange(12, dtype=torch.int16).reshape(3, 2, 2),
        index=1,
        group_index=0,
        metadata={"nan": float("nan"), "inf": float("-inf")},
        error="reward raised: ZeroDivisionError",
    )
    empty = Sample(prompt="q", prompt_ids=[8], status=SampleStatus.TRUNCATED, index=2, group_index=5)
    return [Group(0, (full, chat)), Group(5, (empty,))]


def _assert_same(got: list[Group], want: list[Group]) -> None:
    assert [(g.index, len(g)) for g in got] == [(g.index, len(g)) for g in want]
    for g, w in zip(got, want):
        for a, b in zip(g.samples, w.samples):
            for f in fields(Sample):
                x, y = getattr(a, f.name), getattr(b, f.name)
                if f.name == "routed_experts" and y is not None:
                    assert type(x) is type(y) and x.dtype == y.dtype and x.shape == y.shape
                    assert np.array_equal(np.asarray(x), np.asarray(y))
                elif f.name == "metadata" and "nan" in y:
                    assert np.isnan(x["nan"]) and x["inf"] == y["inf"] and set(x) == set(y)
                else:
                    assert x == y and type(x) is type(y), f.name


def test_round_trip_of_every_field(tmp_path: Path) -> None:
    path = tmp_path / "rollout_3.pt"  # loop.py's file name
    groups = _groups()
    save_rollout_dump(groups, path)
    assert os.listdir(tmp_path) == ["rollout_3.pt"]  # the temporary file was renamed
    _assert_same(load_rollout_dump(path), groups)
    assert isinstance(load_rollout_dump(path)[0].samples[0].rollout_logprobs[1], float)


def test_the_checks_cover_every_sample_field() -> None:
    assert set(dump._CHECKS) == {f.name for f in fields(Sample)}


def test_a_field_that_is_not_json_is_refused_and_the_old_dump_kept(tmp_path: Path) -> None:
    path = tmp_path / "d.pt"
    save_rollout_dump(_groups(), path)
    before = path.read_bytes()
    bad = _groups()
    bad[1].samples[0].metadata["when"] = object()
    with pytest.raises(RolloutDumpError, match=r"d\.pt: group 1, sample 0: metadata\['when'\] is a object"):
        save_rollout_dump(bad, path)
    bad[1].samples[0].metadata = {1: "int key"}
    with pytest.raises(RolloutDumpError, match=r"metadata: key 1 is not a string"):
        save_rollout_dump(bad, path)
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["d.pt"]


def _write(path: Path, doc: Any, arrays: dict[str, np.ndarray] | None = None, **header: str) -> Path:
    """A dump written by hand: the document and arrays as given."""
    tensors = dict(arrays or {})
    tensors["__json__"] = np.frombuffer(json.dumps(doc).encode(), dtype=np.uint8)
    save_file(tensors, str(path), metadata={"format": dump.FORMAT, "version": dump.VERSION, **header})
    return path


def _doc(tmp_path: Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The document and arrays of a valid dump, to break one thing at a time."""
    from safetensors import safe_open

    path = tmp_path / "valid.pt"
    save_rollout_dump(_groups(), path)
    with safe_open(str(path), framework="numpy") as f:
        arrays = {k: f.get_tensor(k) for k in list(f.keys())}
    return json.loads(arrays.pop("__json__").tobytes()), arrays


def _nested(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = [value]
    return value


SAMPLE_CASES = {
    "reward": ("x", r"group 0, sample 0: reward must be null or a number, got a string"),
    "status": ("done", r"status must be one of pending, completed"),
    "prompt_ids": ([1, -2], r"prompt_ids must be a list of token ids, got a list"),
    "response_ids": ([1.5, 2, 0], r"response_ids must be a list of token ids"),
    "loss_mask": ([1, 1], r"group 0, sample 0: sample 0: loss_mask has 2 entries, response_ids has 3"),
    "metadata": ([1], r"metadata must be an object, got a list"),
    "label": ({"a": _nested(70)}, r"label\['a'\](\[0\])+: nested deeper than 64"),
    "routed_experts": (
        {"tensor": "array.9", "type": "numpy"},
        r"names tensor 'array.9', which the file lacks",
    ),
    "index": (True, r"index must be an integer, got bool"),
}


@pytest.mark.parametrize("field", list(SAMPLE_CASES))
def test_a_malformed_field_is_named(tmp_path: Path, field: str) -> None:
    doc, arrays = _doc(tmp_path)
    value, message = SAMPLE_CASES[field]
    doc["groups"][0]["samples"][0][field] = value
    path = _write(tmp_path / "d.pt", doc, arrays)
    with pytest.raises(RolloutDumpError, match=rf"^{path}: .*{message}"):
        load_rollout_dump(path)


def test_malformed_structure_is_named(tmp_path: Path) -> None:
    doc, arrays = _doc(tmp_path)
    cases: list[tuple[Any, dict[str, np.ndarray], str]] = [
        ({"groups": {}}, arrays, r"the document must be \{'groups': \[...\]\}"),
        ({"groups": [{"index": 0, "samples": []}]}, {}, r"group 0: 'samples' must be a list of 1 to"),
        ({"groups": doc["groups"][1:]}, arrays, r"tensor 'array.0' belongs to no sample"),
        (
            {"groups": [doc["groups"][0]] * 2},
            arrays,
            r"group 1, sample 0: routed_experts names tensor 'array.0', which the file lacks or another field took",
        ),
        (
            {"groups": [{"index": 0, "samples": [{"prompt": "x"}]}]},
            {},
            r"group 0, sample 0 must be an object with the fields",
        ),
    ]
    for bad, bad_arrays, message in cases:
        path = _write(tmp_path / "d.pt", bad, bad_arrays)
        with pytest.raises(RolloutDumpError, match=message):
            load_rollout_dump(path)
    path = _write(tmp_path / "d.pt", doc, arrays, format="other")
    with pytest.raises(RolloutDumpError, match=r"not a Miles rollout dump \(format 'other'"):
        load_rollout_dump(path)


def test_broken_large_and_pickled_files_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "d.pt"
    save_rollout_dump(_groups(), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(RolloutDumpError, match=rf"^{path}: not a readable rollout dump"):
        load_rollout_dump(path)
    path.write_bytes(data)
    with pytest.raises(
        RolloutDumpError, match=rf"^{path}: {len(data)} bytes, more than the 100 a rollout dump"
    ):
        load_rollout_dump(path, max_bytes=100)
    with pytest.raises(RolloutDumpError, match=r"missing.pt: cannot read the rollout dump: No such file"):
        load_rollout_dump(tmp_path / "missing.pt")


class _RunsCommand:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))


def test_a_pickle_is_never_loaded(tmp_path: Path) -> None:
    """What --load-debug-rollout-data read with torch.load(weights_only=False): a command ran."""
    marker = tmp_path / "pwned"
    for path, save in (
        (tmp_path / "a.pt", torch.save),
        (tmp_path / "b.pt", lambda o, p: p.write_bytes(pickle.dumps(o))),
    ):
        save(_RunsCommand(marker), path)
        with pytest.raises(RolloutDumpError, match="not a readable rollout dump"):
            load_rollout_dump(path)
    assert not marker.exists()
