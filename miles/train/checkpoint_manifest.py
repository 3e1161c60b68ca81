"""The manifest of a checkpoint: the size and SHA-256 of every file of its iteration directory.

Saving, every rank records the digests of the files it wrote (:func:`write_digests`), and rank 0
gathers them into ``manifest.json`` (:func:`write_manifest`), which carries its own digest and
must cover every file in the directory. Loading, :func:`read_manifest` checks the manifest itself
and that it lists exactly the files on disk, and :func:`verify_files` checks the sizes and
checksums of one rank's share of them. Every error is a ``CheckpointError`` naming the file.

Nothing here communicates: the caller shares the files out over the ranks and agrees on the
outcome (:mod:`miles.train.checkpoint`).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from miles.models.loading import CheckpointError
from miles.train.checkpoint_files import MAX_FILE_BYTES, read_json, sized, write_json

MANIFEST = "manifest.json"

_CHUNK = 8 << 20  # bytes hashed per read
_SHA256 = re.compile(r"[0-9a-f]{64}")


def _digest(path: Path) -> dict[str, Any]:
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
            size += len(chunk)
    return {"sha256": h.hexdigest(), "size": size}


def _files_digest(files: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(files, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _list_files(directory: Path) -> list[str]:
    """Every file under ``directory``, as sorted relative POSIX paths."""
    out = []
    for dirpath, _, names in os.walk(directory):
        out += [(Path(dirpath) / n).relative_to(directory).as_posix() for n in names]
    return sorted(out)


def write_digests(tmp: Path, rank: int, written: list[Path]) -> None:
    """This rank's part of the manifest: the digests of ``written``, the files it wrote under ``tmp``."""
    digests = {p.relative_to(tmp).as_posix(): _digest(p) for p in written}
    write_json(tmp / f".files_rank{rank:05d}.json", digests)


def write_manifest(tmp: Path, world: int) -> None:
    """Rank 0: the ranks' digests as ``manifest.json``, which must cover every file."""
    files: dict[str, Any] = {}
    for r in range(world):
        part = tmp / f".files_rank{r:05d}.json"
        files.update(json.loads(part.read_text()))
        part.unlink()
    unlisted = sorted(set(_list_files(tmp)) - set(files))
    if unlisted:  # a file written behind the save's back would fail every load
        raise CheckpointError(f"{tmp / unlisted[0]} was written but has no checksum")
    write_json(tmp / MANIFEST, {"files": files, "manifest_sha256": _files_digest(files)})


def read_manifest(path: Path) -> dict[str, dict[str, Any]]:
    """The files listed by the manifest of the iteration directory ``path`` (name -> ``sha256``,
    ``size``), which must be exactly the files in ``path``."""
    manifest = path / MANIFEST
    doc = read_json(manifest, "checkpoint manifest")
    files = doc.get("files") if isinstance(doc, dict) else None
    if not isinstance(files, dict) or not all(
        isinstance(name, str)
        and isinstance(d, dict)
        and isinstance(d.get("sha256"), str)
        and _SHA256.fullmatch(d["sha256"])
        and type(d.get("size")) is int
        for name, d in files.items()
    ):
        raise CheckpointError(
            f"{manifest} is corrupted: expected {{'files': {{name: {{'sha256', 'size'}}}}}}"
        )
    if doc.get("manifest_sha256") != _files_digest(files):
        raise CheckpointError(f"{manifest} is corrupted: its own checksum does not match its content")
    on_disk = set(_list_files(path)) - {MANIFEST}
    missing, extra = sorted(set(files) - on_disk), sorted(on_disk - set(files))
    if missing:
        raise CheckpointError(f"{path / missing[0]} is missing (listed in {manifest})")
    if extra:
        raise CheckpointError(f"{path / extra[0]} is an unexpected extra file (not in {manifest})")
    return files


def verify_files(
    path: Path, files: Mapping[str, Mapping[str, Any]], rank: int, world: int
) -> CheckpointError | None:
    """Check rank ``rank``'s share (every ``world``-th, in name order) of ``files`` against their
    size and checksum; the error for the first that fails, or None."""
    manifest = path / MANIFEST
    for name in sorted(files)[rank::world]:
        want, file = files[name], path / name
        try:
            size = sized(file, MAX_FILE_BYTES, "checkpoint file")
            got = _digest(file) if size == want["size"] else None
        except CheckpointError as e:
            return e
        except OSError as e:
            return CheckpointError(f"{file} cannot be read: {e.strerror or e}")
        if got is None or got["sha256"] != want["sha256"]:
            reason = "its size differs from" if got is None else "its checksum does not match"
            return CheckpointError(f"{file} is corrupted: {reason} the manifest ({manifest})")
    return None
