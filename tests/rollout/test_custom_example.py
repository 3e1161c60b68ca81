"""examples/custom end to end: its own jsonl and its own reward, with the real ``miles`` command run
from that folder, as the docs show (no PYTHONPATH: the reward is found in the current directory)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sysconfig
from pathlib import Path

from miles.rollout.dump import load_rollout_dump
from miles.utils.metrics import read_metrics

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "custom"


def _my_reward():
    spec = importlib.util.spec_from_file_location("examples_custom_my_reward", EXAMPLE / "my_reward.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_custom_example_trains_with_its_own_reward(arith_world, tmp_path):
    miles = Path(sysconfig.get_path("scripts")) / "miles"  # the console script, not python -m
    assert miles.is_file(), f"{miles} missing: pip install -e ."
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    run_dir, dump = tmp_path / "run", tmp_path / "dump"
    proc = subprocess.run(
        [str(miles), "train", "--config", "custom.yaml", "--hf-checkpoint", str(arith_world / "model"),
         "--run-dir", str(run_dir), "--save-debug-rollout-data", str(dump)],
        cwd=EXAMPLE, env=env, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows] == [0, 1]
    closeness = _my_reward().closeness
    labels = {json.loads(line)["answer"] for line in (EXAMPLE / "prompts.jsonl").read_text().splitlines()}
    for row in rows:
        groups = load_rollout_dump(dump / f"rollout_{row['step']}.pt")
        samples = [s for g in groups for s in g.samples]
        assert len(samples) == 16 and all(s.label in labels for s in samples)  # the example's own data
        rewards = [s.reward for s in samples]
        assert rewards == [closeness(s.response, s.label) for s in samples]
        assert row["rollout/raw_reward"] == sum(rewards) / len(rewards)
        # -1 and fractions: values neither exact match nor the math rewards give
        assert any(r not in (0.0, 1.0) for r in rewards)
