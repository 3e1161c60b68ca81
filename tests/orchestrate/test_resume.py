"""A run killed with SIGKILL and resumed with --load logs the same metrics as an uninterrupted run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

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
