"""Checkpoint integrity: checksums, corrupted and hostile files, full disk. Every failed load
leaves the trainer exactly as it was; every failed save leaves the previous checkpoint."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.multiprocessing as mp
from torch.distributed.checkpoint.state_dict import get_state_dict

from miles.models.loading import CheckpointError
from miles.train import checkpoint as ckpt
from miles.train.checkpoint import export_hf, latest_step, load_checkpoint, save_checkpoint
from miles.train.checkpoint_dcp import SafeReader
from miles.train.packing import shard_for_rank
from miles.train.parallelize import parallelize
from miles.train.trainer import Trainer
from tests.spawn import exits_cleanly
from tests.train.helpers import (
    CHECKPOINT_CONFIG,
    assert_bitwise,
    checkpoint_batch,
    checkpoint_model,
    checkpoint_trainer,
    sections,
    trainer_params,
)

ITER = "iter_0000001"
PARTS = ["dcp/__0_0.distcp", "dcp/.metadata", "trainer_state.pt", "rng_rank00000.pt", "meta.json"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    """One checkpoint of a trained trainer (step 1) and its parameters; tests work on copies."""
    root = tmp_path_factory.mktemp("ckpt")
    trainer = checkpoint_trainer()
    trainer.train_step(checkpoint_batch(1))
    save_checkpoint(root, trainer, 1, {"pos": 1})
    return root, trainer_params(trainer)


@pytest.fixture
def ckpt_dir(saved: tuple[Path, dict[str, torch.Tensor]], tmp_path: Path) -> Path:
    shutil.copytree(saved[0], tmp_path / "ckpt")
    return tmp_path / "ckpt"


@pytest.fixture
def target() -> Trainer:
    """The trainer a load goes into: other weights, a step taken (optimizer state present)."""
    trainer = checkpoint_trainer(seed=7)
    trainer.train_step(checkpoint_batch(5))
    return trainer


def _snapshot(trainer: Trainer) -> dict[str, Any]:
    """Everything a load may change: weights, optimizer and scheduler state, counters, RNGs."""
    optim = {
        f"{id(p)}.{k}": v.clone()
        for p, s in trainer.optimizer.state.items()
        for k, v in s.items()
        if isinstance(v, torch.Tensor)
    }
    return {
        "params": trainer_params(trainer),
        "optim": optim,
        "scheduler": trainer.scheduler.state_dict(),
        "counters": (trainer.step, trainer.skipped_steps),
        "rng": (random.getstate(), torch.get_rng_state(), np.random.get_state(legacy=True)[1].copy()),
    }


def _assert_unchanged(trainer: Trainer, before: dict[str, Any]) -> None:
    after = _snapshot(trainer)
    assert_bitwise(after["params"], before["params"])
    assert_bitwise(after["optim"], before["optim"])
    assert after["scheduler"] == before["scheduler"] and after["counters"] == before["counters"]
    assert after["rng"][0] == before["rng"][0] and torch.equal(after["rng"][1], before["rng"][1])
    assert np.array_equal(after["rng"][2], before["rng"][2])


def _flip(path: Path, size: int = 4096) -> None:
    """Invert up to ``size`` bytes in the middle of ``path`` (at most half of it)."""
    data = bytearray(path.read_bytes())
    n = min(size, len(data) // 2)
    start = (len(data) - n) // 2
    data[start : start + n] = bytes(b ^ 0xFF for b in data[start : start + n])
    path.write_bytes(bytes(data))


def _unverified(iter_dir: Path) -> None:
    """Make ``iter_dir`` what Miles wrote before checksums: no manifest, format_version 1."""
    (iter_dir / "manifest.json").unlink()
    meta = json.loads((iter_dir / "meta.json").read_text())
    (iter_dir / "meta.json").write_text(json.dumps({**meta, "format_version": 1}))


def _reseal(iter_dir: Path) -> None:
    """Rewrite the manifest for the files as they are now: what someone who tampers with a
    checkpoint on purpose does, so that only the structure checks stand in the way."""
    files = {}
    for path in sorted(iter_dir.rglob("*")):
        name = path.relative_to(iter_dir).as_posix()
        if path.is_file() and name != "manifest.json":
            files[name] = {
                "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
                "size": path.stat().st_size,
            }
    digest = hashlib.sha256(json.dumps(files, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    (iter_dir / "manifest.json").write_text(json.dumps({"files": files, "manifest_sha256": digest}))


class _RunsCommand:
    """A pickle whose loading runs a shell command (creating ``marker``)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))


# --------------------------------------------------------------------------------------------
# Checksums
# --------------------------------------------------------------------------------------------


def test_manifest_lists_every_file(ckpt_dir: Path, saved: tuple[Path, dict[str, torch.Tensor]]) -> None:
    manifest = json.loads((ckpt_dir / ITER / "manifest.json").read_text())
    assert sorted(manifest["files"]) == sorted(PARTS)
    for name, entry in manifest["files"].items():
        data = (ckpt_dir / ITER / name).read_bytes()
        assert entry == {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    fresh = checkpoint_trainer(seed=3)
    assert load_checkpoint(ckpt_dir, fresh) == {"pos": 1}
    assert_bitwise(trainer_params(fresh), saved[1])


@pytest.mark.parametrize("part", [*PARTS, "manifest.json"])
def test_a_flipped_file_fails_the_load_naming_it(ckpt_dir: Path, target: Trainer, part: str) -> None:
    """4 KB flipped inside a .distcp once resumed silently with 1,024 weights changed."""
    _flip(ckpt_dir / ITER / part)
    before = _snapshot(target)
    with pytest.raises(CheckpointError, match=rf"{ITER}/{part} is (corrupted|not a readable)"):
        load_checkpoint(ckpt_dir, target)
    _assert_unchanged(target, before)
    if part == "dcp/__0_0.distcp":
        with pytest.raises(CheckpointError, match="checksum does not match"):
            export_hf(ckpt_dir, target.model.spec, ckpt_dir / "hf")


def test_missing_extra_and_truncated_files_are_named(ckpt_dir: Path, target: Trainer) -> None:
    iter_dir = ckpt_dir / ITER
    before = _snapshot(target)
    (iter_dir / "notes.txt").write_text("x")
    with pytest.raises(CheckpointError, match=rf"{ITER}/notes.txt is an unexpected extra file"):
        load_checkpoint(ckpt_dir, target)
    (iter_dir / "notes.txt").unlink()
    rng = iter_dir / "rng_rank00000.pt"
    rng.rename(iter_dir / "moved")
    with pytest.raises(CheckpointError, match=rf"{ITER}/rng_rank00000.pt is missing"):
        load_checkpoint(ckpt_dir, target)
    (iter_dir / "moved").rename(rng)
    shard = iter_dir / "dcp" / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes() + b"\0")
    with pytest.raises(CheckpointError, match=rf"{ITER}/dcp/__0_0.distcp is corrupted: its size differs"):
        load_checkpoint(ckpt_dir / ITER, target)
    (iter_dir / "manifest.json").unlink()  # a checkpoint of this format without its manifest
    with pytest.raises(CheckpointError, match=r"manifest.json is missing"):
        load_checkpoint(ckpt_dir, target)
    _assert_unchanged(target, before)


@pytest.mark.skipif(not Path("/dev/null").exists(), reason="needs /dev/null")
def test_a_part_that_is_not_a_regular_file_is_refused(ckpt_dir: Path, target: Trainer) -> None:
    """A FIFO or a device (/dev/zero) behind a part's name would block or never end a read."""
    iter_dir = ckpt_dir / ITER
    rng = iter_dir / "rng_rank00000.pt"
    rng.unlink()
    rng.symlink_to("/dev/null")
    manifest = json.loads((iter_dir / "manifest.json").read_text())
    manifest["files"]["rng_rank00000.pt"] = {"sha256": hashlib.sha256(b"").hexdigest(), "size": 0}
    files = manifest["files"]
    manifest["manifest_sha256"] = hashlib.sha256(
        json.dumps(files, sort_keys=True, separators=(",", ":")).encode()
    ).hexdigest()
    (iter_dir / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match=rf"{ITER}/rng_rank00000.pt is not a regular file"):
        load_checkpoint(ckpt_dir, target)


# --------------------------------------------------------------------------------------------
# Checkpoints without checksums (saved before them): they load, and bad parts are still named
# --------------------------------------------------------------------------------------------


def test_a_checkpoint_without_checksums_loads_with_a_warning(
    ckpt_dir: Path, saved: tuple[Path, dict[str, torch.Tensor]], caplog: pytest.LogCaptureFixture
) -> None:
    _unverified(ckpt_dir / ITER)
    fresh = checkpoint_trainer(seed=3)
    with caplog.at_level(logging.WARNING, logger="miles.train.checkpoint"):
        assert load_checkpoint(ckpt_dir, fresh) == {"pos": 1}
    assert f"{ckpt_dir / ITER} has no checksums" in caplog.text and "unverified" in caplog.text
    assert_bitwise(trainer_params(fresh), saved[1])


def _garbage_item(path: Path) -> None:
    """Overwrite the header of the first item (a torch.save zip) with other bytes."""
    data = bytearray(path.read_bytes())
    data[:64] = b"\x07" * 64
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


CORRUPTIONS = {
    "truncated shard": ("dcp/__0_0.distcp", _truncate, "is truncated"),
    "garbage in a shard item": ("dcp/__0_0.distcp", _garbage_item, "is corrupted or not a checkpoint part"),
    "garbage trainer state": ("trainer_state.pt", lambda p: p.write_bytes(b"garbage"), "is corrupted"),
    "garbage rng state": ("rng_rank00000.pt", lambda p: p.write_bytes(os.urandom(300)), "is corrupted"),
    "garbage metadata": ("dcp/.metadata", lambda p: p.write_bytes(b"\x80\x04garbage"), "is corrupted"),
    "truncated metadata": ("dcp/.metadata", _truncate, "is corrupted"),
    "empty meta.json": ("meta.json", lambda p: p.write_bytes(b""), "is not a readable"),
}


@pytest.mark.parametrize("case", list(CORRUPTIONS))
def test_corrupted_parts_without_checksums_are_named(ckpt_dir: Path, target: Trainer, case: str) -> None:
    """They gave raw torch tracebacks naming no file; now a CheckpointError naming it, before
    anything of the trainer changed."""
    part, corrupt, message = CORRUPTIONS[case]
    _unverified(ckpt_dir / ITER)
    corrupt(ckpt_dir / ITER / part)
    before = _snapshot(target)
    with pytest.raises(CheckpointError, match=rf"{ITER}/{part}:? {message}"):
        load_checkpoint(ckpt_dir, target)
    _assert_unchanged(target, before)


def test_well_formed_state_files_of_the_wrong_shape_are_refused(ckpt_dir: Path, target: Trainer) -> None:
    """Files that parse but would break the scheduler or the RNGs once applied."""
    iter_dir = ckpt_dir / ITER
    _unverified(iter_dir)
    before = _snapshot(target)
    state_file, rng_file = iter_dir / "trainer_state.pt", iter_dir / "rng_rank00000.pt"
    state = torch.load(state_file, weights_only=True)
    good = state_file.read_bytes()
    torch.save({"schedulers": {"policy": {"last_epoch": 1}}}, state_file)
    with pytest.raises(
        CheckpointError, match=r"trainer_state.pt: schedulers.policy has keys last_epoch, expected"
    ):
        load_checkpoint(ckpt_dir, target)
    state["schedulers"]["policy"]["last_epoch"] = "1"
    torch.save(state, state_file)
    with pytest.raises(CheckpointError, match=r"schedulers.policy.last_epoch is a str, expected int"):
        load_checkpoint(ckpt_dir, target)
    state_file.write_bytes(good)
    rng = torch.load(rng_file, weights_only=True)
    torch.save({**rng, "torch": torch.zeros(3, dtype=torch.uint8)}, rng_file)
    with pytest.raises(CheckpointError, match=r"rng_rank00000.pt: malformed RNG state: torch"):
        load_checkpoint(ckpt_dir, target)
    _assert_unchanged(target, before)


# --------------------------------------------------------------------------------------------
# Hostile files: nothing is unpickled but through an allow-list
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sealed", [False, True], ids=["no-checksums", "resealed"])
def test_metadata_that_runs_code_is_refused(
    ckpt_dir: Path, target: Trainer, tmp_path: Path, sealed: bool
) -> None:
    """DCP's FileSystemReader unpickles .metadata with pickle.load: a command ran on load."""
    import pickle

    marker = tmp_path / "pwned"
    iter_dir = ckpt_dir / ITER
    (iter_dir / "dcp" / ".metadata").write_bytes(pickle.dumps(_RunsCommand(marker)))
    _reseal(iter_dir) if sealed else _unverified(iter_dir)
    before = _snapshot(target)
    with pytest.raises(
        CheckpointError, match=rf"{ITER}/dcp/.metadata is corrupted.*refused global posix.system"
    ):
        load_checkpoint(ckpt_dir, target)
    _assert_unchanged(target, before)
    with pytest.raises(
        CheckpointError, match=rf"{ITER}/dcp/.metadata is corrupted.*refused global posix.system"
    ):
        export_hf(ckpt_dir, target.model.spec, tmp_path / "hf")
    assert not marker.exists()


def test_metadata_of_other_torch_globals_is_refused(ckpt_dir: Path, target: Trainer) -> None:
    """Only DCP's records, sizes, dtypes and layouts: torch functions are globals too."""
    import pickle

    iter_dir = ckpt_dir / ITER

    class CallsTorch:
        def __reduce__(self) -> tuple[Any, ...]:
            return (torch.load, ("/nonexistent",))

    (iter_dir / "dcp" / ".metadata").write_bytes(pickle.dumps(CallsTorch()))
    _reseal(iter_dir)
    with pytest.raises(CheckpointError, match=r"refused global torch.serialization.load"):
        load_checkpoint(ckpt_dir, target)


def test_metadata_pointing_outside_its_directory_is_refused(ckpt_dir: Path, target: Trainer) -> None:
    """Well-formed metadata of allowed types, but an item file elsewhere on the machine."""
    import pickle

    iter_dir = ckpt_dir / ITER
    reader = SafeReader(iter_dir / "dcp")
    md = reader.read_metadata()
    first = next(iter(md.storage_data))
    md.storage_data[first].relative_path = "../trainer_state.pt"
    md.storage_meta = None
    (iter_dir / "dcp" / ".metadata").write_bytes(pickle.dumps(md))
    _reseal(iter_dir)
    before = _snapshot(target)
    with pytest.raises(CheckpointError, match=r"item file '../trainer_state.pt' is not a file of"):
        load_checkpoint(ckpt_dir, target)
    _assert_unchanged(target, before)


@pytest.mark.parametrize("sealed", [False, True], ids=["no-checksums", "resealed"])
def test_a_shard_item_that_runs_code_is_refused(ckpt_dir: Path, tmp_path: Path, sealed: bool) -> None:
    """DCP's default planner reads non-tensor items (optimizer hyper-parameters) with
    torch.load(weights_only=False): a pickled command among them ran on load."""
    marker = tmp_path / "pwned"
    iter_dir = ckpt_dir / ITER
    writer = checkpoint_trainer()
    msd, osd = get_state_dict(writer.model, writer.optimizer)
    osd["param_groups"][0]["lr"] = _RunsCommand(marker)
    shutil.rmtree(iter_dir / "dcp")
    with ckpt._quiet_single_process():
        dcp.save({"policy": {"model": msd, "optim": osd}}, checkpoint_id=iter_dir / "dcp", no_dist=True)
    _reseal(iter_dir) if sealed else _unverified(iter_dir)
    target = checkpoint_trainer(seed=7)
    target.train_step(checkpoint_batch(5))
    before = _snapshot(target)
    with pytest.raises(
        CheckpointError, match=rf"{ITER}/dcp/__0_0.distcp is corrupted.*: refused global posix.system$"
    ):
        load_checkpoint(ckpt_dir, target)
    assert not marker.exists()
    if not sealed:  # without checksums every item is read before the load: nothing changed
        _assert_unchanged(target, before)


# --------------------------------------------------------------------------------------------
# Full disk
# --------------------------------------------------------------------------------------------


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full (Linux)")
def test_full_disk_names_the_file_and_keeps_the_previous_checkpoint(tmp_path: Path) -> None:
    """A full disk said `unexpected pos 704 vs 598`. Here the tracker's temporary file is
    /dev/full, whose writes fail with ENOSPC: the new iteration, already in place, is taken back."""
    trainer = checkpoint_trainer()
    trainer.train_step(checkpoint_batch(1))
    save_checkpoint(tmp_path, trainer, 1, {"pos": 1})
    want = trainer_params(trainer)
    trainer.train_step(checkpoint_batch(2))
    tracker_tmp = tmp_path / ".latest_checkpointed_iteration.txt.tmp"
    tracker_tmp.symlink_to("/dev/full")
    with pytest.raises(CheckpointError) as e:
        save_checkpoint(tmp_path, trainer, 2, {"pos": 2})
    assert str(e.value).startswith(
        f"no space left on device while writing {tracker_tmp}; step 2 was not saved"
    )
    assert latest_step(tmp_path) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["iter_0000001", "latest_checkpointed_iteration.txt"]
    fresh = checkpoint_trainer(seed=3)
    assert load_checkpoint(tmp_path, fresh) == {"pos": 1}
    assert_bitwise(trainer_params(fresh), want)
    save_checkpoint(tmp_path, trainer, 2, {"pos": 2})  # space again: the save goes through
    assert latest_step(tmp_path) == 2 and load_checkpoint(tmp_path, fresh) == {"pos": 2}


def _namespace_mount(directory: Path, size_kb: int) -> list[str] | None:
    """A command prefix running its command with a ``size_kb`` tmpfs on ``directory`` (a private
    mount namespace: as root, or as a user where unprivileged user namespaces are allowed), or
    None where neither works."""
    if shutil.which("unshare") is None or shutil.which("mount") is None:
        return None
    mount = f"mount -t tmpfs -o size={size_kb}k tmpfs {directory}"
    for flags in (["--mount"], ["--user", "--map-root-user", "--mount"]):
        probe = subprocess.run(["unshare", *flags, "sh", "-c", f"{mount} && true"], capture_output=True)
        if probe.returncode == 0:
            return ["unshare", *flags, "sh", "-c", f'{mount} && exec "$0" "$@"']
    return None


def test_full_disk_while_writing_shards_on_a_small_tmpfs(tmp_path: Path) -> None:
    """A really full file system (a tmpfs with room for one checkpoint, in a mount namespace):
    the error names the shard being written; the first checkpoint stays, loadable."""
    directory = tmp_path / "small"
    directory.mkdir()
    size = sum(f.stat().st_size for f in _checkpoint_files(tmp_path)) // 1024
    prefix = _namespace_mount(directory, size_kb=size * 3 // 2)
    if prefix is None:
        pytest.skip("cannot mount a tmpfs here (no mount namespace)")
    code = f"from tests.train.helpers import full_disk_child; full_disk_child({str(directory)!r})"
    repo = Path(__file__).resolve().parents[2]
    out = subprocess.run(
        [*prefix, sys.executable, "-c", code], cwd=repo, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0 and "FULL-DISK-OK" in out.stdout, out.stdout + out.stderr


def _checkpoint_files(tmp_path: Path) -> list[Path]:
    """The files of one checkpoint of the test trainer (to size the tmpfs)."""
    trainer = checkpoint_trainer()
    trainer.train_step(checkpoint_batch(1))
    path = save_checkpoint(tmp_path / "sizing", trainer, 1)
    return [p for p in path.rglob("*") if p.is_file()]


# --------------------------------------------------------------------------------------------
# Two FSDP2 ranks (gloo): a failure on one rank fails the save or load on both, none hangs
# --------------------------------------------------------------------------------------------


@exits_cleanly
def _two_rank_worker(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        root = Path(out_dir) / "ckpt"
        trainer = Trainer(parallelize(checkpoint_model()), *sections(**CHECKPOINT_CONFIG))
        trainer.train_step(shard_for_rank(checkpoint_batch(1), rank, 2))
        save_checkpoint(root, trainer, 1, {"pos": 1})
        errors = {}
        if rank == 0:  # the tracker's temporary file is /dev/full: only rank 0 writes it
            (root / ".latest_checkpointed_iteration.txt.tmp").symlink_to("/dev/full")
        dist.barrier()
        try:
            save_checkpoint(root, trainer, 2, {"pos": 2})
        except CheckpointError as e:
            errors["save"] = str(e)
        if rank == 0:
            _flip(root / ITER / "dcp" / "__0_0.distcp")  # rank 0's shard; the ranks share the checks
        dist.barrier()
        try:
            load_checkpoint(root, trainer)
        except CheckpointError as e:
            errors["load"] = str(e)
        (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(errors))
    finally:
        dist.barrier()
        dist.destroy_process_group()


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full (Linux)")
def test_two_ranks_fail_together(tmp_path: Path) -> None:
    mp.spawn(_two_rank_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    tracker_tmp = tmp_path / "ckpt" / ".latest_checkpointed_iteration.txt.tmp"
    assert r0["save"].startswith(f"no space left on device while writing {tracker_tmp}; step 2 was not saved")
    assert r1["save"].startswith("saving the checkpoint failed on another rank; step 2 was not saved")
    assert latest_step(tmp_path / "ckpt") == 1 and not (tmp_path / "ckpt" / "iter_0000002").exists()
    shard = tmp_path / "ckpt" / ITER / "dcp" / "__0_0.distcp"  # 2nd of the sorted files: rank 1's to check
    assert r1["load"].startswith(f"{shard} is corrupted: its checksum does not match")
    assert r0["load"] == f"{tmp_path / 'ckpt' / ITER}: a file failed verification on another rank"
