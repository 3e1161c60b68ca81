"""Checkpoint file I/O in which every error names the file.

Writing: :func:`write_file` (flushed and fsync'd), :func:`write_atomic` (a temporary file, then
``os.replace``), :func:`write_json`, :func:`save_torch` and DCP's :class:`Writer` raise
``CheckpointError`` naming the file when the file system fails (``no space left on device while
writing PATH`` for a full disk, where torch alone says ``unexpected pos 704 vs 598``).
:func:`write_error` and :func:`dcp_error` turn an error caught around a write into that form, and
leave errors that are not the file system's as they are.

Reading: :func:`sized` refuses a file that is missing, not a regular file, or larger than the bound
for its kind, so that nothing is read into memory before that; :func:`read_json` reads a bounded
JSON file; :func:`read_error` names the file a parser failed on. Nothing here unpickles anything.
"""

from __future__ import annotations

import errno
import io
import json
import os
import re
import stat
from collections.abc import Generator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, cast

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.filesystem import FileSystem

from miles.models.loading import CheckpointError

MAX_FILE_BYTES = 1 << 50  # any checkpoint file; the largest, DCP shards, are read item by item, never whole
_MAX_JSON_BYTES = 256 << 20  # meta.json, manifest.json

_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO, errno.EROFS}


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


def _os_error(e: BaseException) -> OSError | None:
    """The OSError behind ``e``: ``e`` itself, one it was raised from, or one whose handling
    raised it if that is a failed write. torch.save's zip writer answers a failed write with
    ``RuntimeError: ... unexpected pos 704 vs 598``, raised while handling the real ENOSPC; an
    error raised while handling some other OSError is not the file system's."""
    seen: set[int] = set()
    stack: list[tuple[BaseException | None, bool]] = [(e, True)]
    while stack:
        x, direct = stack.pop()
        if x is None or id(x) in seen:
            continue
        seen.add(id(x))
        if isinstance(x, OSError) and x.errno is not None and (direct or x.errno in _WRITE_ERRNOS):
            return x
        stack += [(x.__cause__, direct), (x.__context__, False)]
    return None


def write_error(path: Path, e: BaseException) -> CheckpointError | None:
    """``no space left on device while writing PATH`` (or the OS's reason), or None for an error
    that is not the file system's."""
    err = _os_error(e)
    if err is None:
        return None
    where = err.filename or path
    if err.errno == errno.ENOSPC:
        return CheckpointError(f"no space left on device while writing {where}")
    if err.errno == errno.EDQUOT:
        return CheckpointError(f"disk quota exceeded while writing {where}")
    return CheckpointError(f"{err.strerror or err} while writing {where}")


def write_file(path: Path, data: bytes) -> None:
    try:
        with open(path, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise cast(CheckpointError, write_error(path, e)) from e


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write_file(tmp, text.encode())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


def write_json(path: Path, obj: Any) -> None:
    write_file(path, json.dumps(obj, indent=2, sort_keys=True).encode())


def save_torch(obj: Any, path: Path) -> None:
    buf = io.BytesIO()
    torch.save(obj, buf)
    write_file(path, buf.getvalue())


class NamedFileSystem(FileSystem):
    """DCP's file system, naming the file in every error and recording the files written."""

    def __init__(self) -> None:
        super().__init__()
        self.written: list[Path] = []

    @contextmanager
    def create_stream(self, path: str | os.PathLike[str], mode: str) -> Generator[io.IOBase, None, None]:
        path = Path(path)
        try:
            with super().create_stream(path, mode) as stream:
                yield stream
        except CheckpointError:
            raise
        except (torch.OutOfMemoryError, MemoryError):
            raise
        except Exception as e:
            error = write_error(path, e) if "w" in mode else read_error(path, e)
            if error is None:
                raise
            raise error from e
        if "w" in mode:
            self.written.append(path)

    def rename(self, path: str | os.PathLike[str], new_path: str | os.PathLike[str]) -> None:
        super().rename(path, new_path)  # DCP writes .metadata.tmp, then renames it
        self.written = [Path(new_path) if p == Path(path) else p for p in self.written]


class Writer(dcp.FileSystemWriter):
    """DCP's writer through a :class:`NamedFileSystem` (``writer.fs.written``: the files it wrote)."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.fs = NamedFileSystem()


def dcp_error(e: CheckpointException, where: Path) -> BaseException:
    """The error behind DCP's wrapper (which gathers every rank's): ours if one is, else the
    first rank's, as a CheckpointError naming ``where`` when the file system caused it."""
    failures = [exc for exc, _ in e.failures.values()]
    for exc in failures:
        if isinstance(exc, CheckpointError):
            return exc
    first = failures[0] if failures else e
    return write_error(where, first) or first


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


def read_error(path: Path, e: BaseException) -> CheckpointError:
    text = str(e).strip()
    refused = re.search(r"unsupported GLOBAL (\S+)", text)  # torch.load(weights_only=True)'s refusal
    if refused:
        text = f"refused global {refused.group(1)}"
    text = text.splitlines()[0][:500] if text else "(no message)"
    return CheckpointError(f"{path} is corrupted or not a checkpoint part: {type(e).__name__}: {text}")


def sized(path: Path, limit: int, what: str) -> int:
    """The size of the regular file ``path``, at most ``limit``: a FIFO or a device (``/dev/zero``
    behind a symlink) would block or never end a read."""
    try:
        st = path.stat()
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing: the checkpoint is incomplete") from None
    if not stat.S_ISREG(st.st_mode):
        raise CheckpointError(f"{path} is not a regular file")
    if st.st_size > limit:
        raise CheckpointError(f"{path}: {st.st_size} bytes, more than a {what} holds ({limit})")
    return st.st_size


def read_json(path: Path, what: str) -> Any:
    try:
        sized(path, _MAX_JSON_BYTES, what)
        return json.loads(path.read_bytes())
    except CheckpointError:
        raise
    except (OSError, ValueError, RecursionError) as e:  # ValueError: bad JSON or not UTF-8
        raise CheckpointError(f"{path} is not a readable {what}: {type(e).__name__}: {e}") from e
