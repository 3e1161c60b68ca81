"""Asynchronous RL end to end (``miles train --async-mode``) on the toy arithmetic world: every
prompt trained once or reported dropped, the staleness bound, per-token versions, true on-policy
for the tokens of the trained version, and resume."""

from __future__ import annotations

import itertools
import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from miles.cli import main
from miles.rollout.dump import load_rollout_dump
from miles.types import Sample
from miles.utils.plot import plot_run
from tests.orchestrate.helpers import train_argv


def _run(world: Path, run_dir: Path, *extra: str) -> tuple[list[dict[str, Any]], list[list[Sample]]]:
    """Train; the metric rows and, per step, the samples it trained on (from the dumps)."""
    dump = run_dir / "dump"
    assert main(train_argv(world, run_dir, "--save-debug-rollout-data", str(dump), *extra)) == 0
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "perf/step_time" in r]
    steps = sorted(int(p.stem.split("_")[1]) for p in dump.iterdir())
    trained = [[s for g in load_rollout_dump(dump / f"rollout_{k}.pt") for s in g.samples] for k in steps]
    return rows, trained


def _check_versions(trained: list[list[Sample]], bound: int) -> None:
    """Every trained token has a version, at most ``bound`` behind its step; non-decreasing in a sample."""
    for step, samples in enumerate(trained):
        for s in samples:
            v = s.response_versions
            assert v is not None and len(v) == s.response_len, (step, s.index)
            assert all(a <= b for a, b in itertools.pairwise(v)), (step, s.index, v)
            assert all(0 <= step - x <= bound for x in v), (step, s.index, v)


def _groups_once(rows: list[dict[str, Any]], trained: list[list[Sample]], n: int) -> list[int]:
    """The prompts (group indices) trained, each exactly once, and every sample index once."""
    groups = [s.group_index for samples in trained for s in samples[::n]]
    assert len(groups) == len(set(groups))
    indices = [s.index for samples in trained for s in samples]
    assert len(indices) == len(set(indices))
    return groups


@pytest.mark.parametrize(
    ("mode", "extra", "bound"),
    [
        ("fully-async", ("--max-weight-staleness", "1"), 1),
        (
            "fully-async",
            ("--max-weight-staleness", "0", "--partial-rollout", "--stale-group-action", "drop"),
            0,
        ),
        (
            "fully-async",
            ("--max-weight-staleness", "2", "--partial-rollout", "--pause-generation-mode", "retract"),
            2,
        ),
        # The engine's experts replayed by the trainer (R3) across weight updates in place.
        (
            "fully-async",
            ("--max-weight-staleness", "1", "--partial-rollout", "--use-rollout-routing-replay"),
            1,
        ),
    ],
    ids=["bound1", "bound0-partial-drop", "bound2-partial-retract", "bound1-partial-r3"],
)
def test_fully_async_trains_every_prompt_once_within_the_bound(arith_world, tmp_path, mode, extra, bound):
    steps = 6
    rows, trained = _run(arith_world, tmp_path / "run", "--async-mode", mode, "--num-rollout", str(steps),
                         "--rollout-max-response-len", "24", *extra)  # fmt: skip
    assert len(rows) == steps and len(trained) == steps
    _check_versions(trained, bound)
    groups = _groups_once(rows, trained, 4)
    dropped = sum(r["async/dropped_groups"] + r["async/filtered_groups"] for r in rows)
    # Prompts are drawn in order, and none is drawn that the run does not train or report
    # dropped: the first len(groups) + dropped prompts are exactly the trained and the dropped.
    drawn = set(range(len(groups) + int(dropped)))
    assert len(groups) == 4 * steps and set(groups) <= drawn and len(drawn - set(groups)) == dropped
    for r in rows:
        assert r["async/staleness/max"] <= bound
        assert sum(r[f"async/staleness/frac_{k}"] for k in range(bound + 1)) == pytest.approx(1.0)
        assert 0 <= r["perf/trainer_idle_frac"] <= 1 and 0 <= r["perf/engine_idle_frac"] <= 1
    assert rows[0]["async/staleness/max"] == 0  # the first step trains what version 0 generated


def test_one_step_off_trains_step_k_on_what_weights_k_minus_1_generated(arith_world, tmp_path):
    rows, trained = _run(arith_world, tmp_path / "run", "--async-mode", "one-step-off", "--num-rollout", "4")
    assert [sorted({v for s in samples for v in s.response_versions or []}) for samples in trained] == [
        [0],
        [0],
        [1],
        [2],
    ]  # step 0 and step 1 both come from the initial weights; then one version behind
    groups = _groups_once(rows, trained, 4)
    assert groups == list(range(16))  # in admission order, nothing dropped
    assert [r["async/staleness/max"] for r in rows] == [0.0, 1.0, 1.0, 1.0]
    drawn = {p.name for p in plot_run(tmp_path / "run")}
    assert {"staleness.png", "idle.png"} <= drawn


def test_true_on_policy_holds_for_the_tokens_of_the_trained_version(arith_world, tmp_path):
    rows, _ = _run(arith_world, tmp_path / "run", "--async-mode", "fully-async", "--num-rollout", "4",
                   "--true-on-policy-mode", "--max-weight-staleness", "1")  # fmt: skip
    for r in rows:
        assert r["train/current_version_logprob_abs_diff"] == 0.0
    assert rows[0]["train/current_version_token_frac"] == 1.0
    # The decoupled loss's weights against the engine are 1 on those tokens; TIS is on.
    assert all("train/tis_weight_mean" in r for r in rows)


def test_resume_generates_the_pending_prompts_first_and_trains_each_once(arith_world, tmp_path):
    flags = ("--async-mode", "fully-async", "--max-weight-staleness", "1", "--num-rollout", "4",
             "--save", str(tmp_path / "ckpt"), "--save-interval", "2")  # fmt: skip
    _, first = _run(arith_world, tmp_path / "a", *flags)
    state = json.loads((tmp_path / "ckpt" / "iter_0000002" / "meta.json").read_text())["extra_state"]
    pending = [p["group_index"] for p in state["rollout_worker"]["pending_prompts"]]
    assert pending  # the worker had drawn ahead of step 2 when the checkpoint was taken
    # As if the run had died after step 2's checkpoint.
    shutil.rmtree(tmp_path / "ckpt" / "iter_0000004")
    (tmp_path / "ckpt" / "latest_checkpointed_iteration.txt").write_text("2")
    # A synchronous run would skip the pending prompts: it refuses the checkpoint instead.
    sync = train_argv(arith_world, tmp_path / "sync", "--num-rollout", "4", "--load", str(tmp_path / "ckpt"))
    assert main(sync) == 1
    rows, resumed = _run(arith_world, tmp_path / "b", *flags, "--load", str(tmp_path / "ckpt"))
    assert len(rows) == 2
    before = [s.group_index for samples in first[:2] for s in samples[::4]]
    after = [s.group_index for samples in resumed for s in samples[::4]]
    assert not set(before) & set(after) and len(after) == len(set(after)) == 8
    assert set(pending) <= set(after)  # generated again, before any new prompt
    assert sorted(before + after) == list(range(16))
    final = json.loads((tmp_path / "ckpt" / "iter_0000004" / "meta.json").read_text())["extra_state"]
    # The resumed worker counted the steps before it as consumed: it drew no prompt it did not train.
    assert final["dataset"]["next_group_index"] == 16 and final["rollout_worker"]["pending_prompts"] == []
