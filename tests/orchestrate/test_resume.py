"""A run killed with SIGKILL and resumed with --load logs the same metrics as an uninterrupted run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from miles.utils.metrics import read_metrics


def _cmd(world: Path, run_dir: Path, ckpt: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "miles", "train", "--hf-checkpoint", str(world / "model"),
            "--prompt-data", str(world / "train.jsonl"), "--input-key", "prompt", "--label-key", "label",
            "--apply-chat-template", "--rm-type", "exact", "--rollout-batch-size", "4",
            "--n-samples-per-prompt", "4", "--rollout-max-response-len", "4", "--lr", "1e-3",
            "--rollout-shuffle", "--num-rollout", "4", "--save", str(ckpt), "--save-interval", "2",
            "--run-dir", str(run_dir), *extra]  # fmt: skip


def _comparable(rows: list[dict]) -> dict[int, dict]:
    return {
        r["step"]: {k: v for k, v in r.items() if not k.startswith("perf/") and k != "time"} for r in rows
    }


def test_sigkill_then_resume_reproduces_the_uninterrupted_run(arith_world, tmp_path):
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    straight = tmp_path / "straight"
    subprocess.run(_cmd(arith_world, straight, tmp_path / "ckpt_a"), check=True, env=env, capture_output=True)

    killed = tmp_path / "killed"
    ckpt = tmp_path / "ckpt_b"
    proc = subprocess.Popen(
        _cmd(arith_world, killed, ckpt), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    tracker = ckpt / "latest_checkpointed_iteration.txt"
    deadline = time.time() + 300
    while not (tracker.exists() and tracker.read_text().strip() == "2"):
        assert proc.poll() is None, "the run ended before its first checkpoint"
        assert time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    subprocess.run(
        _cmd(arith_world, killed, ckpt, "--load", str(ckpt)), check=True, env=env, capture_output=True
    )

    steps = [r["step"] for r in read_metrics(killed)]
    assert steps.count(0) == 1 and steps.count(1) == 1 and steps[-2:] == [2, 3]  # resumed at step 2
    want = _comparable(read_metrics(straight))
    got = _comparable(read_metrics(killed))  # the killed run's lines, then the resumed run's
    assert set(want) == {0, 1, 2, 3}
    for step in (2, 3):
        assert got[step] == want[step], step


def _argv(world: Path, run_dir: Path, ckpt: Path, *extra: str) -> list[str]:
    return _cmd(world, run_dir, ckpt, *extra)[3:]  # without "python -m miles"


def test_load_of_nothing_fails_unless_a_fresh_start_is_allowed(arith_world, tmp_path, capsys):
    """slime's auto-resume: --load and --save the same directory. Without --allow-fresh-start the
    first run (nothing to load yet) is refused; with it, the first run starts fresh and says so,
    and the same command run again resumes from the checkpoint, appending to the run's metrics."""
    from miles.cli import main

    ckpt, run_dir = tmp_path / "ckpt", tmp_path / "run"

    def argv_of(steps: int) -> list[str]:
        return [*_argv(arith_world, run_dir, ckpt, "--load", str(ckpt)), "--num-rollout", str(steps)]

    argv = argv_of(2)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(
        f"miles: error: --load {ckpt}: no such directory; pass --allow-fresh-start"
    ) and not (run_dir.exists())
    ckpt.mkdir()
    assert main(argv) == 2
    assert f"--load {ckpt} holds no checkpoint" in capsys.readouterr().err

    assert main([*argv, "--allow-fresh-start"]) == 0
    err = capsys.readouterr().err
    assert (
        f"[miles] --load {ckpt} holds no checkpoint yet (--allow-fresh-start): starting from --hf-checkpoint"
        in err
    )
    assert [r["step"] for r in read_metrics(run_dir)] == [0, 1]

    assert main([*argv_of(4), "--allow-fresh-start"]) == 0
    lines = capsys.readouterr().err.splitlines()
    assert lines[:2] == [f"[miles] run directory: {run_dir} (resuming: appending to its metrics.jsonl)",
                         f"[miles] resuming from {ckpt} at step 2"]  # fmt: skip
    assert [r["step"] for r in read_metrics(run_dir)] == [0, 1, 2, 3]


def test_a_checkpoint_that_cannot_be_loaded_stops_the_run_with_status_1(
    arith_world, tmp_path, capsys, monkeypatch
):
    """A run that cannot go on is not the user's typo: status 1, ``miles: error:`` naming the file,
    no traceback, unless MILES_DEBUG asks for it."""
    import json

    from miles.cli import main
    from miles.models.loading import CheckpointError

    ckpt = tmp_path / "ckpt"
    assert main([*_argv(arith_world, tmp_path / "a", ckpt), "--num-rollout", "2"]) == 0
    meta = ckpt / "iter_0000002" / "meta.json"
    meta.write_text(json.dumps({**json.loads(meta.read_text()), "format_version": 999}))
    capsys.readouterr()
    argv = _argv(arith_world, tmp_path / "b", ckpt, "--load", str(ckpt))
    monkeypatch.delenv("MILES_DEBUG", raising=False)
    assert main(argv) == 1
    err = capsys.readouterr().err.splitlines()
    assert any(line.startswith("miles: error: ") and str(meta.parent) in line for line in err), err
    assert not any("Traceback" in line for line in err)
    monkeypatch.setenv("MILES_DEBUG", "1")
    with pytest.raises(CheckpointError):
        main(argv)
