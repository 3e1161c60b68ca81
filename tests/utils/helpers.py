"""Reading back what the metric sinks wrote: W&B offline run files."""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path


def wandb_records(path: Path) -> list[bytes]:
    """Records of a ``.wandb`` file: a 7-byte header, then LevelDB-log framing (32 KiB blocks,
    each chunk ``crc32:u32 length:u16 type:u8``; types 1 full, 2 first, 3 middle, 4 last)."""
    data, block, pos = path.read_bytes(), 32768, 7
    assert data[:4] == b":W&B"
    records, current = [], b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0:
            break
        current += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            records.append(current)
            current = b""
    return records


def wandb_history(run_dir: Path) -> list[dict]:
    """The logged rows of the one offline W&B run under ``run_dir`` (``step`` = W&B's ``_step``)."""
    from wandb.proto import wandb_internal_pb2 as pb

    (run_file,) = (run_dir / "wandb").glob("offline-run-*/run-*.wandb")
    history = []
    for raw in wandb_records(run_file):
        record = pb.Record()
        record.ParseFromString(raw)
        if record.WhichOneof("record_type") == "history":
            # a key is written as ``key`` or as the one-element path ``nested_key``
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
            history.append(
                {k: v for k, v in items.items() if not k.startswith("_")} | {"step": items["_step"]}
            )
    return history


def settled_wandb_history(run_dir: Path, rows: int, timeout_s: float = 30.0) -> list[dict]:
    """:func:`wandb_history` once it holds ``rows`` rows: ``wandb.finish()`` can return before
    wandb's writer process has flushed the history records to the offline file (seen about one
    run in six on the 2-core CI machine, the rows arriving within a few seconds)."""
    deadline = time.monotonic() + timeout_s
    while True:
        history = wandb_history(run_dir)
        if len(history) >= rows or time.monotonic() > deadline:
            return history
        time.sleep(0.1)
