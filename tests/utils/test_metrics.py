"""Metric sinks: metrics.jsonl, the console line, TensorBoard event files and W&B offline runs,
each read back from what was written on disk."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from miles.utils.metrics import MetricsLogger, read_metrics, summary_line
from tests.utils.helpers import settled_wandb_history, wandb_records

STEPS = [{"rollout/raw_reward": 0.25, "train/loss": 1.5}, {"rollout/raw_reward": 0.75, "train/loss": 0.5}]


def _write(run_dir: Path, **sinks) -> str:
    out = io.StringIO()
    logger = MetricsLogger(run_dir, stream=out, config={"lr": 1e-3}, **sinks)
    for step, metrics in enumerate(STEPS):
        logger.log(step, {**metrics, "bad": float("nan")})
    logger.close()
    return out.getvalue()


def test_jsonl_and_console_drop_non_finite_values(tmp_path):
    console = _write(tmp_path)
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == [0, 1]
    assert [r["train/loss"] for r in rows] == [1.5, 0.5]
    assert all("bad" not in r for r in rows)
    assert console.splitlines() == ["step 0: reward=0.25 loss=1.5", "step 1: reward=0.75 loss=0.5"]


def test_summary_line_lists_every_eval_set():
    line = summary_line({"eval/arith": 0.5, "eval/gsm8k": 0.25, "eval/arith/len": 3.0, "perf/step_time": 2.0})
    assert line == "arith=0.500 gsm8k=0.250 s=2"


def test_tensorboard_events_hold_every_scalar(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _write(tmp_path, use_tensorboard=True)
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert set(acc.Tags()["scalars"]) == {"rollout/raw_reward", "train/loss"}
    assert [(e.step, e.value) for e in acc.Scalars("train/loss")] == [(0, 1.5), (1, 0.5)]


def test_wandb_offline_run_holds_the_history(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    from wandb.proto import wandb_internal_pb2 as pb

    monkeypatch.setenv("WANDB_SILENT", "true")
    _write(tmp_path, use_wandb=True, wandb_mode="offline", wandb_project="miles-test", wandb_group="sweep-1")
    assert settled_wandb_history(tmp_path, len(STEPS)) == [{**m, "step": i} for i, m in enumerate(STEPS)]
    (run_file,) = (tmp_path / "wandb").glob("offline-run-*/run-*.wandb")
    groups = set()
    for raw in wandb_records(run_file):
        record = pb.Record()
        record.ParseFromString(raw)
        if record.WhichOneof("record_type") == "run":
            groups.add(record.run.run_group)
    assert groups == {"sweep-1"}  # --wandb-group


def test_console_interval_prints_every_nth_step_and_files_keep_all(tmp_path):
    out = io.StringIO()
    logger = MetricsLogger(tmp_path, stream=out, console_interval=2)
    for step in range(5):
        logger.log(step, {"train/loss": float(step)})
    logger.close()
    assert [line.split(":")[0] for line in out.getvalue().splitlines()] == ["step 0", "step 2", "step 4"]
    assert [r["step"] for r in read_metrics(tmp_path)] == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="console_interval"):
        MetricsLogger(tmp_path, console_interval=0)
