"""The small torch state files of a checkpoint: ``trainer_state.pt`` (LR schedulers) and
``rng_rank*.pt`` (python / numpy / torch / CUDA RNG states).

They hold plain types and tensors only (:func:`rng_state`), so that :func:`load_torch` reads them
with ``torch.load(weights_only=True)``, within a size bound. What is read is checked for structure
(:func:`check_schedulers`, :func:`check_rng_state`) before anything is applied, so that applying
it (``load_state_dict``, :func:`set_rng_state`) cannot fail half-way. Every error is a
``CheckpointError`` naming the file.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from miles.models.loading import CheckpointError
from miles.train.checkpoint_files import read_error, sized

_MAX_STATE_BYTES = 64 << 20  # trainer_state.pt, rng_rank*.pt

_LEAF_KINDS = {bool: "bool", int: "number", float: "number", str: "str", type(None): "none"}


def rng_state() -> dict[str, Any]:
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


def set_rng_state(state: dict[str, Any]) -> None:
    """Apply what :func:`rng_state` returned (checked by :func:`check_rng_state` if it was read)."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(state["torch"])
    if "numpy" in state:
        import numpy as np

        kind, keys, pos, has_gauss, g = state["numpy"]
        np.random.set_state((kind, keys.numpy().astype("uint32"), pos, has_gauss, g))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_torch(path: Path) -> Any:
    """``torch.load(weights_only=True)`` of a small state file, errors naming it."""
    try:
        sized(path, _MAX_STATE_BYTES, "state file")
        return torch.load(path, map_location="cpu", weights_only=True)
    except CheckpointError:
        raise
    except Exception as e:
        raise read_error(path, e) from e


def _check_like(path: Path, where: str, saved: Any, current: Any) -> None:
    """``saved`` has the structure of ``current`` (same keys, lengths, kinds of leaves; None
    where the other has a value): a scheduler's ``load_state_dict`` takes any dict, and a wrong
    one would break the next step."""
    if isinstance(current, dict):
        if not isinstance(saved, dict) or set(saved) != set(current):
            raise CheckpointError(f"{path}: {where} has keys {_keys(saved)}, expected {_keys(current)}")
        for k in current:
            _check_like(path, f"{where}.{k}", saved[k], current[k])
    elif isinstance(current, (list, tuple)):
        if not isinstance(saved, (list, tuple)) or len(saved) != len(current):
            raise CheckpointError(f"{path}: {where} should be a list of {len(current)}")
        for i, (s, c) in enumerate(zip(saved, current)):
            _check_like(path, f"{where}[{i}]", s, c)
    else:
        got, want = _LEAF_KINDS.get(type(saved)), _LEAF_KINDS.get(type(current))
        if got is None or (got != want and "none" not in (got, want)):
            raise CheckpointError(
                f"{path}: {where} is a {type(saved).__name__}, expected {type(current).__name__}"
            )


def check_schedulers(path: Path, extra: Any, schedulers: Mapping[str, Any]) -> None:
    """``extra`` (read from ``path``) holds a state shaped like each of ``schedulers`` (unit name
    -> LR scheduler) under ``extra["schedulers"][unit]``; other units' saved states are ignored."""
    saved = extra.get("schedulers") if isinstance(extra, dict) else None
    for name, scheduler in schedulers.items():
        if not isinstance(saved, dict) or name not in saved:
            raise CheckpointError(f"{path}: no {name} LR scheduler state (saved: {_keys(saved)})")
        _check_like(path, f"schedulers.{name}", saved[name], scheduler.state_dict())


def _keys(d: Any) -> str:
    return ", ".join(sorted(map(str, d))) if isinstance(d, dict) else type(d).__name__


def check_rng_state(path: Path, state: Any) -> None:
    """The states :func:`set_rng_state` applies, checked so that applying them cannot fail."""

    def ok_words(xs: Any, n: int) -> bool:
        return len(xs) == n and all(type(x) is int and 0 <= x < 2**32 for x in xs)

    def bad(what: str) -> CheckpointError:
        return CheckpointError(f"{path}: malformed RNG state: {what}")

    if not isinstance(state, dict) or not {"python", "torch"} <= set(state) <= {
        "python",
        "torch",
        "numpy",
        "cuda",
    }:
        raise bad(f"keys {_keys(state)}")
    py = state["python"]
    if not (
        isinstance(py, tuple)
        and len(py) == 3
        and type(py[0]) is int
        and isinstance(py[1], (tuple, list))
        and ok_words(py[1][:624], 624)
        and len(py[1]) == 625
        and type(py[1][624]) is int
        and 0 <= py[1][624] <= 624
        and (py[2] is None or type(py[2]) is float)
    ):
        raise bad("python")
    t = state["torch"]
    want = torch.get_rng_state()
    if not (isinstance(t, torch.Tensor) and t.dtype == want.dtype and t.shape == want.shape):
        raise bad("torch")
    if "numpy" in state:
        n = state["numpy"]
        if not (
            isinstance(n, tuple)
            and len(n) == 5
            and n[0] == "MT19937"
            and isinstance(n[1], torch.Tensor)
            and n[1].dtype == torch.int64
            and n[1].shape == (624,)
            and bool(((n[1] >= 0) & (n[1] < 2**32)).all())
            and type(n[2]) is int
            and 0 <= n[2] <= 624
            and type(n[3]) is int
            and type(n[4]) is float
        ):
            raise bad("numpy")
    cuda = state.get("cuda", [])
    if not (
        isinstance(cuda, list) and all(isinstance(c, torch.Tensor) and c.dtype == torch.uint8 for c in cuda)
    ):
        raise bad("cuda")
