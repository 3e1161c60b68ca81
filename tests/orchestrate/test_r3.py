"""``miles train --use-rollout-routing-replay`` end to end on the toy MoE arithmetic world."""

from __future__ import annotations

import math

import pytest

from miles.cli import main
from miles.rollout.dump import load_rollout_dump
from miles.utils.metrics import read_metrics
from tests.orchestrate.helpers import train_argv


@pytest.mark.parametrize("global_batch", [None, "8"])  # one on-policy update / an old-log-prob forward
def test_r3_run_logs_routing_mismatch_and_trains(arith_world, tmp_path, global_batch):
    run_dir, dump = tmp_path / "run", tmp_path / "dump"
    # The random toy policy earns no reward yet: the KL term (its reference forward replays the
    # routing too) gives the update a non-zero gradient.
    extra = ["--num-rollout", "2", "--use-rollout-routing-replay", "--save-debug-rollout-data", str(dump),
             "--use-kl-loss", "--kl-loss-coef", "0.5"]  # fmt: skip
    if global_batch is not None:
        extra += ["--global-batch-size", global_batch]
    assert main(train_argv(arith_world, run_dir, *extra)) == 0
    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows] == [0, 1]
    for r in rows:
        frac = r["train/routing_mismatch_frac"]
        assert 0.0 <= frac <= 1.0
        assert math.isfinite(r["train/loss"]) and r["train/grad_norm"] > 0 and r["train/skipped_steps"] == 0
    groups = load_rollout_dump(dump / "rollout_1.pt")
    for s in (s for g in groups for s in g.samples):
        assert s.routed_experts is not None
        assert s.routed_experts.shape[0] == s.total_len - 1 and s.routed_experts.shape[2] == 2
